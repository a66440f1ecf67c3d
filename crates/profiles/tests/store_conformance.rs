//! The store conformance suite: every test runs against PostgreSQL and against SQLite, so the
//! embedded default behaves exactly like production.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use clientele_profiles::ProfileStore;
use clientele_profiles::model::{AggregateDelta, ConsentRecord, TraitValue};
use clientele_profiles::row_engagement::ROW_ENGAGEMENT;
use clientele_profiles::store::StoreError;
use support::{Engine, fixture};

const T0: i64 = 1_700_000_000_000_000;

fn order(key: &str, profile: &str, at: i64, amount: i64, currency: &str) -> AggregateDelta {
    AggregateDelta {
        key: key.into(),
        profile_id: profile.into(),
        occurred_at: at,
        orders: 1,
        gross: Some((currency.into(), amount)),
        ..AggregateDelta::default()
    }
}

async fn resolving_unknown_identifiers_creates_one_profile(e: Engine) {
    let f = fixture(e, 5).await;
    let keys = vec![f.email("a@x.io"), f.customer("c-1")];
    let first = f.store.resolve(&keys, T0).await.unwrap();
    assert!(first.created);
    let again = f.store.resolve(&keys, T0 + 1).await.unwrap();
    assert!(!again.created);
    assert_eq!(first.profile_id, again.profile_id);
    let by_one = f.store.resolve(&[f.customer("c-1")], T0 + 2).await.unwrap();
    assert_eq!(by_one.profile_id, first.profile_id);
    let p = f.store.get(&first.profile_id).await.unwrap();
    assert_eq!(p.identifiers.len(), 2);
    assert!(
        p.identifiers
            .iter()
            .all(|i| !i.stored_value.contains("a@x.io"))
    );
}

async fn merging_two_profiles_keeps_all_orders(e: Engine) {
    let f = fixture(e, 5).await;
    let anon = f
        .store
        .resolve(&[f.anonymous("cookie-1")], T0)
        .await
        .unwrap();
    let known = f
        .store
        .resolve(&[f.email("b@x.io")], T0 + 10)
        .await
        .unwrap();
    f.store
        .apply_aggregates(
            &[
                order("e1", &anon.profile_id, T0 + 100, 1000, "USD"),
                order("e2", &known.profile_id, T0 + 50, 2500, "USD"),
                order("e3", &known.profile_id, T0 + 200, 700, "KRW"),
            ],
            T0,
        )
        .await
        .unwrap();
    f.store
        .update_traits(
            &anon.profile_id,
            &[("color".into(), TraitValue::String("red".into()))],
            &[],
            T0 + 300,
        )
        .await
        .unwrap();
    f.store
        .update_traits(
            &known.profile_id,
            &[("color".into(), TraitValue::String("blue".into()))],
            &[],
            T0 + 200,
        )
        .await
        .unwrap();

    let merged = f
        .store
        .resolve(&[f.email("b@x.io"), f.anonymous("cookie-1")], T0 + 400)
        .await
        .unwrap();
    // the anonymous profile is older, so it survives
    assert_eq!(merged.profile_id, anon.profile_id);
    assert_eq!(merged.merged, vec![known.profile_id.clone()]);

    let p = f.store.get(&known.profile_id).await.unwrap();
    assert_eq!(p.id, anon.profile_id, "merged id resolves to the survivor");
    assert_eq!(p.merged_ids, vec![known.profile_id.clone()]);
    assert_eq!(p.order_count, 3);
    assert_eq!(p.first_order_at, Some(T0 + 50));
    assert_eq!(p.last_order_at, Some(T0 + 200));
    let usd = p.spend.iter().find(|s| s.currency == "USD").unwrap();
    assert_eq!(usd.gross_minor, 3500);
    assert_eq!(
        p.spend
            .iter()
            .find(|s| s.currency == "KRW")
            .unwrap()
            .gross_minor,
        700
    );
    assert_eq!(p.identifiers.len(), 2);
    // the most recently set trait wins
    assert_eq!(p.traits["color"].value, TraitValue::String("red".into()));

    let export = f.store.export(&anon.profile_id).await.unwrap();
    assert_eq!(export["merges"].as_array().unwrap().len(), 1);
}

async fn a_shared_device_links_at_most_the_cap(e: Engine) {
    let f = fixture(e, 2).await;
    let tablet = f.device("family-tablet");
    let a = f
        .store
        .resolve(&[f.email("a@fam.io"), tablet.clone()], T0)
        .await
        .unwrap();
    let b = f
        .store
        .resolve(&[f.email("b@fam.io")], T0 + 1)
        .await
        .unwrap();
    let c = f
        .store
        .resolve(&[f.email("c@fam.io")], T0 + 2)
        .await
        .unwrap();
    // b logs in on the tablet: the tablet links a second profile (cap 2), so they merge
    let ab = f
        .store
        .resolve(&[f.email("b@fam.io"), tablet.clone()], T0 + 3)
        .await
        .unwrap();
    assert_eq!(ab.profile_id, a.profile_id);
    assert_eq!(ab.merged, vec![b.profile_id.clone()]);
    // c logs in on the tablet: the tablet is at the cap, so the link is refused
    let refused = f
        .store
        .resolve(&[f.email("c@fam.io"), tablet], T0 + 4)
        .await
        .unwrap();
    assert_eq!(refused.profile_id, c.profile_id);
    assert!(refused.merged.is_empty());
    assert_eq!(refused.refused, vec![1]);
    assert_eq!(
        f.store.get(&c.profile_id).await.unwrap().identifiers.len(),
        1
    );
}

async fn aggregates_count_each_event_once_in_any_order(e: Engine) {
    let f = fixture(e, 5).await;
    let p = f
        .store
        .resolve(&[f.customer("agg")], T0)
        .await
        .unwrap()
        .profile_id;
    let refund = AggregateDelta {
        key: "r1".into(),
        profile_id: p.clone(),
        occurred_at: T0 + 500,
        refunds: 1,
        refunded: Some(("USD".into(), 300)),
        ..AggregateDelta::default()
    };
    let view = AggregateDelta {
        key: "v1".into(),
        profile_id: p.clone(),
        occurred_at: T0 + 600,
        engagement: vec![("product_viewed".into(), 1)],
        ..AggregateDelta::default()
    };
    // refund arrives before its order; everything is then retried
    let first = f
        .store
        .apply_aggregates(&[refund.clone(), view.clone()], T0)
        .await
        .unwrap();
    assert_eq!(first.applied, 2);
    let o = order("o1", &p, T0 + 100, 1000, "USD");
    f.store
        .apply_aggregates(std::slice::from_ref(&o), T0)
        .await
        .unwrap();
    let retry = f
        .store
        .apply_aggregates(&[o, refund, view], T0)
        .await
        .unwrap();
    assert_eq!((retry.applied, retry.duplicates), (0, 3));
    let r = f.store.get(&p).await.unwrap();
    assert_eq!((r.order_count, r.refund_count), (1, 1));
    assert_eq!(r.spend[0].gross_minor, 1000);
    assert_eq!(r.spend[0].refunded_minor, 300);
    assert_eq!(r.engagement["product_viewed"], 1);
    assert_eq!(r.last_order_at, Some(T0 + 100));
    assert_eq!(r.last_seen_at, Some(T0 + 600));
}

async fn consent_history_is_kept_and_the_latest_decision_counts(e: Engine) {
    let f = fixture(e, 5).await;
    let p = f
        .store
        .resolve(&[f.customer("consent")], T0)
        .await
        .unwrap()
        .profile_id;
    let c = |status, at| ConsentRecord {
        purpose: 1,
        status,
        decided_at: at,
        source: "web".into(),
    };
    f.store
        .record_consent(&p, &c(1, T0 + 10), T0)
        .await
        .unwrap();
    f.store
        .record_consent(&p, &c(3, T0 + 20), T0)
        .await
        .unwrap();
    // a late-arriving older decision does not override the newer one
    let r = f.store.record_consent(&p, &c(1, T0 + 5), T0).await.unwrap();
    assert_eq!(r.consents.len(), 1);
    assert_eq!(r.consents[0].status, 3);
    let h = f.store.consent_history(&p, Some(1)).await.unwrap();
    assert_eq!(
        h.iter().map(|c| c.decided_at).collect::<Vec<_>>(),
        vec![T0 + 20, T0 + 10, T0 + 5]
    );
}

async fn erasure_removes_the_person_and_suppresses_their_identifiers(e: Engine) {
    let f = fixture(e, 5).await;
    let keys = vec![f.email("gone@x.io"), f.device("dev-9")];
    let p = f.store.resolve(&keys, T0).await.unwrap().profile_id;
    let other = f
        .store
        .resolve(&[f.anonymous("anon-9")], T0)
        .await
        .unwrap()
        .profile_id;
    f.store
        .resolve(&[f.email("gone@x.io"), f.anonymous("anon-9")], T0 + 1)
        .await
        .unwrap();
    f.store
        .update_traits(
            &p,
            &[("tier".into(), TraitValue::String("gold".into()))],
            &[],
            T0,
        )
        .await
        .unwrap();
    let out = f
        .store
        .erase(&p, "gdpr-art17 ticket 42", T0 + 5)
        .await
        .unwrap();
    assert_eq!(out.identifiers_tombstoned, 3);
    assert!(out.profile_ids.contains(&other));
    assert!(matches!(f.store.get(&p).await, Err(StoreError::Erased(_))));
    assert!(matches!(
        f.store.get(&other).await,
        Err(StoreError::Erased(_))
    ));
    // later data for any erased identifier is suppressed, not recreated
    let again = f
        .store
        .resolve(&[f.email("gone@x.io")], T0 + 6)
        .await
        .unwrap();
    assert!(again.erased);
    assert!(again.profile_id.is_empty());
    assert_eq!(
        f.store
            .any_erased(&[vec![f.device("dev-9")], vec![f.email("fresh@x.io")]])
            .await
            .unwrap(),
        vec![true, false]
    );
    // erasing twice is a no-op
    assert_eq!(
        f.store
            .erase(&p, "again", T0 + 7)
            .await
            .unwrap()
            .identifiers_tombstoned,
        0
    );
}

async fn the_changes_feed_lists_every_write_in_order(e: Engine) {
    let f = fixture(e, 5).await;
    let a = f
        .store
        .resolve(&[f.customer("feed-a")], T0)
        .await
        .unwrap()
        .profile_id;
    let b = f
        .store
        .resolve(&[f.customer("feed-b")], T0)
        .await
        .unwrap()
        .profile_id;
    f.store
        .resolve(&[f.customer("feed-a"), f.customer("feed-b")], T0)
        .await
        .unwrap();
    let changes = f.store.changes_after(0, 100).await.unwrap();
    let kinds: Vec<i64> = changes.iter().map(|c| c.kind).collect();
    assert_eq!(kinds, vec![1, 1, 3]);
    assert_eq!(changes[2].profile_id, a);
    assert_eq!(changes[2].merged_ids, vec![b]);
    assert!(changes.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(
        f.store
            .changes_after(changes[1].seq, 100)
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn concurrent_resolves_of_the_same_identifiers_create_one_profile(e: Engine) {
    let f = fixture(e, 5).await;
    for round in 0..5 {
        let email = format!("race-{round}@x.io");
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(40));
        let mut tasks = Vec::new();
        for i in 0..40 {
            let store = f.store.clone();
            let barrier = barrier.clone();
            // every call shares the email; half also bring their own device id
            let mut keys = vec![f.email(&email)];
            if i % 2 == 0 {
                keys.push(f.device(&format!("dev-{round}-{i}")));
            }
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                store.resolve(&keys, T0 + i).await
            }));
        }
        let mut ids = std::collections::BTreeSet::new();
        for t in tasks {
            ids.insert(t.await.unwrap().unwrap().profile_id);
        }
        assert_eq!(ids.len(), 1, "one identifier must never own two profiles");
        let p = f.store.get(ids.first().unwrap()).await.unwrap();
        assert_eq!(p.identifiers.len(), 21);
    }
}

async fn a_missing_profile_is_not_found(e: Engine) {
    let f = fixture(e, 5).await;
    let id = "00000000-0000-7000-8000-000000000000";
    assert!(matches!(f.store.get(id).await, Err(StoreError::NotFound(x)) if x == id));
    assert!(matches!(
        f.store
            .update_traits(id, &[("a".into(), TraitValue::Int(1))], &[], T0)
            .await,
        Err(StoreError::NotFound(_))
    ));
}

async fn first_time_customers_are_created_in_bulk(e: Engine) {
    let f = fixture(e, 5).await;
    let known = f
        .store
        .resolve(&[f.customer("known")], T0)
        .await
        .unwrap()
        .profile_id;
    let gone = f
        .store
        .resolve(&[f.customer("gone")], T0)
        .await
        .unwrap()
        .profile_id;
    f.store.erase(&gone, "test", T0).await.unwrap();
    let sets = vec![
        vec![f.email("new-1@x.io"), f.device("d-1")],
        vec![f.email("new-2@x.io")],
        vec![f.email("new-3@x.io"), f.device("d-1")],
        vec![f.customer("known"), f.device("d-9")],
        vec![f.customer("gone")],
    ];
    let created = f.store.create_new(&sets, T0 + 1).await.unwrap();
    assert!(created[0].is_some() && created[1].is_some());
    assert_eq!(
        created[2], None,
        "shares a device with an earlier set of the batch"
    );
    assert_eq!(created[3], None, "holds a known identifier");
    assert_eq!(created[4], None, "holds an erased identifier");
    let p = f.store.get(created[0].as_ref().unwrap()).await.unwrap();
    assert_eq!(p.identifiers.len(), 2);
    // the sets left over resolve normally
    let third = f.store.resolve(&sets[2], T0 + 2).await.unwrap();
    assert_eq!(&third.profile_id, created[0].as_ref().unwrap());
    assert_eq!(
        f.store.resolve(&sets[3], T0 + 2).await.unwrap().profile_id,
        known
    );
    assert!(f.store.resolve(&sets[4], T0 + 2).await.unwrap().erased);
    let kinds: Vec<i64> = f
        .store
        .changes_after(0, 100)
        .await
        .unwrap()
        .iter()
        .map(|c| c.kind)
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == 1).count(),
        4,
        "every created profile is announced"
    );
}

async fn bulk_creation_and_resolution_race_to_one_profile(e: Engine) {
    let f = fixture(e, 5).await;
    for round in 0..5 {
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(20));
        let mut tasks = Vec::new();
        for i in 0..20 {
            let store = f.store.clone();
            let barrier = barrier.clone();
            let keys = vec![
                f.email(&format!("bulk-{round}@x.io")),
                f.customer(&format!("c-{round}")),
            ];
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                if i % 2 == 0
                    && let Some(id) = store
                        .create_new(std::slice::from_ref(&keys), T0)
                        .await
                        .unwrap()
                        .remove(0)
                {
                    return id;
                }
                store.resolve(&keys, T0).await.unwrap().profile_id
            }));
        }
        let mut ids = std::collections::BTreeSet::new();
        for t in tasks {
            ids.insert(t.await.unwrap());
        }
        assert_eq!(ids.len(), 1, "round {round}: {ids:?}");
    }
}

/// Profiles before a batch: two customers with orders, an anonymous visitor, a tablet already
/// shared by one person, and an erased person. Returns the identifier sets of the batch.
async fn batch_scenario(
    f: &support::Fixture,
) -> Vec<Vec<clientele_profiles::identifiers::IdentifierKey>> {
    let a = f.store.resolve(&[f.email("a@x.io")], T0).await.unwrap();
    let b = f.store.resolve(&[f.customer("b")], T0 + 1).await.unwrap();
    let anon = f
        .store
        .resolve(&[f.anonymous("ck-1")], T0 + 2)
        .await
        .unwrap();
    f.store
        .resolve(&[f.email("t@x.io"), f.device("tablet")], T0 + 3)
        .await
        .unwrap();
    f.store.resolve(&[f.email("c@x.io")], T0 + 4).await.unwrap();
    let gone = f
        .store
        .resolve(&[f.customer("gone")], T0 + 4)
        .await
        .unwrap();
    f.store
        .erase(&gone.profile_id, "test", T0 + 5)
        .await
        .unwrap();
    f.store
        .apply_aggregates(
            &[
                order("o1", &a.profile_id, T0 + 10, 1000, "USD"),
                order("o2", &b.profile_id, T0 + 20, 700, "USD"),
                order("o3", &anon.profile_id, T0 + 30, 300, "EUR"),
            ],
            T0 + 40,
        )
        .await
        .unwrap();
    vec![
        // new person, then the same new e-mail bridged to an old customer (created in the
        // batch, merged in the same batch)
        vec![f.email("n@x.io"), f.device("d-1")],
        vec![f.email("n@x.io"), f.customer("b")],
        // anonymous visitor signs up with a's e-mail: merge into a
        vec![f.anonymous("ck-1"), f.email("a@x.io")],
        // b (now holding n's profile) meets a: a chain across three earlier merges
        vec![f.device("d-1"), f.email("a@x.io"), f.anonymous("ck-2")],
        // the tablet (cap 2) links a second person, then a third is refused
        vec![f.device("tablet"), f.customer("b")],
        vec![f.device("tablet"), f.email("c@x.io")],
        // erased identifiers stay suppressed
        vec![f.customer("gone"), f.email("new-gone@x.io")],
        // a set repeated after it was resolved in the batch changes nothing
        vec![f.email("solo@x.io")],
        vec![f.email("solo@x.io")],
    ]
}

/// Which identifiers share a profile, with that profile's order count and spend: the shape of
/// the store, independent of the generated ids.
async fn partition(
    f: &support::Fixture,
    sets: &[Vec<clientele_profiles::identifiers::IdentifierKey>],
) -> Vec<(Vec<String>, i64, Vec<(String, i64)>)> {
    let mut keys: Vec<clientele_profiles::identifiers::IdentifierKey> =
        sets.iter().flatten().cloned().collect();
    keys.extend([f.device("tablet"), f.email("t@x.io"), f.email("c@x.io")]);
    keys.sort();
    keys.dedup();
    let mut by: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for k in &keys {
        if let Some(p) = f
            .store
            .resolve_known(&[vec![k.clone()]])
            .await
            .unwrap()
            .remove(0)
        {
            by.entry(p).or_default().push(format!("{k:?}"));
        }
    }
    let mut out = Vec::new();
    for (p, ks) in by {
        let r = f.store.get(&p).await.unwrap();
        let spend = r
            .spend
            .iter()
            .map(|s| (s.currency.clone(), s.gross_minor))
            .collect();
        out.push((ks, r.order_count, spend));
    }
    out.sort();
    out
}

async fn resolving_many_sets_at_once_matches_one_call_per_set(e: Engine) {
    let one = fixture(e, 2).await;
    let many = fixture(e, 2).await;
    let sets_one = batch_scenario(&one).await;
    let sets_many = batch_scenario(&many).await;
    let mut singles = Vec::new();
    for s in &sets_one {
        singles.push(one.store.resolve(s, T0 + 100).await.unwrap());
    }
    let bulk = many.store.resolve_many(&sets_many, T0 + 100).await.unwrap();
    assert_eq!(bulk.len(), singles.len());
    for (i, (b, s)) in bulk.iter().zip(&singles).enumerate() {
        assert_eq!(
            (
                b.created,
                b.erased,
                b.merged.len(),
                &b.refused,
                b.version.is_some()
            ),
            (
                s.created,
                s.erased,
                s.merged.len(),
                &s.refused,
                s.version.is_some()
            ),
            "set {i}"
        );
    }
    assert_eq!(bulk[7].profile_id, bulk[8].profile_id);
    assert_eq!(
        partition(&many, &sets_many).await,
        partition(&one, &sets_one).await
    );
    let kinds = |f: &support::Fixture| {
        let store = f.store.clone();
        async move {
            store
                .changes_after(0, 1000)
                .await
                .unwrap()
                .iter()
                .map(|c| (c.kind, c.merged_ids.len()))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(kinds(&many).await, kinds(&one).await);
}

async fn bulk_resolution_and_single_resolution_race_to_one_profile(e: Engine) {
    let f = fixture(e, 5).await;
    for round in 0..5 {
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(10));
        let mut tasks = Vec::new();
        for i in 0..10 {
            let store = f.store.clone();
            let barrier = barrier.clone();
            let a = vec![f.email(&format!("r{round}@x.io"))];
            let b = vec![f.customer(&format!("r{round}"))];
            let both = vec![a[0].clone(), b[0].clone()];
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                if i % 2 == 0 {
                    let out = store.resolve_many(&[a, b, both], T0).await.unwrap();
                    out[2].profile_id.clone()
                } else {
                    store.resolve(&both, T0).await.unwrap().profile_id
                }
            }));
        }
        let mut ids = std::collections::BTreeSet::new();
        for t in tasks {
            let id = t.await.unwrap();
            ids.insert(f.store.get(&id).await.unwrap().id);
        }
        assert_eq!(ids.len(), 1, "round {round}: {ids:?}");
    }
}

async fn a_batch_of_deltas_counts_each_key_once_with_one_change_per_profile(e: Engine) {
    let f = fixture(e, 5).await;
    let a = f.store.resolve(&[f.customer("ba")], T0).await.unwrap();
    let b = f.store.resolve(&[f.customer("bb")], T0).await.unwrap();
    let missing = uuid::Uuid::now_v7().to_string();
    let view = |key: &str, p: &str, at: i64, n: i64| AggregateDelta {
        key: key.into(),
        profile_id: p.into(),
        occurred_at: at,
        engagement: vec![("email_opened".into(), 1), ("product_viewed".into(), n)],
        ..AggregateDelta::default()
    };
    let refund = AggregateDelta {
        key: "ref".into(),
        profile_id: b.profile_id.clone(),
        occurred_at: T0 + 40,
        refunds: 1,
        refunded: Some(("EUR".into(), 250)),
        ..AggregateDelta::default()
    };
    let batch = vec![
        order("o1", &a.profile_id, T0 + 30, 1000, "USD"),
        order("o2", &a.profile_id, T0 + 10, 500, "USD"),
        order("o3", &a.profile_id, T0 + 20, 700, "KRW"),
        view("v1", &a.profile_id, T0 + 50, 2),
        view("v1", &a.profile_id, T0 + 50, 2), // repeated within the call
        view("v2", &b.profile_id, T0 + 60, 3),
        order("o4", &b.profile_id, T0 + 5, 100, "EUR"),
        refund,
        order("o5", &missing, T0, 100, "USD"),
    ];
    let before = f.store.changes_after(0, 1000).await.unwrap().len();
    let out = f.store.apply_aggregates(&batch, T0 + 100).await.unwrap();
    assert_eq!(
        (out.applied, out.duplicates, out.unknown_profiles),
        (7, 1, 1)
    );
    let mut touched: Vec<&str> = out.touched.iter().map(|(p, _)| p.as_str()).collect();
    touched.sort_unstable();
    let mut expected = vec![a.profile_id.as_str(), b.profile_id.as_str()];
    expected.sort_unstable();
    assert_eq!(touched, expected);
    // one feed row per profile written, at the version returned
    let changes = f.store.changes_after(0, 1000).await.unwrap();
    assert_eq!(changes.len() - before, 2);
    for (p, v) in &out.touched {
        assert_eq!(f.store.get(p).await.unwrap().version, *v);
    }
    let ra = f.store.get(&a.profile_id).await.unwrap();
    assert_eq!((ra.order_count, ra.refund_count), (3, 0));
    assert_eq!(ra.first_order_at, Some(T0 + 10));
    assert_eq!(ra.last_order_at, Some(T0 + 30));
    assert_eq!(ra.last_seen_at, Some(T0 + 50));
    let spend: Vec<(&str, i64, i64)> = ra
        .spend
        .iter()
        .map(|s| (s.currency.as_str(), s.gross_minor, s.refunded_minor))
        .collect();
    assert_eq!(spend, vec![("KRW", 700, 0), ("USD", 1500, 0)]);
    assert_eq!(ra.engagement["email_opened"], 1);
    assert_eq!(ra.engagement["product_viewed"], 2);
    let rb = f.store.get(&b.profile_id).await.unwrap();
    assert_eq!((rb.order_count, rb.refund_count), (1, 1));
    assert_eq!(rb.spend.len(), 1);
    assert_eq!(
        (rb.spend[0].gross_minor, rb.spend[0].refunded_minor),
        (100, 250)
    );
    assert_eq!(rb.first_order_at, Some(T0 + 5));
    assert_eq!(rb.last_seen_at, Some(T0 + 60));
    // the whole call retried: nothing counted twice, nothing written
    let again = f.store.apply_aggregates(&batch, T0 + 200).await.unwrap();
    assert_eq!(
        (again.applied, again.duplicates, again.unknown_profiles),
        (0, 9, 0)
    );
    assert!(again.touched.is_empty());
    assert_eq!(
        f.store.changes_after(0, 1000).await.unwrap().len(),
        changes.len()
    );
    let ra2 = f.store.get(&a.profile_id).await.unwrap();
    assert_eq!(ra2.order_count, 3);
    assert_eq!(ra2.version, ra.version);
}

async fn concurrent_retries_of_the_same_deltas_count_once(e: Engine) {
    let f = fixture(e, 5).await;
    let p = f
        .store
        .resolve(&[f.customer("race")], T0)
        .await
        .unwrap()
        .profile_id;
    let batch: Vec<AggregateDelta> = (0..200)
        .map(|i| order(&format!("race-{i}"), &p, T0 + i, 10, "USD"))
        .collect();
    let mut tasks = Vec::new();
    for n in 0..4 {
        let store = f.store.clone();
        // each task sends the batch in a different order, so the inserts interleave
        let mut mine = batch.clone();
        mine.rotate_left(n * 50);
        tasks.push(tokio::spawn(async move {
            store.apply_aggregates(&mine, T0).await.unwrap()
        }));
    }
    let mut applied = 0;
    for t in tasks {
        let out = t.await.unwrap();
        assert_eq!(out.applied + out.duplicates, 200);
        applied += out.applied;
    }
    assert_eq!(applied, 200);
    let r = f.store.get(&p).await.unwrap();
    assert_eq!(r.order_count, 200);
    assert_eq!(r.spend[0].gross_minor, 2000);
}

async fn deltas_applied_while_profiles_merge_all_land_on_the_survivor(e: Engine) {
    let f = fixture(e, 50).await;
    let pairs = 20;
    let mut ids = Vec::new();
    for i in 0..pairs {
        let anon = f
            .store
            .resolve(&[f.anonymous(&format!("m-cookie-{i}"))], T0)
            .await
            .unwrap()
            .profile_id;
        let known = f
            .store
            .resolve(&[f.email(&format!("m{i}@x.io"))], T0)
            .await
            .unwrap()
            .profile_id;
        ids.push((anon, known));
    }
    let rounds = 5;
    let appliers: Vec<_> = (0..2)
        .map(|t| {
            let store = f.store.clone();
            let ids = ids.clone();
            tokio::spawn(async move {
                for r in 0..rounds {
                    let batch: Vec<AggregateDelta> = ids
                        .iter()
                        .enumerate()
                        .flat_map(|(i, (anon, known))| {
                            [
                                order(&format!("a-{t}-{r}-{i}"), anon, T0 + r, 1, "USD"),
                                order(&format!("k-{t}-{r}-{i}"), known, T0 + r, 1, "USD"),
                            ]
                        })
                        .collect();
                    let out = store.apply_aggregates(&batch, T0).await.unwrap();
                    assert_eq!(out.applied, batch.len() as u32);
                }
            })
        })
        .collect();
    let mergers: Vec<_> = (0..pairs)
        .map(|i| {
            let store = f.store.clone();
            let keys = vec![
                f.anonymous(&format!("m-cookie-{i}")),
                f.email(&format!("m{i}@x.io")),
            ];
            tokio::spawn(async move {
                if i % 2 == 0 {
                    store.resolve(&keys, T0 + 1).await.unwrap();
                } else {
                    store.resolve_many(&[keys], T0 + 1).await.unwrap();
                }
            })
        })
        .collect();
    for t in appliers.into_iter().chain(mergers) {
        t.await.unwrap();
    }
    let per_pair = 2 * 2 * rounds;
    for (anon, known) in &ids {
        let a = f.store.get(anon).await.unwrap();
        let k = f.store.get(known).await.unwrap();
        assert_eq!(a.id, k.id, "merged");
        assert_eq!(a.order_count, per_pair, "{a:?}");
        assert_eq!(a.spend[0].gross_minor, per_pair);
    }
}

/// `order` at position `pos` of a feed.
fn at(pos: i64, key: &str, profile: &str) -> AggregateDelta {
    AggregateDelta {
        position: pos,
        ..order(key, profile, T0 + pos, 10, "USD")
    }
}

async fn a_positioned_delta_counts_once_across_retries(e: Engine) {
    let f = fixture(e, 5).await;
    let p = f.store.resolve(&[f.customer("pos")], T0).await.unwrap();
    let gone = f
        .store
        .resolve(&[f.customer("pos-gone")], T0)
        .await
        .unwrap();
    f.store.erase(&gone.profile_id, "test", T0).await.unwrap();
    let pid = p.profile_id.as_str();
    let page: Vec<AggregateDelta> = (1..=3).map(|i| at(i, &format!("pe-{i}"), pid)).collect();
    let out = f
        .store
        .apply_feed_aggregates("log-a", &page, T0)
        .await
        .unwrap();
    assert_eq!(
        (out.applied, out.duplicates, out.unknown_profiles),
        (3, 0, 0)
    );
    let changes = f.store.changes_after(0, 1000).await.unwrap().len();
    // the same page again: nothing counted, nothing written
    let again = f
        .store
        .apply_feed_aggregates("log-a", &page, T0)
        .await
        .unwrap();
    assert_eq!(
        (again.applied, again.duplicates, again.unknown_profiles),
        (0, 3, 0)
    );
    assert!(again.touched.is_empty());
    assert_eq!(f.store.changes_after(0, 1000).await.unwrap().len(), changes);
    // an overlapping page with more deltas: only those past the stored position count, by
    // position alone (5 reuses an old key and counts; an erased profile's 6 is recorded)
    let mut longer: Vec<AggregateDelta> = (2..=4).map(|i| at(i, &format!("pe-{i}"), pid)).collect();
    longer.push(at(5, "pe-1", pid));
    longer.push(at(6, "pe-6", &gone.profile_id));
    let out = f
        .store
        .apply_feed_aggregates("log-a", &longer, T0)
        .await
        .unwrap();
    assert_eq!(
        (out.applied, out.duplicates, out.unknown_profiles),
        (2, 2, 1)
    );
    // a new key at or below the stored position is not counted either
    let stale = [at(6, "pe-new", pid)];
    let out = f
        .store
        .apply_feed_aggregates("log-a", &stale, T0)
        .await
        .unwrap();
    assert_eq!((out.applied, out.duplicates), (0, 1));
    let r = f.store.get(pid).await.unwrap();
    assert_eq!(r.order_count, 5);
    assert_eq!(r.spend[0].gross_minor, 50);
    assert_eq!(r.last_order_at, Some(T0 + 5));
}

async fn concurrent_overlapping_pages_count_each_delta_once(e: Engine) {
    let f = fixture(e, 5).await;
    let pid = f
        .store
        .resolve(&[f.customer("pos-race")], T0)
        .await
        .unwrap()
        .profile_id;
    let delta = |i: i64| at(i, &format!("race-{i}"), &pid);
    let first: Vec<AggregateDelta> = (1..=50).map(delta).collect();
    f.store
        .apply_feed_aggregates("log-race", &first, T0)
        .await
        .unwrap();
    // pages as followers of the log send them: each starts at or below the stored position
    // (1, 26, 51) and they overlap; each is also sent twice
    let mut tasks = Vec::new();
    for (from, to) in [(1, 100), (26, 150), (51, 200), (1, 120)] {
        for _ in 0..2 {
            let store = f.store.clone();
            let page: Vec<AggregateDelta> = (from..=to).map(delta).collect();
            tasks.push(tokio::spawn(async move {
                store
                    .apply_feed_aggregates("log-race", &page, T0)
                    .await
                    .unwrap()
            }));
        }
    }
    let mut applied = 0;
    for t in tasks {
        let out = t.await.unwrap();
        applied += out.applied;
    }
    assert_eq!(applied, 150);
    let r = f.store.get(&pid).await.unwrap();
    assert_eq!(r.order_count, 200);
    assert_eq!(r.spend[0].gross_minor, 2000);
}

async fn feeds_keep_separate_positions(e: Engine) {
    let f = fixture(e, 5).await;
    let pid = f
        .store
        .resolve(&[f.customer("pos-feeds")], T0)
        .await
        .unwrap()
        .profile_id;
    let page = |feed: &str, range: std::ops::RangeInclusive<i64>| -> Vec<AggregateDelta> {
        range.map(|i| at(i, &format!("{feed}-{i}"), &pid)).collect()
    };
    for feed in ["log-x", "log-y"] {
        let out = f
            .store
            .apply_feed_aggregates(feed, &page(feed, 1..=3), T0)
            .await
            .unwrap();
        assert_eq!(out.applied, 3, "{feed}");
    }
    let out = f
        .store
        .apply_feed_aggregates("log-x", &page("log-x", 1..=3), T0)
        .await
        .unwrap();
    assert_eq!((out.applied, out.duplicates), (0, 3));
    let out = f
        .store
        .apply_feed_aggregates("log-y", &page("log-y", 3..=4), T0)
        .await
        .unwrap();
    assert_eq!((out.applied, out.duplicates), (1, 1));
    assert_eq!(f.store.get(&pid).await.unwrap().order_count, 7);
}

async fn unpositioned_deltas_still_use_their_keys(e: Engine) {
    let f = fixture(e, 5).await;
    let pid = f
        .store
        .resolve(&[f.customer("pos-keys")], T0)
        .await
        .unwrap()
        .profile_id;
    let pid = pid.as_str();
    // delivered by key before the sender switched to positions: the feed's first call checks
    // keys too, so the redelivered k-1 is not counted again
    let keyed = [order("k-1", pid, T0, 10, "USD")];
    assert_eq!(
        f.store.apply_aggregates(&keyed, T0).await.unwrap().applied,
        1
    );
    let out = f
        .store
        .apply_feed_aggregates("log-k", &[at(1, "k-1", pid), at(2, "k-2", pid)], T0)
        .await
        .unwrap();
    assert_eq!((out.applied, out.duplicates), (1, 1));
    // keyed deltas beside a feed keep their keys (k-2 was recorded by the first call)
    let refunds = [
        order("k-2", pid, T0, 10, "USD"),
        order("k-3", pid, T0, 10, "USD"),
    ];
    let out = f.store.apply_aggregates(&refunds, T0).await.unwrap();
    assert_eq!((out.applied, out.duplicates), (1, 1));
    let out = f.store.apply_aggregates(&refunds, T0).await.unwrap();
    assert_eq!((out.applied, out.duplicates), (0, 2));
    // later positioned deltas record no key: the key idempotency of a keyed delta is its own
    let out = f
        .store
        .apply_feed_aggregates("log-k", &[at(3, "k-4", pid)], T0)
        .await
        .unwrap();
    assert_eq!(out.applied, 1);
    let out = f
        .store
        .apply_aggregates(&[order("k-4", pid, T0, 10, "USD")], T0)
        .await
        .unwrap();
    assert_eq!(out.applied, 1);
    assert_eq!(f.store.get(pid).await.unwrap().order_count, 5);
}

/// One delta per profile carrying every row counter (the `i`-th kind counted `(i + 1) * scale`)
/// and one name outside the row (`loyalty.quiz_done`, counted `scale`).
fn every_counter(key: &str, profile: &str, scale: i64) -> AggregateDelta {
    let mut engagement: Vec<(String, i64)> = ROW_ENGAGEMENT
        .iter()
        .zip(1..)
        .map(|((kind, _), i)| ((*kind).to_string(), i * scale))
        .collect();
    engagement.push(("loyalty.quiz_done".into(), scale));
    AggregateDelta {
        key: key.into(),
        profile_id: profile.into(),
        occurred_at: T0,
        engagement,
        ..AggregateDelta::default()
    }
}

fn counters_times(scale: i64) -> std::collections::BTreeMap<String, i64> {
    every_counter("", "", scale)
        .engagement
        .into_iter()
        .collect()
}

async fn every_engagement_counter_adds_up_across_a_merge(e: Engine) {
    let f = fixture(e, 5).await;
    let a = f.store.resolve(&[f.customer("ea")], T0).await.unwrap();
    let b = f
        .store
        .resolve(&[f.email("eb@x.io")], T0 + 1)
        .await
        .unwrap();
    // keyed deltas and a feed page: the two ways ApplyAggregates folds
    f.store
        .apply_aggregates(&[every_counter("ka", &a.profile_id, 1)], T0)
        .await
        .unwrap();
    let mut positioned = every_counter("kb", &b.profile_id, 10);
    positioned.position = 1;
    f.store
        .apply_feed_aggregates("log-e", &[positioned], T0)
        .await
        .unwrap();
    assert_eq!(
        f.store.get(&a.profile_id).await.unwrap().engagement,
        counters_times(1)
    );
    assert_eq!(
        f.store.get(&b.profile_id).await.unwrap().engagement,
        counters_times(10)
    );

    let merged = f
        .store
        .resolve(&[f.customer("ea"), f.email("eb@x.io")], T0 + 2)
        .await
        .unwrap();
    assert_eq!(merged.merged, vec![b.profile_id.clone()]);
    let p = f.store.get(&a.profile_id).await.unwrap();
    assert_eq!(p.engagement, counters_times(11));
    // counted after the merge, through the loser's id: lands on the survivor once
    f.store
        .apply_aggregates(&[every_counter("kc", &b.profile_id, 100)], T0 + 3)
        .await
        .unwrap();
    let p = f.store.get(&b.profile_id).await.unwrap();
    assert_eq!(p.id, a.profile_id);
    assert_eq!(p.engagement, counters_times(111));
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() { super::$name(super::Engine::Postgres).await })*
        }
        mod postgres_generic {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() { super::$name(super::Engine::PostgresGeneric).await })*
        }
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() { super::$name(super::Engine::Sqlite).await })*
        }
    };
}

conformance!(
    resolving_unknown_identifiers_creates_one_profile,
    merging_two_profiles_keeps_all_orders,
    a_shared_device_links_at_most_the_cap,
    aggregates_count_each_event_once_in_any_order,
    consent_history_is_kept_and_the_latest_decision_counts,
    erasure_removes_the_person_and_suppresses_their_identifiers,
    the_changes_feed_lists_every_write_in_order,
    concurrent_resolves_of_the_same_identifiers_create_one_profile,
    a_missing_profile_is_not_found,
    first_time_customers_are_created_in_bulk,
    bulk_creation_and_resolution_race_to_one_profile,
    resolving_many_sets_at_once_matches_one_call_per_set,
    bulk_resolution_and_single_resolution_race_to_one_profile,
    a_batch_of_deltas_counts_each_key_once_with_one_change_per_profile,
    concurrent_retries_of_the_same_deltas_count_once,
    deltas_applied_while_profiles_merge_all_land_on_the_survivor,
    a_positioned_delta_counts_once_across_retries,
    concurrent_overlapping_pages_count_each_delta_once,
    feeds_keep_separate_positions,
    unpositioned_deltas_still_use_their_keys,
    every_engagement_counter_adds_up_across_a_merge,
);
