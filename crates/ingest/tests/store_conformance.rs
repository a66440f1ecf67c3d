//! The store conformance suite: every test runs against the PostgreSQL store and the SQLite
//! store, so the embedded default behaves exactly like production.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use clientele_ingest::EventStore;
use clientele_ingest::store::{CommitTurn, NewEvent, Outcome, StoreError, StreamMark};
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

/// Every deliverable aggregate delta: those in the log rows and the outbox's ready rows.
async fn deltas(s: &dyn EventStore) -> Vec<pb::AggregateDelta> {
    let log = s.log_deltas_after(0, 1000).await.unwrap();
    let outbox = s.outbox(1000).await.unwrap();
    log.iter()
        .filter_map(|r| r.delta.as_deref())
        .chain(outbox.iter().map(|r| r.delta.as_slice()))
        .map(|d| pb::AggregateDelta::decode(d).unwrap())
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
        "one delta per accepted event"
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
    // The refund waited in the outbox (its log row carries no delta); the orders did not.
    let waited: Vec<String> = s
        .outbox(1000)
        .await
        .unwrap()
        .iter()
        .map(|r| {
            pb::AggregateDelta::decode(r.delta.as_slice())
                .unwrap()
                .idempotency_key
        })
        .collect();
    assert_eq!(waited, vec!["web/r1"]);
    let ids: Vec<i64> = s.outbox(1000).await.unwrap().iter().map(|r| r.id).collect();
    s.outbox_done(&ids).await.unwrap();
    assert!(s.outbox(10).await.unwrap().is_empty());
}

/// The aggregate follower reads the log by `seq` behind a cursor while producers commit
/// concurrently: if a commit could become visible after a later `seq` (sequence values are
/// taken in one order and committed in another), the follower would move past it and its
/// delta would never be delivered. Every accepted event must reach the follower exactly once.
async fn the_log_follower_skips_no_event_under_concurrent_commits(e: Engine) {
    use std::collections::HashSet;
    let (s, _d) = store(e).await;
    let writers = 6;
    let batches = 25;
    let per_batch = 4;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let follower = {
        let s = s.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut cursor = 0;
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                let page = s.log_deltas_after(cursor, 7).await.unwrap();
                for r in &page {
                    let d = pb::AggregateDelta::decode(r.delta.as_deref().unwrap()).unwrap();
                    seen.push(d.idempotency_key);
                }
                match page.last() {
                    Some(last) => cursor = last.seq,
                    None if finished => return seen,
                    None => tokio::task::yield_now().await,
                }
            }
        })
    };
    let mut tasks = Vec::new();
    for w in 0..writers {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for b in 0..batches {
                let batch: Vec<NewEvent> = (0..per_batch)
                    .map(|i| view(&format!("w{w}-b{b}-e{i}"), 1))
                    .collect();
                let out = s.commit(&batch, None, T0).await.unwrap();
                assert!(out.iter().all(|o| *o == Outcome::Accepted));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = follower.await.unwrap();
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "an event was delivered twice");
    assert_eq!(
        seen.len(),
        writers * batches * per_batch,
        "the follower skipped events committed out of `seq` order"
    );
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
    assert_eq!(
        s.prune(T0 + 1, T0 + 1).await.unwrap(),
        0,
        "nothing left to forget"
    );
    // Outside the window the key is forgotten and the event is stored again.
    let out = s.commit(&[view("a", 1)], None, T0 + 2).await.unwrap();
    assert_eq!(out, vec![Outcome::Accepted]);
    // ... and remembered again, while younger keys are kept by the next pass.
    let out = s
        .commit(&[view("a", 1), view("b", 1)], None, T0 + 3)
        .await
        .unwrap();
    assert_eq!(out[0], Outcome::Duplicate(out_pid()));
    assert_eq!(
        s.prune(T0 + 3, T0).await.unwrap(),
        1,
        "only the second `a` is old"
    );
    let out = s.commit(&[view("b", 1)], None, T0 + 4).await.unwrap();
    assert_eq!(out, vec![Outcome::Duplicate(out_pid())]);
    assert_eq!(s.log_end().await.unwrap(), 3);
}

/// Two stream batches committed side by side, the second started first: the second waits for
/// the first to hold the log lock, so both advance the producer in sequence order and the log
/// holds the first batch's events before the second's.
async fn commits_in_turn_append_in_sequence_order(e: Engine) {
    let (s, _d) = store(e).await;
    let result = |o: &[Outcome]| vec![u8::try_from(o.len()).unwrap()];
    let (first_locked, second_after) = tokio::sync::oneshot::channel();
    let (gate, first_after) = tokio::sync::oneshot::channel::<()>();
    let second = {
        let s = s.clone();
        tokio::spawn(async move {
            let batch = vec![view("b1", 1), view("b2", 1)];
            s.commit_in_turn(
                &batch,
                Some(StreamMark {
                    producer_id: "p1",
                    sequence: 2,
                    result: &result,
                }),
                T0,
                CommitTurn {
                    after: Some(second_after),
                    locked: None,
                    looked_up: None,
                },
            )
            .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!second.is_finished(), "the second batch waits for its turn");
    let first = {
        let s = s.clone();
        tokio::spawn(async move {
            let batch = vec![view("a1", 1)];
            s.commit_in_turn(
                &batch,
                Some(StreamMark {
                    producer_id: "p1",
                    sequence: 1,
                    result: &result,
                }),
                T0,
                CommitTurn {
                    after: Some(first_after),
                    locked: Some(first_locked),
                    looked_up: None,
                },
            )
            .await
        })
    };
    gate.send(()).unwrap();
    assert_eq!(first.await.unwrap().unwrap(), vec![Outcome::Accepted]);
    assert_eq!(
        second.await.unwrap().unwrap(),
        vec![Outcome::Accepted, Outcome::Accepted]
    );
    assert_eq!(s.durable_sequence("p1").await.unwrap(), 2);
    let ids: Vec<String> = s
        .log_after(0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| event_id(&r.body))
        .collect();
    assert_eq!(ids, vec!["a1", "b1", "b2"]);
}

/// A resend racing its original: the second commit looks up its keys while the first (holding
/// the same event) waits for its turn, so the key is stored only after that lookup. The second
/// still reports the event as a duplicate and stores it once.
async fn a_key_stored_after_the_lookup_is_still_a_duplicate(e: Engine) {
    let (s, _d) = store(e).await;
    let (gate, first_after) = tokio::sync::oneshot::channel::<()>();
    let (first_locked, second_after) = tokio::sync::oneshot::channel();
    let first = {
        let s = s.clone();
        tokio::spawn(async move {
            s.commit_in_turn(
                &[view("x", 1), order("o1", "order-1")],
                None,
                T0,
                CommitTurn {
                    after: Some(first_after),
                    locked: Some(first_locked),
                    looked_up: None,
                },
            )
            .await
        })
    };
    let second = {
        let s = s.clone();
        tokio::spawn(async move {
            s.commit_in_turn(
                &[view("y", 1), view("x", 1), order("o2", "order-1")],
                None,
                T0,
                CommitTurn {
                    after: Some(second_after),
                    locked: None,
                    looked_up: None,
                },
            )
            .await
        })
    };
    // Both have looked up their keys (PostgreSQL) or wait for their turn (SQLite) by now.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    gate.send(()).unwrap();
    assert_eq!(
        first.await.unwrap().unwrap(),
        vec![Outcome::Accepted, Outcome::Accepted]
    );
    assert_eq!(
        second.await.unwrap().unwrap(),
        vec![
            Outcome::Accepted,
            Outcome::Duplicate(out_pid()),
            Outcome::Accepted
        ]
    );
    let log = s.log_after(0, 10).await.unwrap();
    let ids: Vec<String> = log.iter().map(|r| event_id(&r.body)).collect();
    assert_eq!(ids, vec!["x", "o1", "y", "o2"]);
    // The first completion of order-1 counts; the second order event carries no delta.
    let deltas = s.log_deltas_after(0, 10).await.unwrap();
    let counted: Vec<bool> = deltas.iter().map(|d| d.delta.is_some()).collect();
    assert_eq!(counted, vec![true, true, true, false]);
}

/// Keys looked up ahead of the commit (beside the batch's BatchResolve): the commit reports
/// what that lookup found, and a key stored after it is still caught under the log lock.
async fn keys_looked_up_ahead_count_like_the_commits_own_lookup(e: Engine) {
    let (s, _d) = store(e).await;
    s.commit(&[view("a", 1), view("b", 1)], None, T0)
        .await
        .unwrap();
    let batch = [view("a", 1), view("b", 2), view("c", 1), view("d", 1)];
    let keys: Vec<(&str, &str)> = batch
        .iter()
        .map(|e| (e.source.as_str(), e.event_id.as_str()))
        .collect();
    let looked_up = s.look_up_keys(&keys).await.unwrap();
    assert_eq!(
        looked_up.is_some(),
        matches!(e, Engine::Postgres),
        "only PostgreSQL looks keys up outside the commit"
    );
    // `c` is stored after the lookup (a resend racing its original).
    s.commit(&[view("c", 1)], None, T0).await.unwrap();
    let out = s
        .commit_in_turn(
            &batch,
            None,
            T0,
            CommitTurn {
                looked_up,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![
            Outcome::Duplicate(out_pid()),
            Outcome::Conflict(out_pid()),
            Outcome::Duplicate(out_pid()),
            Outcome::Accepted,
        ]
    );
    let log = s.log_after(0, 10).await.unwrap();
    let ids: Vec<String> = log.iter().map(|r| event_id(&r.body)).collect();
    assert_eq!(ids, vec!["a", "b", "c", "d"], "each event stored once");
}

fn event_id(body: &[u8]) -> String {
    pb::Event::decode(body).unwrap().event_id
}

fn out_pid() -> String {
    "00000000-0000-0000-0000-000000000001".to_string()
}

/// The forwarder reads its cursor and the page after it together, and moves the cursor only
/// from where it read it: a page another replica already moved past is not moved back.
async fn the_forwarders_page_starts_at_its_stored_cursor(e: Engine) {
    use clientele_ingest::store::AGGREGATES_FEED;
    let (s, _d) = store(e).await;
    let page_of = |limit: i64| {
        let s = s.clone();
        async move {
            s.log_deltas_after_cursor(AGGREGATES_FEED, limit)
                .await
                .unwrap()
        }
    };
    let advance = |from: i64, to: i64| {
        let s = s.clone();
        async move {
            s.advance_redeliverable_feed(AGGREGATES_FEED, from, to, T0)
                .await
        }
    };
    // A new log: the cursor is 0 and there is nothing after it.
    let (at, page) = page_of(10).await;
    assert_eq!((at, page.len()), (0, 0));
    let batch: Vec<NewEvent> = (0..5).map(|i| view(&format!("c{i}"), 1)).collect();
    s.commit(&batch, None, T0).await.unwrap();
    let (at, page) = page_of(3).await;
    assert_eq!((at, page.len()), (0, 3));
    let third = page[2].seq;
    advance(0, third).await.unwrap();
    let (at, page) = page_of(10).await;
    assert_eq!(at, third);
    let keys: Vec<String> = page
        .iter()
        .map(|r| {
            pb::AggregateDelta::decode(r.delta.as_deref().unwrap())
                .unwrap()
                .idempotency_key
        })
        .collect();
    assert_eq!(keys, ["web/c3", "web/c4"]);
    // A second forwarder that read the cursor at 0 cannot move it: nothing is written.
    let stale = advance(0, page[1].seq).await;
    assert!(matches!(stale, Err(StoreError::CursorMoved(_))));
    assert_eq!(s.feed_position(AGGREGATES_FEED).await.unwrap(), third);
    // The cursor's move is visible at once to every reader.
    advance(third, page[1].seq).await.unwrap();
    let (at, page) = page_of(10).await;
    assert_eq!((at, page.len()), (s.log_end().await.unwrap(), 0));
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
    the_log_follower_skips_no_event_under_concurrent_commits,
    commits_in_turn_append_in_sequence_order,
    a_key_stored_after_the_lookup_is_still_a_duplicate,
    keys_looked_up_ahead_count_like_the_commits_own_lookup,
    the_forwarders_page_starts_at_its_stored_cursor,
);
