//! The store conformance suite: every test runs against the PostgreSQL store and the SQLite
//! store, so the embedded default behaves exactly like production.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use clientele_ingest::EventStore;
use clientele_ingest::store::{NewEvent, Outcome, StoreError, StreamMark};
use clientele_ingest::validate::Effect;
use clientele_proto::v1 as pb;
use clientele_runtime::db::DatabaseTarget;
use clientele_runtime::{Settings, testing};
use prost::Message;

#[derive(Debug, Clone, Copy)]
enum Engine {
    Postgres,
    Sqlite,
}

async fn store(e: Engine) -> (Arc<dyn EventStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let target = match e {
        Engine::Postgres => DatabaseTarget::Postgres {
            url: testing::postgres_url(),
            schema: testing::unique_schema("ingest"),
        },
        Engine::Sqlite => DatabaseTarget::Sqlite {
            path: dir.path().join("ingest.db"),
        },
    };
    let settings = Settings {
        database_max_connections: 4,
        ..Default::default()
    };
    let s = clientele_ingest::setup::open_store(&settings, &target)
        .await
        .expect("test database (is PostgreSQL running?)");
    (s, dir)
}

const T0: i64 = 1_700_000_000_000_000;

fn ev(id: &str, hash: u8, effect: Effect) -> NewEvent {
    NewEvent {
        source: "web".into(),
        event_id: id.into(),
        hash: vec![hash; 32],
        profile_id: "00000000-0000-0000-0000-000000000001".into(),
        kind: pb::EventKind::PageViewed as i32,
        custom_name: None,
        occurred_at: T0,
        body: pb::Event {
            event_id: id.into(),
            ..Default::default()
        }
        .encode_to_vec(),
        redacted: vec![2],
        aggregate_key: format!("web/{id}"),
        effect,
    }
}

fn view(id: &str, hash: u8) -> NewEvent {
    ev(id, hash, Effect::Engagement("page_viewed"))
}

fn order(id: &str, order_id: &str) -> NewEvent {
    ev(
        id,
        1,
        Effect::Order {
            order_id: order_id.into(),
            currency: "USD".into(),
            amount: 100,
        },
    )
}

fn refund(id: &str, order_id: &str, full: bool) -> NewEvent {
    ev(
        id,
        1,
        Effect::Refund {
            order_id: order_id.into(),
            currency: "USD".into(),
            amount: 40,
            full,
        },
    )
}

async fn deltas(s: &dyn EventStore) -> Vec<pb::AggregateDelta> {
    s.outbox(1000)
        .await
        .unwrap()
        .iter()
        .map(|r| pb::AggregateDelta::decode(r.delta.as_slice()).unwrap())
        .collect()
}

async fn keys_deduplicate_and_detect_changed_content(e: Engine) {
    let (s, _d) = store(e).await;
    let out = s
        .commit(&[view("a", 1), view("b", 1)], None, T0)
        .await
        .unwrap();
    assert_eq!(out, vec![Outcome::Accepted, Outcome::Accepted]);
    let out = s
        .commit(&[view("a", 1), view("b", 2), view("c", 1)], None, T0)
        .await
        .unwrap();
    let pid = "00000000-0000-0000-0000-000000000001".to_string();
    assert_eq!(
        out,
        vec![
            Outcome::Duplicate(pid.clone()),
            Outcome::Conflict(pid),
            Outcome::Accepted
        ]
    );
    assert_eq!(s.log_end().await.unwrap(), 3);
    let log = s.log_after(0, 10).await.unwrap();
    assert_eq!(log.len(), 3);
    assert_eq!(log[0].redacted, vec![2]);
    assert_eq!(
        deltas(s.as_ref()).await.len(),
        3,
        "one outbox row per accepted event"
    );
}

async fn a_refund_waits_in_the_outbox_until_its_order_arrives(e: Engine) {
    let (s, _d) = store(e).await;
    s.commit(&[refund("r1", "o-1", true)], None, T0)
        .await
        .unwrap();
    assert!(deltas(s.as_ref()).await.is_empty());
    s.commit(&[order("x1", "o-1"), order("x2", "o-1")], None, T0)
        .await
        .unwrap();
    let mut d = deltas(s.as_ref()).await;
    d.sort_by(|a, b| a.idempotency_key.cmp(&b.idempotency_key));
    let keys: Vec<&str> = d.iter().map(|d| d.idempotency_key.as_str()).collect();
    assert_eq!(
        keys,
        vec!["web/r1", "web/x1"],
        "the second completion does not count"
    );
    assert_eq!((d[0].orders, d[0].refunds), (-1, 1));
    assert_eq!(d[1].orders, 1);
    // A second full refund counts as a refund but does not un-count the order again.
    s.commit(&[refund("r2", "o-1", true)], None, T0)
        .await
        .unwrap();
    let d = deltas(s.as_ref()).await;
    let r2 = d.iter().find(|d| d.idempotency_key == "web/r2").unwrap();
    assert_eq!((r2.orders, r2.refunds), (0, 1));
    let ids: Vec<i64> = s.outbox(1000).await.unwrap().iter().map(|r| r.id).collect();
    s.outbox_done(&ids).await.unwrap();
    assert!(s.outbox(10).await.unwrap().is_empty());
}

async fn stream_batches_advance_one_sequence_at_a_time(e: Engine) {
    let (s, _d) = store(e).await;
    let result = |o: &[Outcome]| vec![u8::try_from(o.len()).unwrap()];
    let mark = |sequence| StreamMark {
        producer_id: "p1",
        sequence,
        result: &result,
    };
    s.commit(&[view("a", 1)], Some(mark(1)), T0).await.unwrap();
    s.commit(&[], Some(mark(2)), T0).await.unwrap();
    assert_eq!(s.durable_sequence("p1").await.unwrap(), 2);
    // A stale writer (same sequence again, or a gap) fails and writes nothing.
    for seq in [2, 4] {
        let err = s
            .commit(&[view("z", 1)], Some(mark(seq)), T0)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Sequence { .. }), "{err}");
    }
    assert_eq!(s.log_end().await.unwrap(), 1);
    assert_eq!(
        s.batch_results("p1", 1, 5).await.unwrap(),
        vec![(1, vec![1]), (2, vec![0])]
    );
    assert_eq!(s.durable_sequence("unknown").await.unwrap(), 0);
}

async fn pruning_forgets_old_keys_and_results(e: Engine) {
    let (s, _d) = store(e).await;
    let result = |_: &[Outcome]| vec![1];
    s.commit(
        &[view("a", 1)],
        Some(StreamMark {
            producer_id: "p",
            sequence: 1,
            result: &result,
        }),
        T0,
    )
    .await
    .unwrap();
    assert_eq!(s.prune(T0, T0).await.unwrap(), 0);
    assert_eq!(s.prune(T0 + 1, T0 + 1).await.unwrap(), 2);
    // Outside the window the key is forgotten and the event would be stored again.
    let out = s.commit(&[view("a", 1)], None, T0 + 2).await.unwrap();
    assert_eq!(out, vec![Outcome::Accepted]);
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(#[tokio::test]
            async fn $name() { super::$name(super::Engine::Postgres).await; })*
        }
        mod sqlite {
            $(#[tokio::test]
            async fn $name() { super::$name(super::Engine::Sqlite).await; })*
        }
    };
}

both!(
    keys_deduplicate_and_detect_changed_content,
    a_refund_waits_in_the_outbox_until_its_order_arrives,
    stream_batches_advance_one_sequence_at_a_time,
    pruning_forgets_old_keys_and_results,
);
