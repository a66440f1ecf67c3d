//! Erasure of stored events, on PostgreSQL and SQLite: once ProfileService erases a person,
//! the ingest store keeps none of their events (nor those stored under ids merged into them),
//! whatever arrives late, and applying the feed again changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use clientele_ingest::erasure::PROFILES_FEED;
use clientele_ingest::store::{NewEvent, Outcome, ProfileChange, StoreError};
use clientele_ingest::validate::Effect;
use clientele_proto::v1 as pb;
use support::*;

both!(
    erasing_a_person_deletes_their_events_and_those_of_merged_ids,
    an_event_committed_after_the_erasure_is_not_stored,
);

fn with_ids(id: &str, identifiers: Vec<(pb::IdentifierType, &str)>) -> pb::Event {
    let mut e = page_view(id, "unused", "https://shop.example/p/1");
    e.identifiers = Some(pb::IdentifierSet {
        identifiers: identifiers
            .into_iter()
            .map(|(t, v)| pb::Identifier {
                r#type: t as i32,
                value: v.into(),
                namespace: String::new(),
            })
            .collect(),
    });
    e
}

async fn ingest(s: &Served, events: Vec<pb::Event>) -> Vec<pb::EventResult> {
    s.client()
        .ingest_batch(pb::IngestBatchRequest { events })
        .await
        .unwrap()
        .into_inner()
        .results
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

async fn erasing_a_person_deletes_their_events_and_those_of_merged_ids(e: Engine) {
    use pb::IdentifierType::{AnonymousId, Email};
    let s = serve(e).await;
    // Anonymous browsing, then a separate e-mail profile, then both seen together: merged.
    let anon = ingest(&s, vec![with_ids("a1", vec![(AnonymousId, "cookie-9")])]).await;
    let mail = ingest(&s, vec![with_ids("m1", vec![(Email, "jo@example.com")])]).await;
    let both = ingest(
        &s,
        vec![with_ids(
            "b1",
            vec![(Email, "jo@example.com"), (AnonymousId, "cookie-9")],
        )],
    )
    .await;
    ingest(
        &s,
        vec![
            page_view("k1", "keeper", "u"),
            page_view("k2", "keeper", "u"),
        ],
    )
    .await;
    let (a, m, survivor) = (
        &anon[0].profile_id,
        &mail[0].profile_id,
        &both[0].profile_id,
    );
    assert_ne!(a, m, "two profiles before the merge");
    assert!(survivor == a || survivor == m);
    assert_eq!(log(&s).await.len(), 5);

    s.profiles()
        .erase_profile(pb::EraseProfileRequest {
            profile_id: survivor.clone(),
            reason: "gdpr-art17".into(),
        })
        .await
        .unwrap();
    let consumer = s.ingest.erasure();
    assert!(consumer.catch_up().await.unwrap() > 0);

    let left = log(&s).await;
    let ids: Vec<&str> = left.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(ids, vec!["k1", "k2"], "only the keeper's events remain");
    assert!(left.iter().all(|(_, p)| p != a && p != m));

    // Caught up: nothing more to read, and applying the same erasure again deletes nothing.
    assert_eq!(consumer.catch_up().await.unwrap(), 0);
    let store = s.ingest.store();
    let at = store.feed_position(PROFILES_FEED).await.unwrap();
    assert!(at > 0);
    let again = store
        .apply_profile_changes(
            PROFILES_FEED,
            at,
            at,
            &[ProfileChange::Erased(survivor.clone())],
            0,
        )
        .await
        .unwrap();
    assert_eq!((again.deleted_events, again.erased_ids), (0, 0));
    // A stale cursor is refused and writes nothing.
    let stale = store
        .apply_profile_changes(PROFILES_FEED, at - 1, at + 5, &[], 0)
        .await;
    assert!(matches!(stale, Err(StoreError::CursorMoved(_))));
    assert_eq!(store.feed_position(PROFILES_FEED).await.unwrap(), at);

    // The dedup keys went with the events: a re-sent event of the erased person is
    // suppressed by the tombstones, not reported as a stored duplicate.
    let resent = ingest(&s, vec![with_ids("m1", vec![(Email, "jo@example.com")])]).await;
    assert_eq!(statuses(&resent), vec![pb::EventStatus::Suppressed]);
    let kept = ingest(&s, vec![page_view("k1", "keeper", "u")]).await;
    assert_eq!(statuses(&kept), vec![pb::EventStatus::Duplicate]);
}

async fn an_event_committed_after_the_erasure_is_not_stored(e: Engine) {
    let s = serve(e).await;
    let r = ingest(&s, vec![page_view("v1", "late", "u")]).await;
    let pid = r[0].profile_id.clone();
    s.profiles()
        .erase_profile(pb::EraseProfileRequest {
            profile_id: pid.clone(),
            reason: "gdpr-art17".into(),
        })
        .await
        .unwrap();
    s.ingest.erasure().catch_up().await.unwrap();
    assert!(log(&s).await.is_empty());
    // A batch resolved before the erasure and committed after it.
    let body = page_view("v2", "late", "u");
    let late = NewEvent {
        source: "web".into(),
        event_id: "v2".into(),
        hash: vec![7; 32],
        profile_id: pid,
        kind: pb::EventKind::PageViewed as i32,
        custom_name: None,
        occurred_at: 1_700_000_000_000_000,
        body: prost::Message::encode_to_vec(&body),
        redacted: vec![],
        aggregate_key: "web/v2".into(),
        effect: Effect::Engagement("page_viewed"),
    };
    let out = s.ingest.store().commit(&[late], None, 1).await.unwrap();
    assert_eq!(out, vec![Outcome::Accepted]);
    assert!(
        log(&s).await.is_empty(),
        "nothing stored for an erased profile"
    );
}
