//! What a stream of generated events must add up to once every event counted exactly once,
//! and readers of what the services actually stored: the checks shared by the end-to-end
//! tests that lose a process mid-story.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use clientele::generate;
use clientele_proto::v1 as pb;
use clientele_proto::v1::ingest_service_client::IngestServiceClient;
use clientele_proto::v1::profile_service_client::ProfileServiceClient;

use crate::Service;

/// Order, refund and engagement totals over a set of events or profiles.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Orders not fully refunded.
    pub orders: i64,
    /// Refund events.
    pub refunds: i64,
    /// Gross order value, minor units, all currencies added.
    pub gross_minor: i64,
    /// Refunded value, minor units.
    pub refunded_minor: i64,
    /// Engagement counters by event kind name.
    pub engagement: BTreeMap<String, i64>,
}

/// The totals the profiles' aggregates must reach for `events`.
///
/// # Panics
/// On an event without a payload (the generator never makes one).
pub fn expected_totals(events: &[pb::Event]) -> Totals {
    use pb::event::Payload as P;
    let mut t = Totals::default();
    let mut fully_refunded = HashSet::new();
    for e in events {
        match e.payload.as_ref().expect("payload") {
            P::OrderCompleted(o) => {
                t.orders += 1;
                t.gross_minor += o.total.as_ref().map_or(0, |m| m.amount_minor);
            }
            P::OrderRefunded(r) => {
                t.refunds += 1;
                t.refunded_minor += r.refund.as_ref().map_or(0, |m| m.amount_minor);
                if r.r#type == pb::RefundType::Full as i32 && fully_refunded.insert(&r.order_id) {
                    t.orders -= 1;
                }
            }
            _ => {
                *t.engagement
                    .entry(generate::payload_name(e).to_string())
                    .or_default() += 1;
            }
        }
    }
    t
}

/// The totals of the surviving profiles behind `profile_ids` (merged ids count once).
///
/// # Panics
/// When a profile cannot be read.
pub async fn profile_totals(profiles: &Service, profile_ids: &HashSet<String>) -> Totals {
    let mut client = ProfileServiceClient::new(profiles.channel());
    let mut survivors: HashMap<String, pb::Profile> = HashMap::new();
    for id in profile_ids {
        let p = client
            .get_profile(pb::GetProfileRequest {
                profile_id: id.clone(),
            })
            .await
            .expect("get profile")
            .into_inner()
            .profile
            .expect("profile");
        survivors.insert(p.profile_id.clone(), p);
    }
    let mut t = Totals::default();
    for p in survivors.values() {
        let Some(a) = &p.aggregates else { continue };
        t.orders += a.order_count;
        t.refunds += a.refund_count;
        for s in &a.spend {
            t.gross_minor += s.gross_minor;
            t.refunded_minor += s.refunded_minor;
        }
        for (k, n) in &a.engagement {
            *t.engagement.entry(k.clone()).or_default() += n;
        }
    }
    t.engagement.retain(|_, n| *n != 0);
    t
}

/// Polls the profiles until their totals equal `expected` (the ingest outbox delivers
/// aggregates asynchronously), for at most a minute; returns the last totals read.
pub async fn wait_for_totals(
    profiles: &Service,
    profile_ids: &HashSet<String>,
    expected: &Totals,
) -> Totals {
    let mut actual = Totals::default();
    for _ in 0..120 {
        actual = profile_totals(profiles, profile_ids).await;
        if actual == *expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    actual
}

/// Everything the ingest log holds, read through WatchEvents from the earliest record:
/// `(source, event_id)` of each record (with repeats, to count duplicates) and the profile
/// ids the events were stored under. Stops after `expected` records and two quiet seconds,
/// or 30 quiet seconds before that.
///
/// # Panics
/// When the feed fails.
pub async fn stored_events(
    ingest: &Service,
    expected: usize,
) -> (Vec<(String, String)>, HashSet<String>) {
    let mut client = IngestServiceClient::new(ingest.channel());
    let mut watch = client
        .watch_events(pb::WatchEventsRequest {
            start: Some(pb::watch_events_request::Start::From(
                pb::WatchStart::Earliest as i32,
            )),
            kinds: vec![],
            consumer: "e2e".into(),
        })
        .await
        .expect("watch events")
        .into_inner();
    let mut records = Vec::new();
    let mut profile_ids = HashSet::new();
    loop {
        let wait = if records.len() < expected { 30 } else { 2 };
        match tokio::time::timeout(Duration::from_secs(wait), watch.message()).await {
            Err(_) => break,
            Ok(m) => match m.expect("feed message").and_then(|m| m.kind) {
                Some(pb::watch_events_response::Kind::Record(r)) => {
                    let se = r.event.expect("stored event");
                    let e = se.event.expect("event");
                    records.push((e.source, e.event_id));
                    profile_ids.insert(se.profile_id);
                }
                Some(_) => {}
                None => break,
            },
        }
    }
    (records, profile_ids)
}

/// Runs a batch recompute on the segmentation process and waits (at most two minutes) until
/// it succeeds; returns the finished run.
///
/// # Panics
/// When the run fails or does not finish in time.
pub async fn recompute(segmentation: &Service, key: &str) -> pb::Recompute {
    use clientele_proto::v1::segmentation_service_client::SegmentationServiceClient;
    let mut client = SegmentationServiceClient::new(segmentation.channel());
    let run = client
        .start_recompute(pb::StartRecomputeRequest {
            idempotency_key: key.into(),
            requested_by: "e2e".into(),
        })
        .await
        .expect("start recompute")
        .into_inner()
        .run
        .expect("run");
    for _ in 0..1200 {
        let now = client
            .get_recompute(pb::GetRecomputeRequest {
                run_id: run.run_id.clone(),
            })
            .await
            .expect("get recompute")
            .into_inner()
            .run
            .expect("run");
        match pb::RecomputeState::try_from(now.state) {
            Ok(pb::RecomputeState::Succeeded) => return now,
            Ok(pb::RecomputeState::Pending | pb::RecomputeState::Running) => {}
            other => panic!("recompute ended {other:?}: {}", now.error_message),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("recompute {} did not finish in two minutes", run.run_id);
}

/// Streams `events` through IngestStream as producer `producer` (batches of 500, keeping the
/// server's window full), half-closes, and returns the per-batch results once every batch is
/// acknowledged.
///
/// # Panics
/// When the stream fails or ends before every batch is acknowledged.
pub async fn stream_events(
    ingest: &Service,
    producer: &str,
    events: &[pb::Event],
) -> Vec<pb::BatchResult> {
    use tokio::sync::mpsc;
    let batches: Vec<&[pb::Event]> = events.chunks(500).collect();
    let total = batches.len() as u64;
    let (tx, req_rx) = mpsc::channel(64);
    tx.send(pb::IngestStreamRequest {
        kind: Some(pb::ingest_stream_request::Kind::Open(
            pb::IngestStreamOpen {
                producer_id: producer.into(),
                last_received_ack: 0,
            },
        )),
    })
    .await
    .expect("open");
    let mut rx = IngestServiceClient::new(ingest.channel())
        .ingest_stream(tokio_stream::wrappers::ReceiverStream::new(req_rx))
        .await
        .expect("ingest stream")
        .into_inner();
    let window = match rx.message().await.expect("opened").and_then(|m| m.kind) {
        Some(pb::ingest_stream_response::Kind::Opened(o)) => {
            u64::from(o.max_unacked_batches.max(1))
        }
        other => panic!("expected opened, got {other:?}"),
    };
    let mut tx = Some(tx);
    let mut results = BTreeMap::new();
    let (mut next, mut acked) = (1u64, 0u64);
    loop {
        if let Some(sender) = &tx {
            while next <= total && next - acked <= window {
                let events = batches[usize::try_from(next - 1).expect("index")].to_vec();
                sender
                    .send(pb::IngestStreamRequest {
                        kind: Some(pb::ingest_stream_request::Kind::Batch(
                            pb::IngestStreamBatch {
                                sequence: next,
                                events,
                            },
                        )),
                    })
                    .await
                    .expect("send batch");
                next += 1;
            }
            if next > total {
                tx = None; // half-close: the server acknowledges the rest and ends the stream
            }
        }
        match rx.message().await.expect("stream") {
            Some(pb::IngestStreamResponse {
                kind: Some(pb::ingest_stream_response::Kind::Ack(ack)),
            }) => {
                for b in ack.batches {
                    results.insert(b.sequence, b);
                }
                acked = acked.max(ack.durable_through_sequence);
            }
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(acked, total, "every batch acknowledged");
    results.into_values().collect()
}

/// The profile id of generated customer `customer_id` (resolving their customer id only).
///
/// # Panics
/// When resolution fails.
pub async fn profile_of(profiles: &Service, customer_id: &str) -> String {
    ProfileServiceClient::new(profiles.channel())
        .resolve(pb::ResolveRequest {
            identifiers: Some(pb::IdentifierSet {
                identifiers: vec![pb::Identifier {
                    r#type: pb::IdentifierType::CustomerId as i32,
                    value: customer_id.into(),
                    namespace: String::new(),
                }],
            }),
        })
        .await
        .expect("resolve")
        .into_inner()
        .profile_id
}
