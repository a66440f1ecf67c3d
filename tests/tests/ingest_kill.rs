//! Ingest as its own process beside profiles, exactly the compose topology (ingest's
//! `CLIENTELE_ENDPOINTS__PROFILES` points at the profiles process): a producer streaming
//! generated events survives a SIGKILL of ingest mid-stream — it reconnects with the same
//! producer id, re-sends from its last acknowledgement, and in the end every event is stored
//! exactly once and every order, refund and engagement is counted exactly once in the
//! profiles' aggregates. And `clientele import` of the same CSV twice is all duplicates the
//! second time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use clientele::generate::{self, GeneratorConfig};
use clientele_e2e::story::{expected_totals, stored_events, wait_for_totals};
use clientele_e2e::{ADMIN_TOKEN, Deployment, Service, TestDatabase, bin};
use clientele_proto::v1 as pb;
use clientele_proto::v1::ingest_service_client::IngestServiceClient;
use tokio::sync::mpsc;
use tonic::Streaming;

const PRODUCER: &str = "e2e-kill-producer";
const BATCH_EVENTS: usize = 50;

/// One open IngestStream: the request sender and the response stream.
struct Stream {
    tx: mpsc::Sender<pb::IngestStreamRequest>,
    rx: Streaming<pb::IngestStreamResponse>,
    opened: pb::IngestStreamOpened,
}

async fn open_stream(ingest: &Service, last_received_ack: u64) -> Stream {
    let (tx, req_rx) = mpsc::channel(256);
    tx.send(pb::IngestStreamRequest {
        kind: Some(pb::ingest_stream_request::Kind::Open(
            pb::IngestStreamOpen {
                producer_id: PRODUCER.into(),
                last_received_ack,
            },
        )),
    })
    .await
    .unwrap();
    let mut client = IngestServiceClient::new(ingest.channel());
    let mut rx = client
        .ingest_stream(tokio_stream::wrappers::ReceiverStream::new(req_rx))
        .await
        .unwrap()
        .into_inner();
    let opened = match rx.message().await.unwrap().and_then(|m| m.kind) {
        Some(pb::ingest_stream_response::Kind::Opened(o)) => o,
        other => panic!("expected opened, got {other:?}"),
    };
    Stream { tx, rx, opened }
}

fn batch(sequence: u64, events: &[pb::Event]) -> pb::IngestStreamRequest {
    pb::IngestStreamRequest {
        kind: Some(pb::ingest_stream_request::Kind::Batch(
            pb::IngestStreamBatch {
                sequence,
                events: events.to_vec(),
            },
        )),
    }
}

/// Records the batch results of an ack; returns its durable sequence.
fn record(ack: pb::IngestStreamAck, results: &mut BTreeMap<u64, pb::BatchResult>) -> u64 {
    for b in ack.batches {
        results.insert(b.sequence, b);
    }
    ack.durable_through_sequence
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_ingest_process_loses_nothing_and_counts_nothing_twice() {
    let db = TestDatabase::create().await;
    let deployment = Deployment::new(&db.url);
    let profiles = deployment.start("profiles", &[]).await;
    let mut ingest = deployment
        .start(
            "ingest",
            &[("CLIENTELE_ENDPOINTS__PROFILES", profiles.endpoint.as_str())],
        )
        .await;

    let config = GeneratorConfig::new(21, 120, 240);
    let events: Vec<pb::Event> = generate::events(&config).collect();
    assert!(events.len() >= 3000, "{} events", events.len());
    let batches: Vec<&[pb::Event]> = events.chunks(BATCH_EVENTS).collect();
    let total = batches.len() as u64;
    let mut results: BTreeMap<u64, pb::BatchResult> = BTreeMap::new();

    // Stream until a third of the batches are acknowledged, with the window full, then kill.
    let mut s = open_stream(&ingest, 0).await;
    assert_eq!(s.opened.last_durable_sequence, 0);
    let window = u64::from(s.opened.max_unacked_batches);
    let mut acked = 0;
    let mut next = 1;
    while acked < total / 3 {
        while next <= total && next - acked <= window {
            s.tx.send(batch(next, batches[usize::try_from(next - 1).unwrap()]))
                .await
                .unwrap();
            next += 1;
        }
        if let Some(pb::ingest_stream_response::Kind::Ack(ack)) =
            s.rx.message().await.unwrap().and_then(|m| m.kind)
        {
            acked = acked.max(record(ack, &mut results));
        }
    }
    let sent_before_kill = next - 1;
    ingest.kill();
    // the stream breaks; whatever acks were still in flight are lost with the process
    let broke = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.rx.message().await {
                Ok(Some(m)) => {
                    if let Some(pb::ingest_stream_response::Kind::Ack(ack)) = m.kind {
                        acked = acked.max(record(ack, &mut results));
                    }
                }
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(broke.is_ok(), "the stream ends when ingest dies");
    drop(s);
    let acked_before_kill = acked;
    assert!(acked_before_kill < total, "killed mid-stream");

    // Restart, reconnect with the same producer id and the last acknowledgement, and re-send
    // everything after it: batches the server made durable but never acknowledged are
    // acknowledged again without re-processing.
    ingest.restart().await;
    let mut s = open_stream(&ingest, acked).await;
    let durable_at_reopen = s.opened.last_durable_sequence;
    assert!(durable_at_reopen >= acked_before_kill);
    assert!(durable_at_reopen <= sent_before_kill);
    let mut next = acked + 1;
    let mut closed = false;
    let ended = loop {
        while next <= total && next - acked <= window {
            s.tx.send(batch(next, batches[usize::try_from(next - 1).unwrap()]))
                .await
                .unwrap();
            next += 1;
        }
        if next > total && !closed {
            // half-close: the server acknowledges the rest and ends the stream
            let (dead, _) = mpsc::channel(1);
            s.tx = dead;
            closed = true;
        }
        match s.rx.message().await {
            Ok(Some(pb::IngestStreamResponse {
                kind: Some(pb::ingest_stream_response::Kind::Ack(ack)),
            })) => acked = acked.max(record(ack, &mut results)),
            Ok(Some(_)) => {}
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    if let Err(e) = ended {
        panic!("the resumed stream failed: {e:?}");
    }
    assert_eq!(acked, total, "every batch acknowledged");
    assert_eq!(
        results.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>(),
        "a result for every batch, including those durable before the kill"
    );
    let accepted: u64 = results.values().map(|b| u64::from(b.accepted)).sum();
    let not_accepted: Vec<&pb::EventResult> =
        results.values().flat_map(|b| &b.non_accepted).collect();
    assert!(not_accepted.is_empty(), "{not_accepted:?}");
    assert_eq!(accepted, events.len() as u64);

    // The event log holds every event exactly once.
    let (records, profile_ids) = stored_events(&ingest, events.len()).await;
    let stored: HashSet<(String, String)> = records.iter().cloned().collect();
    let records = records.len();
    let duplicates = records - stored.len();
    eprintln!(
        "kill test: {} events in {total} batches; {sent_before_kill} batches sent and \
         {acked_before_kill} acknowledged before the kill, {durable_at_reopen} durable at reopen; \
         {records} records stored, {duplicates} duplicates",
        events.len()
    );
    assert_eq!(duplicates, 0);
    assert_eq!(records, events.len());
    for e in &events {
        assert!(stored.contains(&(e.source.clone(), e.event_id.clone())));
    }

    // The profiles' aggregates count each order, refund and engagement exactly once (the
    // outbox is delivered asynchronously: wait for it to drain).
    let expected = expected_totals(&events);
    let actual = wait_for_totals(&profiles, &profile_ids, &expected).await;
    assert_eq!(actual, expected);
    eprintln!(
        "kill test: aggregates match: {} orders, {} refunds, gross {} minor units",
        expected.orders, expected.refunds, expected.gross_minor
    );
}

fn import(ingest: &Service, path: &std::path::Path) -> serde_json::Value {
    let out = std::process::Command::new(bin("clientele"))
        .args([
            "--endpoint",
            &ingest.endpoint,
            "--token",
            ADMIN_TOKEN,
            "--output",
            "json",
            "import",
        ])
        .arg(path)
        .output()
        .expect("run clientele import");
    assert!(
        out.status.success(),
        "clientele import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON summary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn importing_the_same_csv_twice_reports_only_duplicates_the_second_time() {
    let db = TestDatabase::create().await;
    let deployment = Deployment::new(&db.url);
    let profiles = deployment.start("profiles", &[]).await;
    let ingest = deployment
        .start(
            "ingest",
            &[("CLIENTELE_ENDPOINTS__PROFILES", profiles.endpoint.as_str())],
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("transactions.csv");
    let mut file = std::fs::File::create(&path).unwrap();
    let stats = generate::write(&GeneratorConfig::new(5, 400, 365), None, Some(&mut file)).unwrap();
    drop(file);
    assert!(stats.orders > 500, "{stats:?}");

    let first = import(&ingest, &path);
    assert_eq!(first["events"], stats.orders);
    assert_eq!(first["accepted"], stats.orders);
    assert_eq!(first["duplicates"], 0);
    assert_eq!(first["rejected"], 0);

    let second = import(&ingest, &path);
    eprintln!("import: first run {first}\nimport: second run {second}");
    assert_eq!(second["accepted"], 0);
    assert_eq!(second["duplicates"], stats.orders);
    assert_eq!(second["rejected"], 0);
    assert!(!dir.path().join("transactions.csv.rejects.csv").exists());
}
