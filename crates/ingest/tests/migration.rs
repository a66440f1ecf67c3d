//! Migration 0003 (dedup keys and aggregate deltas moved into the event log) carries the data of
//! a store written by migrations 0001–0002 over, on PostgreSQL and SQLite: remembered keys stay
//! remembered, forgotten ones stay forgotten, pending outbox rows are still delivered, and the
//! events already stored are not delivered a second time by the log follower.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clientele_ingest::store::{AGGREGATES_FEED, NewEvent, Outcome};
use clientele_ingest::validate::Effect;
use clientele_ingest::{POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};
use clientele_proto::v1 as pb;
use clientele_runtime::db::{self, DatabaseTarget};
use clientele_runtime::{Settings, testing};
use prost::Message;

const T0: i64 = 1_700_000_000_000_000;
const PID: &str = "00000000-0000-0000-0000-000000000001";

fn view(id: &str, hash: u8) -> NewEvent {
    NewEvent {
        source: "web".into(),
        event_id: id.into(),
        hash: vec![hash; 32],
        profile_id: PID.into(),
        kind: pb::EventKind::PageViewed as i32,
        custom_name: None,
        occurred_at: T0,
        body: pb::Event {
            event_id: id.into(),
            ..Default::default()
        }
        .encode_to_vec(),
        redacted: vec![],
        aggregate_key: format!("web/{id}"),
        effect: Effect::Engagement("page_viewed"),
    }
}

async fn old_data_moves_over(target: DatabaseTarget) {
    let old = db::open(
        &target,
        2,
        &testing::migrations_through(&POSTGRES_MIGRATIONS, 2),
        &testing::migrations_through(&SQLITE_MIGRATIONS, 2),
        "ingest",
    )
    .await
    .expect("test database (is PostgreSQL running?)");
    // "a": stored and remembered. "b": stored, its key since pruned, then stored again and
    // remembered (two rows). "c": remembered but never stored (an erased profile).
    // "d": stored, key pruned (forgotten).
    for (id, hash) in [("a", 1), ("b", 2), ("c", 3)] {
        sqlx::query(
            "INSERT INTO event_keys (source, event_id, payload_hash, profile_id, accepted_at) \
             VALUES ('web', $1, $2, $3, $4)",
        )
        .bind(id)
        .bind(vec![hash as u8; 32])
        .bind(PID)
        .bind(T0)
        .execute(&old.pool)
        .await
        .unwrap();
    }
    for id in ["a", "b", "d", "b"] {
        sqlx::query(
            "INSERT INTO events (source, event_id, profile_id, kind, custom_name, occurred_at, ingested_at, body, redacted) \
             VALUES ('web', $1, $2, 1, NULL, $3, $3, $4, '')",
        )
        .bind(id)
        .bind(PID)
        .bind(T0)
        .bind(Vec::<u8>::new())
        .execute(&old.pool)
        .await
        .unwrap();
    }
    // One delivered-later outbox row, one refund still waiting for its order.
    sqlx::query(
        "INSERT INTO outbox (idempotency_key, delta, ready, order_id, created_at) \
         VALUES ('web/a', $1, 1, NULL, 0), ('web/r', $1, 0, 'o-1', 0)",
    )
    .bind(Vec::<u8>::new())
    .execute(&old.pool)
    .await
    .unwrap();
    old.pool.close().await;

    let settings = Settings {
        database_max_connections: 2,
        ..Default::default()
    };
    let s = clientele_ingest::setup::open_store(&settings, &target)
        .await
        .unwrap();
    assert_eq!(s.log_end().await.unwrap(), 4);
    assert_eq!(
        s.feed_position(AGGREGATES_FEED).await.unwrap(),
        4,
        "the follower starts after the events whose deltas were in the outbox"
    );
    assert_eq!(
        s.outbox(10).await.unwrap().len(),
        1,
        "web/a still deliverable"
    );
    let pid = PID.to_string();
    let out = s
        .commit(
            &[
                view("a", 1),
                view("b", 2),
                view("b2", 2),
                view("c", 3),
                view("d", 4),
            ],
            None,
            T0 + 1,
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![
            Outcome::Duplicate(pid.clone()),
            Outcome::Duplicate(pid),
            Outcome::Accepted,
            Outcome::Accepted,
            Outcome::Accepted,
        ]
    );
    assert_eq!(s.log_end().await.unwrap(), 7);
    let new = s.log_deltas_after(4, 10).await.unwrap();
    assert_eq!(new.len(), 3);
    assert!(new.iter().all(|r| r.delta.is_some()));
}

#[tokio::test]
async fn postgres_old_data_moves_over() {
    old_data_moves_over(DatabaseTarget::Postgres {
        url: testing::postgres_url(),
        schema: testing::unique_schema("ingest"),
    })
    .await;
}

#[tokio::test]
async fn sqlite_old_data_moves_over() {
    let dir = tempfile::tempdir().unwrap();
    old_data_moves_over(DatabaseTarget::Sqlite {
        path: dir.path().join("ingest.db"),
    })
    .await;
}
