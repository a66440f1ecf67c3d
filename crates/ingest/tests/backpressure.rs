//! Backpressure against real PostgreSQL: while the event table is locked (a stalled
//! database), at most `max_in_flight_batches` batches are held; every other call is refused
//! with RESOURCE_EXHAUSTED after the admission wait instead of queueing, and stores nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use clientele_proto::v1 as pb;
use sqlx::Connection;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_database_gives_resource_exhausted_instead_of_a_queue() {
    let s = serve_with(Engine::Postgres, |st| {
        st.ingest.max_in_flight_batches = 1;
        st.ingest.admission_timeout_ms = 100;
    })
    .await;
    // Warm up: the customer exists, so the stalled batch only waits on the event table.
    let first = s
        .client()
        .ingest(pb::IngestRequest {
            event: Some(page_view("warm", "slow", "u")),
        })
        .await
        .unwrap();
    assert_eq!(
        first.into_inner().result.unwrap().status,
        pb::EventStatus::Accepted as i32
    );
    let schema: String = sqlx::query_scalar("SELECT current_schema()::text")
        .fetch_one(&s.ingest.store().database().pool)
        .await
        .unwrap();
    let mut locker = sqlx::PgConnection::connect(&clientele_runtime::testing::postgres_url())
        .await
        .unwrap();
    let mut lock = locker.begin().await.unwrap();
    sqlx::query(&format!("LOCK TABLE \"{schema}\".events IN EXCLUSIVE MODE"))
        .execute(&mut *lock)
        .await
        .unwrap();

    // One batch is admitted and stalls on the lock.
    let stalled = {
        let mut c = s.client();
        tokio::spawn(async move {
            c.ingest_batch(pb::IngestBatchRequest {
                events: vec![page_view("held", "slow", "u")],
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Every other call is refused quickly rather than queued behind it.
    let mut refused = Vec::new();
    for i in 0..8 {
        let mut c = s.client();
        refused.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let r = c
                .ingest_batch(pb::IngestBatchRequest {
                    events: vec![page_view(&format!("r{i}"), "slow", "u")],
                })
                .await;
            (r, started.elapsed())
        }));
    }
    for h in refused {
        let (r, took) = h.await.unwrap();
        let status = r.expect_err("refused while the database is stalled");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(took < Duration::from_secs(5), "refused after {took:?}");
    }
    assert!(
        !stalled.is_finished(),
        "the admitted batch waits for the database"
    );

    // The database recovers: the held batch lands, and the refused ones were never stored.
    lock.rollback().await.unwrap();
    let held = stalled.await.unwrap().unwrap().into_inner().results;
    assert_eq!(statuses(&held), vec![pb::EventStatus::Accepted]);
    let retried = s
        .client()
        .ingest_batch(pb::IngestBatchRequest {
            events: (0..8)
                .map(|i| page_view(&format!("r{i}"), "slow", "u"))
                .collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(
        statuses(&retried)
            .iter()
            .all(|s| *s == pb::EventStatus::Accepted),
        "refused calls stored nothing: {retried:?}"
    );
    assert_eq!(s.ingest.store().log_after(0, 100).await.unwrap().len(), 10);
}
