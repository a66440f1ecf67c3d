//! IngestService end to end over gRPC, with the real ProfileService in-process, on PostgreSQL
//! and on SQLite: retries, conflicting duplicates, reordering, bad input, erasure, streaming
//! resume, timelines and the log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use clientele_proto::v1 as pb;
use clientele_runtime::status::violated_field;
use support::*;
use tokio_stream::StreamExt;

both!(
    a_retried_batch_is_all_duplicates_and_changes_no_aggregate,
    the_same_id_with_different_content_is_already_exists,
    a_refund_before_its_order_gives_the_same_aggregates,
    bad_events_are_rejected_by_field_while_good_ones_land,
    events_of_erased_customers_are_suppressed,
    a_stream_resumes_from_the_last_acknowledgement,
    a_stream_rejects_gaps_in_sequences,
    the_timeline_is_filtered_and_paginated,
    the_log_replays_accepted_events_in_order,
    a_delta_profiles_refuses_is_parked_and_the_rest_delivered,
    the_log_is_delivered_by_position_and_a_redelivered_page_counts_once,
    a_log_restored_to_an_older_point_still_counts_new_events,
    a_backlog_of_several_full_pages_is_counted_once,
);

/// The forwarder's default page is as large as ProfileService takes in one ApplyAggregates
/// call: larger, every page would be refused; smaller, a forwarder that is behind would fold
/// fewer deltas per profile row than it could.
#[test]
fn the_default_forward_page_is_profile_services_limit() {
    let settings = clientele_runtime::settings::IngestSettings::default();
    assert_eq!(
        usize::try_from(settings.forward_batch_size).unwrap(),
        clientele_profiles::service::MAX_DELTAS
    );
}

/// A forwarder that is behind (2,300 events logged before it runs) delivers full pages of the
/// default size and a last short one; each event counts once.
async fn a_backlog_of_several_full_pages_is_counted_once(e: Engine) {
    use clientele_ingest::store::AGGREGATES_FEED;
    let s = serve(e).await;
    for b in 0..5 {
        let events = (0..460)
            .map(|i| page_view(&format!("bk-{b}-{i}"), "c-backlog", "https://shop/x"))
            .collect();
        s.ingest_accepted(events).await;
    }
    let forwarder = s.ingest.forwarder();
    let mut pages = Vec::new();
    loop {
        let n = forwarder.run_once().await.unwrap();
        if n == 0 {
            break;
        }
        pages.push(n);
    }
    assert_eq!(pages, vec![1000, 1000, 300]);
    let (_, agg) = s.aggregates("c-backlog").await;
    assert_eq!(agg.engagement.get("page_viewed"), Some(&2300));
    let store = s.ingest.store();
    assert_eq!(
        store.feed_position(AGGREGATES_FEED).await.unwrap(),
        store.log_end().await.unwrap()
    );
}

/// Restoring ingest's schema alone to an older point sets its sequence back below the position
/// ProfileService holds for the log. The restarted service moves the sequence past it before
/// its first append, so a new event is counted instead of being skipped as delivered.
async fn a_log_restored_to_an_older_point_still_counts_new_events(e: Engine) {
    use pb::ingest_service_server::IngestService as _;
    let s = serve(e).await;
    let mut c = s.client();
    for id in ["r1", "r2"] {
        let r = c
            .ingest_batch(pb::IngestBatchRequest {
                events: vec![page_view(id, "c-r", "u")],
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        assert_eq!(statuses(&r), vec![pb::EventStatus::Accepted]);
    }
    s.drain().await;
    assert_eq!(
        s.aggregates("c-r").await.1.engagement.get("page_viewed"),
        Some(&2)
    );

    // The backup was taken after r1: r2 is gone, the sequence and the forwarder's cursor are
    // back at r1's position.
    let pool = &s.ingest.store().database().pool;
    sqlx::query("DELETE FROM events WHERE event_id = 'r2'")
        .execute(pool)
        .await
        .unwrap();
    let restored: i64 = sqlx::query_scalar("SELECT MAX(seq) FROM events")
        .fetch_one(pool)
        .await
        .unwrap();
    match e {
        Engine::Postgres => {
            sqlx::query("SELECT setval(pg_get_serial_sequence('events', 'seq'), $1)")
                .bind(restored)
                .execute(pool)
                .await
                .unwrap();
        }
        Engine::Sqlite => {
            sqlx::query("UPDATE sqlite_sequence SET seq = $1 WHERE name = 'events'")
                .bind(restored)
                .execute(pool)
                .await
                .unwrap();
        }
    }
    sqlx::query("UPDATE feed_cursors SET position = $1 WHERE feed = 'aggregates'")
        .bind(restored)
        .execute(pool)
        .await
        .unwrap();

    // The restored service starts on that schema.
    let restarted = clientele_ingest::IngestServiceImpl::new(
        s.ingest.store().clone(),
        s.profiles(),
        Default::default(),
    );
    let r = restarted
        .ingest_batch(tonic::Request::new(pb::IngestBatchRequest {
            events: vec![page_view("r3", "c-r", "u")],
        }))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(statuses(&r), vec![pb::EventStatus::Accepted]);
    restarted.forwarder().drain().await.unwrap();
    assert_eq!(
        s.aggregates("c-r").await.1.engagement.get("page_viewed"),
        Some(&3),
        "r3 counts (r1 and r2 were counted before the restore)"
    );
}

async fn a_retried_batch_is_all_duplicates_and_changes_no_aggregate(e: Engine) {
    let s = serve(e).await;
    let mut c = s.client();
    let batch = vec![
        order("o1", "c-1", "order-1", 1000),
        page_view("v1", "c-1", "https://shop/a"),
        page_view("v2", "c-1", "https://shop/b"),
    ];
    let first = c
        .ingest_batch(pb::IngestBatchRequest {
            events: batch.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(statuses(&first), vec![pb::EventStatus::Accepted; 3]);
    s.drain().await;
    let (pid, before) = s.aggregates("c-1").await;
    assert_eq!(before.order_count, 1);
    assert_eq!(spend(&before, "USD"), (1000, 0));
    assert_eq!(before.engagement.get("page_viewed"), Some(&2));

    let again = c
        .ingest_batch(pb::IngestBatchRequest { events: batch })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(statuses(&again), vec![pb::EventStatus::Duplicate; 3]);
    assert!(again.iter().all(|r| r.profile_id == pid));
    // A repeat inside one batch is a duplicate of its first occurrence.
    let inner = c
        .ingest_batch(pb::IngestBatchRequest {
            events: vec![page_view("v3", "c-1", "u"), page_view("v3", "c-1", "u")],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(
        statuses(&inner),
        vec![pb::EventStatus::Accepted, pb::EventStatus::Duplicate]
    );
    s.drain().await;
    let (_, after) = s.aggregates("c-1").await;
    assert_eq!(after.order_count, 1);
    assert_eq!(spend(&after, "USD"), (1000, 0));
    assert_eq!(after.engagement.get("page_viewed"), Some(&3));
}

async fn the_same_id_with_different_content_is_already_exists(e: Engine) {
    let s = serve(e).await;
    let mut c = s.client();
    c.ingest(pb::IngestRequest {
        event: Some(order("o1", "c-1", "order-1", 1000)),
    })
    .await
    .unwrap();
    let err = c
        .ingest(pb::IngestRequest {
            event: Some(order("o1", "c-1", "order-1", 2000)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    let r = c
        .ingest_batch(pb::IngestBatchRequest {
            events: vec![order("o1", "c-1", "order-1", 3000)],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(statuses(&r), vec![pb::EventStatus::Rejected]);
    let error = r[0].error.as_ref().unwrap();
    assert_eq!(error.code, tonic::Code::AlreadyExists as i32);
    assert!(r[0].conflicting_duplicate && !error.retryable);
    // The same content again is still a plain duplicate.
    let dup = c
        .ingest(pb::IngestRequest {
            event: Some(order("o1", "c-1", "order-1", 1000)),
        })
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(dup.status, pb::EventStatus::Duplicate as i32);
    s.drain().await;
    let (_, a) = s.aggregates("c-1").await;
    assert_eq!((a.order_count, spend(&a, "USD")), (1, (1000, 0)));
}

async fn a_refund_before_its_order_gives_the_same_aggregates(e: Engine) {
    let s = serve(e).await;
    let mut c = s.client();
    // Customer A: full refund first, then the order. Customer B: the usual order.
    for ev in [
        refund("r1", "c-a", "order-a", 1000, true),
        refund("r2", "c-b", "order-b", 300, false),
    ] {
        c.ingest(pb::IngestRequest { event: Some(ev) })
            .await
            .unwrap();
    }
    s.drain().await;
    // Nothing counts before the order is known.
    let (_, a0) = s.aggregates("c-a").await;
    assert_eq!((a0.order_count, a0.refund_count), (0, 0));
    c.ingest_batch(pb::IngestBatchRequest {
        events: vec![
            order("o-a", "c-a", "order-a", 1000),
            order("o-b", "c-b", "order-b", 1000),
            // A second completion of the same order and a second full refund do not count.
            order("o-a2", "c-a", "order-a", 1000),
            refund("r1b", "c-a", "order-a", 1, true),
        ],
    })
    .await
    .unwrap();
    s.drain().await;
    let (_, a) = s.aggregates("c-a").await;
    assert_eq!(a.order_count, 0, "a fully refunded order no longer counts");
    assert_eq!(a.refund_count, 2);
    assert_eq!(spend(&a, "USD"), (1000, 1001));
    let (_, b) = s.aggregates("c-b").await;
    assert_eq!((b.order_count, b.refund_count), (1, 1));
    assert_eq!(spend(&b, "USD"), (1000, 300));
    // Order-then-refund gives the same result as refund-then-order.
    c.ingest(pb::IngestRequest {
        event: Some(order("o-c", "c-c", "order-c", 1000)),
    })
    .await
    .unwrap();
    c.ingest(pb::IngestRequest {
        event: Some(refund("r-c", "c-c", "order-c", 1000, true)),
    })
    .await
    .unwrap();
    s.drain().await;
    let (_, cc) = s.aggregates("c-c").await;
    assert_eq!((cc.order_count, cc.refund_count), (0, 1));
    assert_eq!(spend(&cc, "USD"), (1000, 1000));
}

async fn bad_events_are_rejected_by_field_while_good_ones_land(e: Engine) {
    let s = serve(e).await;
    let mut c = s.client();
    let mut bad_currency = order("o2", "c-1", "order-2", 10);
    if let Some(pb::event::Payload::OrderCompleted(o)) = &mut bad_currency.payload {
        o.total = money(10, "usd");
    }
    let mut future = page_view("v9", "c-1", "u");
    future.occurred_at = Some(ts_minus(-3600));
    let mut bad_phone = page_view("v8", "c-1", "u");
    bad_phone.identifiers = Some(pb::IdentifierSet {
        identifiers: vec![pb::Identifier {
            r#type: pb::IdentifierType::Phone as i32,
            value: "not a phone".into(),
            namespace: String::new(),
        }],
    });
    let r = c
        .ingest_batch(pb::IngestBatchRequest {
            events: vec![
                order("o1", "c-1", "order-1", 10),
                bad_currency.clone(),
                page_view("v1", "c-1", "u"),
                future,
                bad_phone,
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    use pb::EventStatus::{Accepted, Rejected};
    assert_eq!(
        statuses(&r),
        vec![Accepted, Rejected, Accepted, Rejected, Rejected]
    );
    let e1 = r[1].error.as_ref().unwrap();
    assert_eq!(e1.code, tonic::Code::InvalidArgument as i32);
    assert_eq!(e1.field_path, "order_completed.total.currency");
    assert!(
        e1.message
            .starts_with("events[1].order_completed.total.currency")
    );
    assert_eq!(r[3].error.as_ref().unwrap().field_path, "occurred_at");
    assert_eq!(
        r[4].error.as_ref().unwrap().field_path,
        "identifiers.identifiers[0].value"
    );
    let err = c
        .ingest(pb::IngestRequest {
            event: Some(bad_currency),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        violated_field(&err).as_deref(),
        Some("event.order_completed.total.currency")
    );
    let empty = c
        .ingest_batch(pb::IngestBatchRequest { events: vec![] })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);
}

async fn events_of_erased_customers_are_suppressed(e: Engine) {
    let s = serve(e).await;
    let mut c = s.client();
    c.ingest(pb::IngestRequest {
        event: Some(page_view("v1", "gone", "u")),
    })
    .await
    .unwrap();
    let (pid, _) = s.aggregates("gone").await;
    s.profiles()
        .erase_profile(pb::EraseProfileRequest {
            profile_id: pid.clone(),
            reason: "gdpr-art17".into(),
        })
        .await
        .unwrap();
    // Ingest learns of the erasure from the change feed (its identity cache still holds the
    // person until then; see `an_event_after_erasure_is_not_kept`).
    s.ingest.erasure().catch_up().await.unwrap();
    let r = c
        .ingest_batch(pb::IngestBatchRequest {
            events: vec![
                page_view("v2", "gone", "u"),
                order("o1", "gone", "order-1", 10),
                page_view("v3", "still-here", "u"),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    use pb::EventStatus::{Accepted, Suppressed};
    assert_eq!(statuses(&r), vec![Suppressed, Suppressed, Accepted]);
    assert_eq!(
        r[0].suppression,
        pb::SuppressionReason::ErasedIdentifier as i32
    );
    let single = c
        .ingest(pb::IngestRequest {
            event: Some(page_view("v4", "gone", "u")),
        })
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(single.status, Suppressed as i32);
    s.drain().await;
}

fn open(producer: &str, last_ack: u64) -> pb::IngestStreamRequest {
    pb::IngestStreamRequest {
        kind: Some(pb::ingest_stream_request::Kind::Open(
            pb::IngestStreamOpen {
                producer_id: producer.into(),
                last_received_ack: last_ack,
            },
        )),
    }
}

fn batch(seq: u64, events: Vec<pb::Event>) -> pb::IngestStreamRequest {
    pb::IngestStreamRequest {
        kind: Some(pb::ingest_stream_request::Kind::Batch(
            pb::IngestStreamBatch {
                sequence: seq,
                events,
            },
        )),
    }
}

fn views(seq: u64, n: usize) -> Vec<pb::Event> {
    (0..n)
        .map(|i| page_view(&format!("s{seq}-{i}"), "streamer", "u"))
        .collect()
}

type Responses = tonic::Streaming<pb::IngestStreamResponse>;

async fn start(
    c: &mut IngestClient,
    first: Vec<pb::IngestStreamRequest>,
) -> (
    tokio::sync::mpsc::Sender<pb::IngestStreamRequest>,
    Responses,
    pb::IngestStreamOpened,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    for m in first {
        tx.send(m).await.unwrap();
    }
    let mut resp = c
        .ingest_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::ingest_stream_response::Kind::Opened(o)) =
        resp.next().await.unwrap().unwrap().kind
    else {
        panic!("first reply must be `opened`");
    };
    (tx, resp, o)
}

/// Reads acks until `through` is durable; returns every batch result seen.
async fn acks_until(resp: &mut Responses, through: u64) -> Vec<pb::BatchResult> {
    let mut seen = Vec::new();
    loop {
        let msg = tokio::time::timeout(std::time::Duration::from_secs(20), resp.next())
            .await
            .expect("ack in time")
            .unwrap()
            .unwrap();
        if let Some(pb::ingest_stream_response::Kind::Ack(a)) = msg.kind {
            seen.extend(a.batches);
            if a.durable_through_sequence >= through {
                return seen;
            }
        }
    }
}

async fn a_stream_resumes_from_the_last_acknowledgement(e: Engine) {
    // This producer sends three batches before it reads an acknowledgement, so the server
    // must allow that many in flight (the default window is smaller).
    let s = serve_with(e, |s| s.ingest.stream_max_unacked_batches = 4).await;
    let mut c = s.client();
    let (tx, mut resp, opened) = start(&mut c, vec![open("pos-1", 0)]).await;
    assert_eq!(opened.last_durable_sequence, 0);
    let mut with_bad = views(2, 3);
    with_bad[1].source = "BAD".into();
    tx.send(batch(1, views(1, 5))).await.unwrap();
    tx.send(batch(2, with_bad)).await.unwrap();
    tx.send(batch(3, views(3, 5))).await.unwrap();
    let results = acks_until(&mut resp, 3).await;
    assert_eq!(
        results.iter().map(|b| b.sequence).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!((results[1].accepted, results[1].rejected), (2, 1));
    assert_eq!(results[1].non_accepted[0].index, 1);
    // The producer "crashes": the stream is dropped with batch 4 sent but never acknowledged
    // on the client side, and it only recorded ack 1.
    tx.send(batch(4, views(4, 5))).await.unwrap();
    drop(tx);
    drop(resp);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let (tx, mut resp, opened) = start(&mut c, vec![open("pos-1", 1)]).await;
    let durable = opened.last_durable_sequence;
    assert!((3..=4).contains(&durable), "durable {durable}");
    // Results above the producer's last ack are replayed, including the rejection.
    let replay = acks_until(&mut resp, durable).await;
    assert_eq!(replay[0].sequence, 2);
    assert_eq!(replay[0].rejected, 1);
    // Resend from the producer's own last ack: durable batches are acknowledged again without
    // re-processing; the rest is processed.
    for seq in 2..=5 {
        tx.send(batch(
            seq,
            views(seq, 5)
                .into_iter()
                .take(if seq == 2 { 3 } else { 5 })
                .collect(),
        ))
        .await
        .unwrap();
    }
    let results = acks_until(&mut resp, 5).await;
    let b5 = results.iter().find(|b| b.sequence == 5).unwrap();
    assert_eq!(b5.accepted, 5);
    if durable == 3 {
        let b4 = results.iter().find(|b| b.sequence == 4).unwrap();
        assert_eq!(b4.accepted, 5);
    }
    drop(tx);
    // Every event exactly once: 5 + 2 + 5 + 5 + 5 page views.
    s.drain().await;
    let (_, a) = s.aggregates("streamer").await;
    assert_eq!(a.engagement.get("page_viewed"), Some(&22));
}

async fn a_stream_rejects_gaps_in_sequences(e: Engine) {
    let s = serve(e).await;
    let mut c = s.client();
    let (tx, mut resp, _) = start(&mut c, vec![open("gappy", 0)]).await;
    tx.send(batch(2, views(2, 1))).await.unwrap();
    let err = loop {
        match resp.next().await.unwrap() {
            Err(s) => break s,
            Ok(_) => continue,
        }
    };
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    // A second message `open` is a protocol violation.
    let (tx2, mut resp2, _) = start(&mut c, vec![open("twice", 0)]).await;
    tx2.send(open("twice", 0)).await.unwrap();
    let err = loop {
        match resp2.next().await.unwrap() {
            Err(s) => break s,
            Ok(_) => continue,
        }
    };
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    drop(tx);
}

async fn the_timeline_is_filtered_and_paginated(e: Engine) {
    let s = serve(e).await;
    let mut c = s.client();
    let mut events = Vec::new();
    for i in 0..7 {
        let mut v = page_view(&format!("v{i}"), "t-1", "u");
        v.occurred_at = Some(ts_minus(1000 - i * 10));
        events.push(v);
    }
    events.push(order("o1", "t-1", "order-1", 100));
    events.push(page_view("other", "t-2", "u"));
    c.ingest_batch(pb::IngestBatchRequest { events })
        .await
        .unwrap();
    let (pid, _) = s.aggregates("t-1").await;
    let mut token = String::new();
    let mut seen = Vec::new();
    loop {
        let page = c
            .list_profile_events(pb::ListProfileEventsRequest {
                profile_id: pid.clone(),
                kinds: vec![pb::EventKind::PageViewed as i32],
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(
            page.events
                .iter()
                .map(|e| e.event.as_ref().unwrap().event_id.clone()),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, vec!["v6", "v5", "v4", "v3", "v2", "v1", "v0"]);
    // A token used with other filters is refused.
    let first = c
        .list_profile_events(pb::ListProfileEventsRequest {
            profile_id: pid.clone(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first.events[0].event.as_ref().unwrap().event_id,
        "o1",
        "newest first"
    );
    let err = c
        .list_profile_events(pb::ListProfileEventsRequest {
            profile_id: pid.clone(),
            page_size: 1,
            oldest_first: true,
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&err).as_deref(), Some("page_token"));
    let missing = c
        .list_profile_events(pb::ListProfileEventsRequest {
            profile_id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
}

async fn the_log_replays_accepted_events_in_order(e: Engine) {
    let s = serve(e).await;
    let mut c = s.client();
    let mut pii = page_view("v0", "l-1", "u");
    pii.identifiers
        .as_mut()
        .unwrap()
        .identifiers
        .push(pb::Identifier {
            r#type: pb::IdentifierType::Email as i32,
            value: "someone@example.com".into(),
            namespace: String::new(),
        });
    c.ingest_batch(pb::IngestBatchRequest {
        events: vec![
            pii,
            order("o1", "l-1", "order-1", 5),
            page_view("v1", "l-1", "u"),
        ],
    })
    .await
    .unwrap();
    let mut stream = c
        .watch_events(pb::WatchEventsRequest {
            start: Some(pb::watch_events_request::Start::From(
                pb::WatchStart::Earliest as i32,
            )),
            kinds: vec![pb::EventKind::PageViewed as i32],
            consumer: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while got.len() < 2 {
        if let Some(pb::watch_events_response::Kind::Record(r)) =
            stream.next().await.unwrap().unwrap().kind
        {
            got.push(r);
        }
    }
    let first = got[0].event.as_ref().unwrap();
    assert_eq!(first.event.as_ref().unwrap().event_id, "v0");
    assert_eq!(
        first.redacted_identifier_types,
        vec![pb::IdentifierType::Email as i32]
    );
    assert!(
        !format!("{first:?}").contains("someone@example.com"),
        "emails never reach the log"
    );
    assert_eq!(
        got[1]
            .event
            .as_ref()
            .unwrap()
            .event
            .as_ref()
            .unwrap()
            .event_id,
        "v1"
    );
}

/// A delta ProfileService refuses as invalid (here a currency the validation would have
/// refused, committed straight into the store) is parked in the outbox (ready 2); the log
/// follower moves past it and the other deltas of its page are still counted.
async fn a_delta_profiles_refuses_is_parked_and_the_rest_delivered(e: Engine) {
    use clientele_ingest::store::{AGGREGATES_FEED, NewEvent};
    use clientele_ingest::validate::Effect;
    let s = serve(e).await;
    let mut c = s.client();
    let first = c
        .ingest_batch(pb::IngestBatchRequest {
            events: vec![page_view("v1", "c-9", "https://shop/a")],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    s.drain().await;
    let pid = first[0].profile_id.clone();
    let raw = |id: &str, effect: Effect| NewEvent {
        source: "web".into(),
        event_id: id.into(),
        hash: vec![9; 32],
        profile_id: pid.clone(),
        kind: pb::EventKind::PageViewed as i32,
        custom_name: None,
        occurred_at: 1_700_000_000_000_000,
        body: prost::Message::encode_to_vec(&page_view(id, "c-9", "https://shop/b")),
        redacted: vec![],
        aggregate_key: format!("web/{id}"),
        effect,
    };
    let store = s.ingest.store();
    store
        .commit(
            &[
                raw(
                    "bad",
                    Effect::Order {
                        order_id: "o-bad".into(),
                        currency: "not-a-currency".into(),
                        amount: 5,
                    },
                ),
                raw("v2", Effect::Engagement("page_viewed")),
            ],
            None,
            1,
        )
        .await
        .unwrap();
    s.drain().await;
    let (_, agg) = s.aggregates("c-9").await;
    assert_eq!(agg.engagement.get("page_viewed"), Some(&2));
    assert_eq!(agg.order_count, 0);
    let parked: i64 = sqlx::Row::try_get(
        &sqlx::query("SELECT COUNT(*) FROM outbox WHERE ready = 2 AND idempotency_key = 'web/bad'")
            .fetch_one(&store.database().pool)
            .await
            .unwrap(),
        0,
    )
    .unwrap();
    assert_eq!(parked, 1);
    // parked without its log position: it goes out again from the outbox, by key
    let delta: Vec<u8> = sqlx::Row::try_get(
        &sqlx::query("SELECT delta FROM outbox WHERE idempotency_key = 'web/bad'")
            .fetch_one(&store.database().pool)
            .await
            .unwrap(),
        0,
    )
    .unwrap();
    let delta = <pb::AggregateDelta as prost::Message>::decode(delta.as_slice()).unwrap();
    assert_eq!(delta.feed_position, 0);
    assert_eq!(
        store.feed_position(AGGREGATES_FEED).await.unwrap(),
        store.log_end().await.unwrap()
    );
}

/// The forwarder sends log deltas as a feed (this log's identity, each delta's `seq` as its
/// position). A crash between ProfileService's apply and the cursor's move (simulated by moving
/// the cursor back) redelivers a page: with later events in it, only those count.
async fn the_log_is_delivered_by_position_and_a_redelivered_page_counts_once(e: Engine) {
    use clientele_ingest::store::AGGREGATES_FEED;
    let s = serve(e).await;
    let store = s.ingest.store();
    let feed = store.log_identity().await.unwrap();
    assert!(feed.starts_with("ingest-log:"), "{feed}");
    assert_eq!(store.log_identity().await.unwrap(), feed, "stable");
    let other = serve(e).await;
    assert_ne!(
        other.ingest.store().log_identity().await.unwrap(),
        feed,
        "two logs never share an identity"
    );
    let ingest = |events: Vec<pb::Event>| s.ingest_accepted(events);
    ingest(vec![order("p1", "c-pos", "order-p1", 1000)]).await;
    s.drain().await; // the feed's first call
    let before = store.log_end().await.unwrap();
    ingest(vec![
        order("p2", "c-pos", "order-p2", 500),
        page_view("p3", "c-pos", "https://shop/a"),
    ])
    .await;
    s.drain().await;
    let (pid, agg) = s.aggregates("c-pos").await;
    assert_eq!((agg.order_count, spend(&agg, "USD").0), (2, 1500));
    // crash after the apply, before the cursor moved: the page goes out again, with a newer
    // event behind it
    let end = store.log_end().await.unwrap();
    store
        .advance_redeliverable_feed(AGGREGATES_FEED, end, before, 1)
        .await
        .unwrap();
    ingest(vec![page_view("p4", "c-pos", "https://shop/b")]).await;
    s.drain().await;
    let (_, agg) = s.aggregates("c-pos").await;
    assert_eq!((agg.order_count, spend(&agg, "USD").0), (2, 1500));
    assert_eq!(agg.engagement.get("page_viewed"), Some(&2));
    assert_eq!(
        store.feed_position(AGGREGATES_FEED).await.unwrap(),
        store.log_end().await.unwrap()
    );
    // ProfileService holds this log's position: a delta at or below it is not counted, even
    // under a key it never saw
    let out = s
        .profiles()
        .apply_aggregates(pb::ApplyAggregatesRequest {
            deltas: vec![pb::AggregateDelta {
                idempotency_key: "never-seen".into(),
                profile_id: pid,
                occurred_at: Some(now_ts()),
                orders: 1,
                feed_position: store.log_end().await.unwrap(),
                ..Default::default()
            }],
            feed,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((out.applied, out.duplicates), (0, 1));
}
