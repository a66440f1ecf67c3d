//! The identity cache end to end, on PostgreSQL and SQLite with the real ProfileService: which
//! batches reach BatchResolve (counted at ProfileService's server), refused links, and what a
//! merge or an erasure the cache has not heard of yet does to an event.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::Ordering;

use clientele_proto::v1 as pb;
use support::*;

both!(
    a_repeat_customer_batch_skips_batch_resolve,
    a_disabled_cache_resolves_every_batch,
    an_identifier_refused_by_the_over_merge_guard_keeps_resolving_to_its_own_profile,
    an_event_after_a_merge_lands_on_the_survivor_timeline,
    an_event_after_erasure_is_not_kept,
    a_replica_that_does_not_lead_learns_of_an_erasure_from_the_feed,
);

use pb::IdentifierType::{AnonymousId, CustomerId, DeviceId, Email};

fn with_ids(id: &str, identifiers: &[(pb::IdentifierType, &str)]) -> pb::Event {
    let mut e = page_view(id, "unused", "https://shop.example/p/1");
    e.identifiers = Some(set(identifiers));
    e
}

fn set(identifiers: &[(pb::IdentifierType, &str)]) -> pb::IdentifierSet {
    pb::IdentifierSet {
        identifiers: identifiers
            .iter()
            .map(|(t, v)| pb::Identifier {
                r#type: *t as i32,
                value: (*v).into(),
                namespace: String::new(),
            })
            .collect(),
    }
}

async fn ingest(s: &Served, events: Vec<pb::Event>) -> Vec<pb::EventResult> {
    s.client()
        .ingest_batch(pb::IngestBatchRequest { events })
        .await
        .unwrap()
        .into_inner()
        .results
}

fn resolves(s: &Served) -> usize {
    s.batch_resolves.load(Ordering::SeqCst)
}

/// A batch of one event per customer `0..n`, each carrying its customer id and e-mail.
fn customers(prefix: &str, n: usize) -> Vec<pb::Event> {
    (0..n)
        .map(|i| {
            let (c, m) = (format!("c-{i}"), format!("c{i}@example.com"));
            with_ids(
                &format!("{prefix}-{i}"),
                &[(CustomerId, c.as_str()), (Email, m.as_str())],
            )
        })
        .collect()
}

fn profile_ids(r: &[pb::EventResult]) -> Vec<String> {
    r.iter().map(|r| r.profile_id.clone()).collect()
}

/// Every stored event's (event_id, profile_id), in log order.
async fn log(s: &Served) -> Vec<(String, String)> {
    let rows = s.ingest.store().log_after(0, 10_000).await.unwrap();
    rows.iter()
        .map(|r| {
            let p = r.to_proto(None).unwrap();
            (p.event.unwrap().event_id, p.profile_id)
        })
        .collect()
}

async fn timeline(s: &Served, profile_id: &str) -> Vec<String> {
    let mut ids: Vec<String> = s
        .client()
        .list_profile_events(pb::ListProfileEventsRequest {
            profile_id: profile_id.into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
        .into_iter()
        .map(|e| e.event.unwrap().event_id)
        .collect();
    ids.sort();
    ids
}

async fn a_repeat_customer_batch_skips_batch_resolve(e: Engine) {
    let s = serve(e).await;
    let first = ingest(&s, customers("a", 5)).await;
    assert_eq!(statuses(&first), vec![pb::EventStatus::Accepted; 5]);
    assert_eq!(resolves(&s), 1);

    // The same customers again: every set is cached on one profile.
    let again = ingest(&s, customers("b", 5)).await;
    assert_eq!(statuses(&again), vec![pb::EventStatus::Accepted; 5]);
    assert_eq!(profile_ids(&again), profile_ids(&first));
    assert_eq!(resolves(&s), 1, "no BatchResolve for returning customers");
    // A subset of a known set (only the e-mail) is a hit too.
    let mail_only = ingest(&s, vec![with_ids("m-0", &[(Email, "c0@example.com")])]).await;
    assert_eq!(mail_only[0].profile_id, first[0].profile_id);
    assert_eq!(resolves(&s), 1);

    // Returning customers plus one new identifier: one BatchResolve, for the missing sets only,
    // and the returning ones keep their profiles.
    let mut mixed = customers("c", 3);
    mixed.push(with_ids(
        "c-new",
        &[(CustomerId, "c-0"), (DeviceId, "phone-0")],
    ));
    mixed.push(with_ids("c-other", &[(CustomerId, "c-99")]));
    let r = ingest(&s, mixed).await;
    assert_eq!(statuses(&r), vec![pb::EventStatus::Accepted; 5]);
    assert_eq!(resolves(&s), 2);
    assert_eq!(profile_ids(&r)[..3], profile_ids(&first)[..3]);
    assert_eq!(
        r[3].profile_id, first[0].profile_id,
        "the device joined c-0"
    );
    assert!(!profile_ids(&first).contains(&r[4].profile_id));
    // …and what that call linked is cached from now on.
    ingest(
        &s,
        vec![
            with_ids("d-1", &[(DeviceId, "phone-0"), (Email, "c0@example.com")]),
            with_ids("d-2", &[(CustomerId, "c-99")]),
        ],
    )
    .await;
    assert_eq!(resolves(&s), 2);

    // The aggregates count every event, cached or not.
    s.drain().await;
    let (_, agg) = s.aggregates("c-0").await;
    assert_eq!(agg.engagement.get("page_viewed"), Some(&6));
}

async fn a_disabled_cache_resolves_every_batch(e: Engine) {
    let s = serve_with(e, |st| st.ingest.identity_cache_entries = 0).await;
    let first = ingest(&s, customers("a", 3)).await;
    let again = ingest(&s, customers("b", 3)).await;
    assert_eq!(profile_ids(&again), profile_ids(&first));
    assert_eq!(resolves(&s), 2);
}

async fn an_identifier_refused_by_the_over_merge_guard_keeps_resolving_to_its_own_profile(
    e: Engine,
) {
    // A cap of 1: an identifier already on one profile never links a second one.
    let s = serve_with(e, |st| st.identity.max_profiles_per_identifier = 1).await;
    let tablet = ingest(&s, vec![with_ids("t1", &[(DeviceId, "shop-tablet")])]).await;
    let jo = ingest(&s, vec![with_ids("j1", &[(Email, "jo@example.com")])]).await;
    let (tablet_pid, jo_pid) = (&tablet[0].profile_id, &jo[0].profile_id);
    assert_ne!(tablet_pid, jo_pid);
    // Jo on the shop's tablet: the tablet's link to Jo is refused.
    let both = ingest(
        &s,
        vec![with_ids(
            "j2",
            &[(Email, "jo@example.com"), (DeviceId, "shop-tablet")],
        )],
    )
    .await;
    assert_eq!(&both[0].profile_id, jo_pid);
    assert_eq!(resolves(&s), 3);
    // The tablet alone is still the tablet's profile (the refused link was not cached as Jo's),
    // and Jo with the tablet keeps going to ProfileService (the two are on different profiles).
    let alone = ingest(&s, vec![with_ids("t2", &[(DeviceId, "shop-tablet")])]).await;
    assert_eq!(&alone[0].profile_id, tablet_pid);
    let again = ingest(
        &s,
        vec![with_ids(
            "j3",
            &[(Email, "jo@example.com"), (DeviceId, "shop-tablet")],
        )],
    )
    .await;
    assert_eq!(&again[0].profile_id, jo_pid);
    assert_eq!(resolves(&s), 4, "only j3 needed ProfileService");
}

async fn an_event_after_a_merge_lands_on_the_survivor_timeline(e: Engine) {
    let s = serve(e).await;
    let anon = ingest(&s, vec![with_ids("a1", &[(AnonymousId, "cookie-9")])]).await;
    let mail = ingest(&s, vec![with_ids("m1", &[(Email, "jo@example.com")])]).await;
    assert_ne!(anon[0].profile_id, mail[0].profile_id);
    assert_eq!(resolves(&s), 2);
    // Another client links both identifiers through ProfileService directly: the profiles
    // merge behind the cache's back.
    let merged = s
        .profiles()
        .resolve(pb::ResolveRequest {
            identifiers: Some(set(&[(Email, "jo@example.com"), (AnonymousId, "cookie-9")])),
        })
        .await
        .unwrap()
        .into_inner();
    let survivor = merged.profile_id.clone();
    assert_eq!(merged.merged_profile_ids.len(), 1);
    let loser = merged.merged_profile_ids[0].clone();

    // Before the change feed is applied the cache still names the merged-away profile for
    // one of the identifiers: the event is stored under that id, yet it is on the survivor's
    // timeline and in the survivor's aggregates.
    let stale = ingest(
        &s,
        vec![
            with_ids("a2", &[(AnonymousId, "cookie-9")]),
            with_ids("m2", &[(Email, "jo@example.com")]),
        ],
    )
    .await;
    assert_eq!(resolves(&s), 2, "both sets were cache hits");
    let named: Vec<&str> = stale.iter().map(|r| r.profile_id.as_str()).collect();
    assert!(named.contains(&loser.as_str()) && named.contains(&survivor.as_str()));
    assert_eq!(timeline(&s, &survivor).await, vec!["a1", "a2", "m1", "m2"]);
    s.drain().await;
    let profile = s
        .profiles()
        .get_profile(pb::GetProfileRequest {
            profile_id: survivor.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(
        profile.aggregates.unwrap().engagement.get("page_viewed"),
        Some(&4),
        "every event counted on the survivor"
    );

    // Once the feed is applied, both identifiers (and the set holding both) answer the
    // survivor, still without ProfileService.
    s.ingest.erasure().catch_up().await.unwrap();
    let after = ingest(
        &s,
        vec![
            with_ids("a3", &[(AnonymousId, "cookie-9")]),
            with_ids("m3", &[(Email, "jo@example.com")]),
            with_ids(
                "b3",
                &[(Email, "jo@example.com"), (AnonymousId, "cookie-9")],
            ),
        ],
    )
    .await;
    assert_eq!(profile_ids(&after), vec![survivor.clone(); 3]);
    assert_eq!(resolves(&s), 2);
    assert_eq!(
        timeline(&s, &survivor).await,
        vec!["a1", "a2", "a3", "b3", "m1", "m2", "m3"]
    );
}

async fn an_event_after_erasure_is_not_kept(e: Engine) {
    let s = serve(e).await;
    let first = ingest(
        &s,
        vec![
            with_ids("g1", &[(Email, "gone@example.com")]),
            with_ids("k1", &[(Email, "keeper@example.com")]),
        ],
    )
    .await;
    let gone = first[0].profile_id.clone();
    s.profiles()
        .erase_profile(pb::EraseProfileRequest {
            profile_id: gone.clone(),
            reason: "gdpr-art17".into(),
        })
        .await
        .unwrap();
    // Until ingest applies the erasure from the change feed, a cached identifier of the erased
    // person is a hit: the event is reported ACCEPTED (ProfileService would have had it
    // SUPPRESSED)…
    let lagging = ingest(&s, vec![with_ids("g2", &[(Email, "gone@example.com")])]).await;
    assert_eq!(statuses(&lagging), vec![pb::EventStatus::Accepted]);
    assert_eq!(resolves(&s), 1);
    // …and is not kept: applying the erasure deletes it with the person's other events, and
    // drops the cache, so the next event is SUPPRESSED by ProfileService.
    s.ingest.erasure().catch_up().await.unwrap();
    let left: Vec<String> = log(&s).await.into_iter().map(|(e, _)| e).collect();
    assert_eq!(left, vec!["k1"]);
    let later = ingest(
        &s,
        vec![
            with_ids("g3", &[(Email, "gone@example.com")]),
            with_ids("k2", &[(Email, "keeper@example.com")]),
        ],
    )
    .await;
    assert_eq!(
        statuses(&later),
        vec![pb::EventStatus::Suppressed, pb::EventStatus::Accepted]
    );
    assert_eq!(resolves(&s), 2);
    assert!(log(&s).await.iter().all(|(_, p)| *p != gone));
}

/// A replica that does not lead the background jobs never runs the erasure consumer; its
/// cache follower still reads the erasure from the change feed, so the erased person's next
/// event is SUPPRESSED at once, not ACCEPTED until the cache entry expires.
async fn a_replica_that_does_not_lead_learns_of_an_erasure_from_the_feed(e: Engine) {
    let s = serve(e).await;
    let first = ingest(&s, vec![with_ids("g1", &[(Email, "gone@example.com")])]).await;
    let gone = first[0].profile_id.clone();
    let follower = s.ingest.cache_follower();
    let start = s
        .ingest
        .store()
        .feed_position(clientele_ingest::erasure::PROFILES_FEED)
        .await
        .unwrap();
    let (at, _) = follower.follow_once(start).await.unwrap();
    s.profiles()
        .erase_profile(pb::EraseProfileRequest {
            profile_id: gone.clone(),
            reason: "gdpr-art17".into(),
        })
        .await
        .unwrap();
    let (after, read) = follower.follow_once(at).await.unwrap();
    assert!(
        read >= 1 && after > at,
        "the erasure was read from the feed"
    );
    let later = ingest(&s, vec![with_ids("g2", &[(Email, "gone@example.com")])]).await;
    assert_eq!(statuses(&later), vec![pb::EventStatus::Suppressed]);
    assert_eq!(
        resolves(&s),
        2,
        "the cache no longer answered for the erased person"
    );
    // Caught up, the follower reads nothing and keeps its position.
    assert_eq!(follower.follow_once(after).await.unwrap(), (after, 0));
}
