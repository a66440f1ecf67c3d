//! The store conformance suite: every test runs against PostgreSQL and against SQLite, so the
//! embedded default behaves exactly like production.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;

use clientele_experiments::ExperimentStore;
use clientele_experiments::events::{EventFact, ORDER_COMPLETED};
use clientele_experiments::model::{
    AggregateQuery, ConversionRecord, ExperimentRecord, ExposureRecord, Lifecycle, MetricDef,
    ProfileChange,
};
use clientele_experiments::store::StoreError;
use clientele_proto::v1 as pb;
use support::{Engine, experiment, fixture};

const T0: i64 = 1_700_000_000_000_000;
const HOUR: i64 = 3_600_000_000;

fn record(def: pb::Experiment) -> ExperimentRecord {
    ExperimentRecord {
        key: def.key.clone(),
        definition: pb::Experiment {
            hash_attribute: "profile_id".into(),
            ..def
        },
        status: Lifecycle::Draft,
        version: 1,
        created_at: T0,
        updated_at: T0,
        start_time: None,
        stop_time: None,
        released_variant: None,
        stop_reason: String::new(),
    }
}

fn metric(key: &str, metric_type: pb::MetricType, currency: &str) -> (MetricDef, String) {
    (
        MetricDef {
            key: key.into(),
            metric_type: metric_type as i32,
            currency: currency.into(),
            event_derived: false,
            defined_by: String::new(),
        },
        "experiment.primary_metric".into(),
    )
}

fn exposure(key: &str, unit: &str, variant: i32, at: i64, pre: f64) -> ExposureRecord {
    ExposureRecord {
        experiment_key: key.into(),
        unit_id: unit.into(),
        variant_index: variant,
        exposed_at: at,
        profile_id: String::new(),
        pre_period_value: pre,
    }
}

fn conversion(idem: &str, metric: &str, unit: &str, at: i64, value: i64) -> ConversionRecord {
    ConversionRecord {
        idempotency_key: idem.into(),
        metric_key: metric.into(),
        unit_ids: BTreeMap::from([("profile_id".to_owned(), unit.to_owned())]),
        occurred_at: at,
        value_minor: value,
        currency: "USD".into(),
    }
}

async fn creating_twice_is_idempotent_and_a_different_body_is_rejected(e: Engine) {
    let f = fixture(e).await;
    let r = record(experiment("exp-a", &[0.5, 0.5]));
    let (stored, created) = f.store.create(&r, &[]).await.unwrap();
    assert!(created);
    assert_eq!(stored.version, 1);
    assert_eq!(stored.definition, r.definition);
    let (again, created) = f.store.create(&r, &[]).await.unwrap();
    assert!(!created);
    assert_eq!(again, stored);
    let mut other = r.clone();
    other.definition.hypothesis = "something else".into();
    assert!(matches!(
        f.store.create(&other, &[]).await,
        Err(StoreError::ExperimentExists(k)) if k == "exp-a"
    ));
}

async fn a_missing_experiment_is_not_found(e: Engine) {
    let f = fixture(e).await;
    assert!(matches!(f.store.get("nope").await, Err(StoreError::NotFound(k)) if k == "nope"));
    assert!(f.store.get_many(&["nope".into()]).await.unwrap().is_empty());
}

async fn metric_definitions_must_agree_across_experiments(e: Engine) {
    let f = fixture(e).await;
    let usd = metric("revenue", pb::MetricType::Continuous, "USD");
    f.store
        .create(&record(experiment("exp-a", &[0.5, 0.5])), &[usd])
        .await
        .unwrap();
    let eur = metric("revenue", pb::MetricType::Continuous, "EUR");
    let err = f
        .store
        .create(&record(experiment("exp-b", &[0.5, 0.5])), &[eur])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::MetricConflict { field, defined_by, .. }
            if field == "experiment.primary_metric" && defined_by == "exp-a"),
        "{err:?}"
    );
    // Nothing of the refused experiment was written.
    assert!(matches!(
        f.store.get("exp-b").await,
        Err(StoreError::NotFound(_))
    ));
    let def = f.store.metric_def("revenue").await.unwrap().unwrap();
    assert_eq!(def.currency, "USD");
}

async fn lifecycle_changes_are_compare_and_swap(e: Engine) {
    let f = fixture(e).await;
    f.store
        .create(&record(experiment("exp-a", &[0.5, 0.5])), &[])
        .await
        .unwrap();
    let started = f.store.start("exp-a", 1, T0 + 10).await.unwrap();
    assert_eq!(started.status, Lifecycle::Running);
    assert_eq!(started.start_time, Some(T0 + 10));
    assert_eq!(started.version, 2);
    assert!(matches!(
        f.store.stop("exp-a", 1, None, "stale", T0 + 20).await,
        Err(StoreError::VersionConflict { actual: 2, .. })
    ));
    let stopped = f
        .store
        .stop("exp-a", 2, Some(1), "winner", T0 + 20)
        .await
        .unwrap();
    assert_eq!(stopped.status, Lifecycle::Stopped);
    assert_eq!(stopped.released_variant, Some(1));
    assert_eq!(stopped.stop_reason, "winner");
    let listed = f.store.list(&[Lifecycle::Stopped], "", 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(
        f.store
            .list(&[Lifecycle::Running], "", 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn overlapping_namespace_ranges_cannot_run_together(e: Engine) {
    let f = fixture(e).await;
    let ns = |start, end| pb::Namespace {
        id: "checkout".into(),
        range_start: start,
        range_end: end,
    };
    for (key, range) in [
        ("a", ns(0.0, 0.5)),
        ("b", ns(0.5, 1.0)),
        ("c", ns(0.4, 0.6)),
    ] {
        let mut def = experiment(key, &[0.5, 0.5]);
        def.namespace = Some(range);
        f.store.create(&record(def), &[]).await.unwrap();
    }
    f.store.start("a", 1, T0).await.unwrap();
    f.store.start("b", 1, T0).await.unwrap();
    let err = f.store.start("c", 1, T0).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::NamespaceOverlap { namespace, .. } if namespace == "checkout"),
        "{err:?}"
    );
    assert_eq!(f.store.get("c").await.unwrap().status, Lifecycle::Draft);
}

async fn the_first_exposure_is_kept_for_good(e: Engine) {
    let f = fixture(e).await;
    let first = f
        .store
        .log_exposure(&exposure("exp-a", "u1", 1, T0, 12.5))
        .await
        .unwrap();
    assert!(first.first);
    let again = f
        .store
        .log_exposure(&exposure("exp-a", "u1", 0, T0 + 99, 0.0))
        .await
        .unwrap();
    assert!(!again.first);
    assert_eq!(again.exposure.variant_index, 1);
    assert_eq!(again.exposure.exposed_at, T0);
    assert!((again.exposure.pre_period_value - 12.5).abs() < 1e-12);
    let found = f
        .store
        .exposures(&[("exp-a".into(), "u1".into()), ("exp-a".into(), "u2".into())])
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
}

async fn conversions_are_recorded_exactly_once_per_key(e: Engine) {
    let f = fixture(e).await;
    let c = conversion("k1", "revenue", "u1", T0, 500);
    assert!(!f.store.record_conversion(&c).await.unwrap());
    assert!(f.store.record_conversion(&c).await.unwrap());
    let mut changed = c.clone();
    changed.value_minor = 501;
    assert!(matches!(
        f.store.record_conversion(&changed).await,
        Err(StoreError::IdempotencyConflict(k)) if k == "k1"
    ));
}

async fn aggregates_give_per_variant_sufficient_statistics(e: Engine) {
    let f = fixture(e).await;
    // control: u1 (x=1) buys 100 + 50, u2 (x=2) nothing; treatment: u3 (x=3) buys 300,
    // u4 (x=0) buys outside the window and u5 before exposure; a EUR value is ignored.
    for (unit, variant, x) in [
        ("u1", 0, 1.0),
        ("u2", 0, 2.0),
        ("u3", 1, 3.0),
        ("u4", 1, 0.0),
        ("u5", 1, 0.5),
    ] {
        f.store
            .log_exposure(&exposure("exp-a", unit, variant, T0, x))
            .await
            .unwrap();
    }
    for c in [
        conversion("c1", "revenue", "u1", T0 + HOUR, 100),
        conversion("c2", "revenue", "u1", T0 + 2 * HOUR, 50),
        conversion("c3", "revenue", "u3", T0 + HOUR, 300),
        conversion("c4", "revenue", "u4", T0 + 200 * HOUR, 999),
        conversion("c5", "revenue", "u5", T0 - HOUR, 999),
        conversion("c6", "other", "u2", T0 + HOUR, 999),
        ConversionRecord {
            currency: "EUR".into(),
            ..conversion("c7", "revenue", "u2", T0 + HOUR, 999)
        },
    ] {
        f.store.record_conversion(&c).await.unwrap();
    }
    let q = AggregateQuery {
        experiment_key: "exp-a".into(),
        hash_attribute: "profile_id".into(),
        metric_key: "revenue".into(),
        window_micros: 168 * HOUR,
        currency: Some("USD".into()),
        event_derived: false,
    };
    let rows = f.store.aggregate(&q).await.unwrap();
    assert_eq!(rows.len(), 2);
    let (c, t) = (rows[0], rows[1]);
    assert_eq!((c.variant, c.units, c.converted), (0, 2, 1));
    assert_eq!((t.variant, t.units, t.converted), (1, 3, 1));
    assert_eq!((c.sum_value, c.sum_value_squares), (150.0, 22_500.0));
    assert_eq!((t.sum_value, t.sum_value_squares), (300.0, 90_000.0));
    assert_eq!(
        (c.sum_x, c.sum_x_squares, c.sum_x_value, c.sum_x_converted),
        (3.0, 5.0, 150.0, 1.0)
    );
    assert_eq!(
        (t.sum_x, t.sum_x_squares, t.sum_x_value, t.sum_x_converted),
        (3.5, 9.25, 900.0, 3.0)
    );
    // Without a currency filter (a BINARY metric) the EUR conversion counts for u2.
    let binary = f
        .store
        .aggregate(&AggregateQuery {
            currency: None,
            ..q
        })
        .await
        .unwrap();
    assert_eq!(binary[0].converted, 2);
}

fn order_fact(key: &str, order_id: &str, profile: &str, at: i64, value: i64) -> EventFact {
    EventFact::Order {
        idempotency_key: key.into(),
        order_id: order_id.into(),
        profile_id: profile.into(),
        occurred_at: at,
        value_minor: value,
        currency: "USD".into(),
    }
}

fn refund_fact(key: &str, order_id: &str, amount: i64) -> EventFact {
    EventFact::Refund {
        idempotency_key: key.into(),
        order_id: order_id.into(),
        amount_minor: amount,
        currency: "USD".into(),
        own: None,
    }
}

fn revenue_query(experiment: &str) -> AggregateQuery {
    AggregateQuery {
        experiment_key: experiment.into(),
        hash_attribute: "profile_id".into(),
        metric_key: ORDER_COMPLETED.into(),
        window_micros: 168 * HOUR,
        currency: Some("USD".into()),
        event_derived: true,
    }
}

/// (variant, units, converted, sum of values) per variant.
async fn figures(f: &support::Fixture, q: &AggregateQuery) -> Vec<(i32, u64, u64, f64)> {
    f.store
        .aggregate(q)
        .await
        .unwrap()
        .iter()
        .map(|a| (a.variant, a.units, a.converted, a.sum_value))
        .collect()
}

async fn a_feed_batch_applies_only_after_the_cursor_it_was_read_from(e: Engine) {
    let f = fixture(e).await;
    let facts = [order_fact("event:s/1", "o1", "p1", T0, 100)];
    assert_eq!(
        f.store
            .apply_events("ingest", None, "c1", &facts)
            .await
            .unwrap(),
        1
    );
    // A second consumer that read from the start lost the race: nothing is written.
    assert!(matches!(
        f.store.apply_events("ingest", None, "c1", &facts).await,
        Err(StoreError::CursorMoved(feed)) if feed == "ingest"
    ));
    assert!(matches!(
        f.store
            .apply_events("ingest", Some("c0"), "c2", &facts)
            .await,
        Err(StoreError::CursorMoved(_))
    ));
    assert_eq!(
        f.store.feed_cursor("ingest").await.unwrap().as_deref(),
        Some("c1")
    );
    // Redelivered facts after the cursor write nothing twice.
    assert_eq!(
        f.store
            .apply_events("ingest", Some("c1"), "c2", &facts)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        f.store.feed_cursor("ingest").await.unwrap().as_deref(),
        Some("c2")
    );
}

async fn refunds_reduce_their_orders_revenue_even_when_they_arrive_first(e: Engine) {
    let f = fixture(e).await;
    f.store
        .log_exposure(&exposure("exp-r", "p1", 0, T0, 0.0))
        .await
        .unwrap();
    let facts = [
        refund_fact("refund:s/r1", "o1", 300),
        order_fact("event:s/1", "o1", "p1", T0 + HOUR, 1_000),
        // The same order id again (another event): the first one wins.
        order_fact("event:s/2", "o1", "p1", T0 + HOUR, 5_000),
        refund_fact("refund:s/r2", "o1", 200),
        // A refund of an order bought before exposure reduces nothing in the experiment.
        order_fact("event:s/3", "o0", "p1", T0 - HOUR, 700),
        refund_fact("refund:s/r3", "o0", 700),
    ];
    f.store
        .apply_events("ingest", None, "c1", &facts)
        .await
        .unwrap();
    assert_eq!(
        figures(&f, &revenue_query("exp-r")).await,
        vec![(0, 1, 1, 500.0)]
    );
}

async fn merged_profiles_are_one_unit_and_their_purchases_count_once(e: Engine) {
    let f = fixture(e).await;
    // a and b are one person (b merged into a, then a into s): the earliest exposure, b's,
    // is the unit; c is someone else.
    for (unit, variant, at) in [("b", 1, T0), ("a", 0, T0 + HOUR), ("c", 0, T0)] {
        f.store
            .log_exposure(&exposure("exp-m", unit, variant, at, 0.0))
            .await
            .unwrap();
    }
    let merges = [
        ProfileChange::Merged {
            survivor: "a".into(),
            merged: vec!["b".into()],
        },
        ProfileChange::Merged {
            survivor: "s".into(),
            merged: vec!["a".into()],
        },
    ];
    f.store
        .apply_profile_changes("profiles", None, "2", &merges, T0)
        .await
        .unwrap();
    let facts = [
        order_fact("event:s/1", "o1", "s", T0 + 2 * HOUR, 400),
        order_fact("event:s/2", "o2", "a", T0 + 3 * HOUR, 100),
    ];
    f.store
        .apply_events("ingest", None, "c1", &facts)
        .await
        .unwrap();
    assert_eq!(
        figures(&f, &revenue_query("exp-m")).await,
        vec![(0, 1, 0, 0.0), (1, 1, 1, 500.0)]
    );
}

async fn erasure_anonymises_without_changing_aggregates_and_replays_as_a_no_op(e: Engine) {
    let f = fixture(e).await;
    for (unit, variant, at) in [("b", 1, T0), ("a", 0, T0 + HOUR), ("c", 0, T0)] {
        f.store
            .log_exposure(&exposure("exp-e", unit, variant, at, 1.0))
            .await
            .unwrap();
    }
    // An experiment on anonymous ids whose exposure names the profile.
    f.store
        .log_exposure(&ExposureRecord {
            profile_id: "a".into(),
            ..exposure("exp-anon", "device-9", 1, T0, 0.0)
        })
        .await
        .unwrap();
    f.store
        .apply_profile_changes(
            "profiles",
            None,
            "1",
            &[ProfileChange::Merged {
                survivor: "a".into(),
                merged: vec!["b".into()],
            }],
            T0,
        )
        .await
        .unwrap();
    let facts = [
        order_fact("event:s/1", "o1", "a", T0 + 2 * HOUR, 400),
        order_fact("event:s/2", "o2", "c", T0 + 2 * HOUR, 50),
    ];
    f.store
        .apply_events("ingest", None, "c1", &facts)
        .await
        .unwrap();
    let anon = AggregateQuery {
        experiment_key: "exp-anon".into(),
        hash_attribute: "anonymous_id".into(),
        ..revenue_query("exp-anon")
    };
    let before = (
        figures(&f, &revenue_query("exp-e")).await,
        figures(&f, &anon).await,
    );
    assert_eq!(before.0, vec![(0, 1, 1, 50.0), (1, 1, 1, 400.0)]);
    assert_eq!(before.1, vec![(1, 1, 1, 400.0)]);

    let erase = [ProfileChange::Erased("a".into())];
    f.store
        .apply_profile_changes("profiles", Some("1"), "2", &erase, T0)
        .await
        .unwrap();
    let gone = f
        .store
        .exposures(&[
            ("exp-e".into(), "a".into()),
            ("exp-e".into(), "b".into()),
            ("exp-anon".into(), "device-9".into()),
        ])
        .await
        .unwrap();
    assert!(gone.is_empty(), "{gone:?}");
    let after = (
        figures(&f, &revenue_query("exp-e")).await,
        figures(&f, &anon).await,
    );
    assert_eq!(after, before);
    // Redelivered, the erasure finds nothing; later events of the erased ids are dropped.
    f.store
        .apply_profile_changes("profiles", Some("2"), "2", &erase, T0)
        .await
        .unwrap();
    let late = [order_fact("event:s/9", "o9", "b", T0 + 3 * HOUR, 999)];
    assert_eq!(
        f.store
            .apply_events("ingest", Some("c1"), "c2", &late)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        (
            figures(&f, &revenue_query("exp-e")).await,
            figures(&f, &anon).await
        ),
        before
    );
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() { super::$name(super::Engine::Postgres).await })*
        }
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() { super::$name(super::Engine::Sqlite).await })*
        }
    };
}

conformance!(
    creating_twice_is_idempotent_and_a_different_body_is_rejected,
    a_missing_experiment_is_not_found,
    metric_definitions_must_agree_across_experiments,
    lifecycle_changes_are_compare_and_swap,
    overlapping_namespace_ranges_cannot_run_together,
    the_first_exposure_is_kept_for_good,
    conversions_are_recorded_exactly_once_per_key,
    aggregates_give_per_variant_sufficient_statistics,
    a_feed_batch_applies_only_after_the_cursor_it_was_read_from,
    refunds_reduce_their_orders_revenue_even_when_they_arrive_first,
    merged_profiles_are_one_unit_and_their_purchases_count_once,
    erasure_anonymises_without_changing_aggregates_and_replays_as_a_no_op,
);
