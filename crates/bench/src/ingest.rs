//! `clientele-bench ingest`: a realistic generated event stream (repeat customers, several
//! identifiers per customer, mixed kinds, time-ordered) driven through the bidirectional
//! `IngestStream` into PostgreSQL, beside a raw PostgreSQL `COPY` of the same events as
//! event-shaped rows (uuid key, bigint, text, timestamptz, numeric, jsonb) in the same run.
//!
//! Reported: events per second end to end (first batch sent → last batch acknowledged as
//! durable), batch acknowledgement latency percentiles, the ingest server's peak RSS (VmHWM),
//! and the ratio to the COPY rate.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clientele::generate::{self, GeneratorConfig};
use clientele_proto::v1 as pb;
use clientele_proto::v1::ingest_service_client::IngestServiceClient;
use hdrhistogram::Histogram;
use sqlx::Connection;
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;

use crate::cpu;

/// Arguments of `clientele-bench ingest`.
#[derive(Debug, clap::Args)]
pub struct IngestArgs {
    /// IngestService endpoint.
    #[arg(long, default_value = "http://127.0.0.1:50752")]
    pub endpoint: String,
    /// Bearer token (needs `ingest:write`).
    #[arg(long, env = "CLIENTELE_TOKEN", hide_env_values = true)]
    pub token: String,
    /// PostgreSQL for the raw COPY baseline (a scratch schema is created and dropped).
    #[arg(long)]
    pub database_url: String,
    /// Generated customers.
    #[arg(long, default_value_t = 3000)]
    pub customers: u32,
    /// Days of history per customer.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// Generator seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Events per stream batch.
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    /// PID of the ingest server, for its peak RSS and CPU time.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// PID of the profiles server (BatchResolve, ApplyAggregates), for its CPU time.
    #[arg(long)]
    pub profiles_pid: Option<u32>,
    /// Append the results as JSON lines here.
    #[arg(long)]
    pub json_out: Option<std::path::PathBuf>,
    /// Names a run beside the main one (e.g. "30,000 customers"): its figures are reported
    /// under this name and the issue's goals are judged on the main run only.
    #[arg(long)]
    pub scenario: Option<String>,
}

fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// COPY text-format escaping of one field.
fn copy_field(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\t', "\\t")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}

/// Raw `COPY` of the events as event-shaped rows; returns rows per second and PostgreSQL's
/// CPU microseconds per row (all `postgres` processes, as for the stream).
async fn copy_baseline(url: &str, events: &[pb::Event]) -> anyhow::Result<(f64, Option<f64>)> {
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .context("connecting for the COPY baseline")?;
    let schema = format!("bench_copy_{}", std::process::id());
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await?;
    sqlx::query(&format!(
        "CREATE TABLE {schema}.events (event_id uuid PRIMARY KEY, customer bigint NOT NULL, \
         kind text NOT NULL, occurred_at timestamptz NOT NULL, amount numeric, properties jsonb NOT NULL)"
    ))
    .execute(&mut conn)
    .await?;
    let mut customers: HashMap<String, i64> = HashMap::new();
    let mut text = String::with_capacity(events.len() * 512);
    for e in events {
        let who = e
            .identifiers
            .as_ref()
            .and_then(|s| s.identifiers.first())
            .map_or_else(String::new, |i| i.value.clone());
        let next = i64::try_from(customers.len()).unwrap_or(i64::MAX);
        let customer = *customers.entry(who).or_insert(next);
        let uuid = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, e.event_id.as_bytes());
        let at = e
            .occurred_at
            .as_ref()
            .map_or(0, |t| t.seconds * 1_000_000 + i64::from(t.nanos / 1000));
        let at = chrono::DateTime::from_timestamp_micros(at).unwrap_or_default();
        let amount = match &e.payload {
            Some(pb::event::Payload::OrderCompleted(o)) => {
                o.total.as_ref().map_or("\\N".to_string(), |m| {
                    format!("{}.{:02}", m.amount_minor / 100, m.amount_minor % 100)
                })
            }
            _ => "\\N".to_string(),
        };
        let json = clientele::event_json::event_to_json(e).to_string();
        text.push_str(&format!(
            "{uuid}\t{customer}\t{}\t{}\t{amount}\t{}\n",
            generate::payload_name(e),
            at.to_rfc3339(),
            copy_field(&json)
        ));
    }
    let pg_before = cpu::processes_named("postgres");
    let started = Instant::now();
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY {schema}.events (event_id, customer, kind, occurred_at, amount, properties) FROM STDIN"
        ))
        .await?;
    for chunk in text.as_bytes().chunks(1 << 20) {
        copy.send(chunk).await?;
    }
    let rows = copy.finish().await?;
    let secs = started.elapsed().as_secs_f64();
    let pg_us = per_event(pg_before, cpu::processes_named("postgres"), rows);
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut conn)
        .await?;
    if rows != events.len() as u64 {
        bail!("COPY wrote {rows} rows of {}", events.len());
    }
    Ok((rows as f64 / secs, pg_us))
}

/// CPU microseconds per event between two readings.
fn per_event(before: Option<Duration>, after: Option<Duration>, events: u64) -> Option<f64> {
    let (before, after) = (before?, after?);
    (events > 0).then(|| after.saturating_sub(before).as_secs_f64() * 1e6 / events as f64)
}

/// CPU time of the processes an ingested event passes through.
#[derive(Debug, Clone, Copy)]
struct StreamCpu {
    ingest: Option<Duration>,
    profiles: Option<Duration>,
    postgres: Option<Duration>,
    client: Option<Duration>,
}

impl StreamCpu {
    fn take(args: &IngestArgs) -> Self {
        let pid = |p: Option<u32>| p.and_then(|p| cpu::process(&p.to_string()));
        Self {
            ingest: pid(args.server_pid),
            profiles: pid(args.profiles_pid),
            postgres: cpu::processes_named("postgres"),
            client: cpu::process("self"),
        }
    }
}

/// Waits (at most 10 minutes) until the ingest aggregate follower has passed the end of the
/// log and the outbox holds no deliverable row; returns the seconds since `started` at that
/// moment.
async fn outbox_drained(url: &str, started: Instant) -> anyhow::Result<f64> {
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .context("connecting to watch the outbox")?;
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM ingest.outbox WHERE ready = 1) \
             + (SELECT count(*) FROM ingest.events WHERE seq > COALESCE( \
               (SELECT position FROM ingest.feed_cursors WHERE feed = 'aggregates'), 0))",
        )
        .fetch_one(&mut conn)
        .await
        .context("reading the ingest outbox")?;
        let at = started.elapsed().as_secs_f64();
        if left == 0 || at > 600.0 {
            return Ok(at);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the ingest benchmark and prints its table.
pub async fn run(args: IngestArgs) -> anyhow::Result<()> {
    eprintln!(
        "generating {} customers x {} days (seed {})…",
        args.customers, args.days, args.seed
    );
    let config = GeneratorConfig::new(args.seed, args.customers, args.days);
    let mut events: Vec<pb::Event> = generate::events(&config).collect();
    // A live stream interleaves customers in time order.
    events.sort_by_key(|e| e.occurred_at.as_ref().map(|t| (t.seconds, t.nanos)));
    let n = events.len();
    eprintln!("{n} events; raw COPY baseline…");
    let (copy_rps, copy_pg_us) = copy_baseline(&args.database_url, &events).await?;

    eprintln!("streaming through IngestStream…");
    let channel = tonic::transport::Endpoint::from_shared(args.endpoint.clone())?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.endpoint))?;
    let auth: MetadataValue<_> = format!("Bearer {}", args.token).parse()?;
    let mut client =
        IngestServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", auth.clone());
            Ok(r)
        });
    let (tx, rx) = mpsc::channel(64);
    tx.send(pb::IngestStreamRequest {
        kind: Some(pb::ingest_stream_request::Kind::Open(
            pb::IngestStreamOpen {
                producer_id: format!("bench-{}-{}", std::process::id(), args.seed),
                last_received_ack: 0,
            },
        )),
    })
    .await?;
    let mut inbound = client
        .ingest_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let opened = match inbound.message().await?.and_then(|m| m.kind) {
        Some(pb::ingest_stream_response::Kind::Opened(o)) => o,
        other => bail!("expected `opened`, got {other:?}"),
    };
    let window = u64::from(opened.max_unacked_batches.max(1));
    let batches: Vec<&[pb::Event]> = events.chunks(args.batch_size.max(1)).collect();
    let total = batches.len() as u64;
    let mut sent_at: HashMap<u64, Instant> = HashMap::new();
    let mut latency = Histogram::<u64>::new(3)?;
    let (mut next, mut acked) = (1u64, 0u64);
    let (mut accepted, mut rejected, mut duplicates) = (0u64, 0u64, 0u64);
    let cpu_before = StreamCpu::take(&args);
    let started = Instant::now();
    while acked < total {
        while next <= total && next - acked <= window {
            let events = batches[usize::try_from(next - 1)?].to_vec();
            sent_at.insert(next, Instant::now());
            tx.send(pb::IngestStreamRequest {
                kind: Some(pb::ingest_stream_request::Kind::Batch(
                    pb::IngestStreamBatch {
                        sequence: next,
                        events,
                    },
                )),
            })
            .await?;
            next += 1;
        }
        let msg = tokio::time::timeout(Duration::from_secs(60), inbound.message())
            .await
            .context("no acknowledgement for 60 s")??
            .context("the server ended the stream early")?;
        if let Some(pb::ingest_stream_response::Kind::Ack(ack)) = msg.kind {
            for b in &ack.batches {
                accepted += u64::from(b.accepted);
                duplicates += u64::from(b.duplicates);
                rejected += b.non_accepted.len() as u64;
            }
            let now = Instant::now();
            for seq in (acked + 1)..=ack.durable_through_sequence {
                if let Some(t) = sent_at.remove(&seq) {
                    latency.record(u64::try_from(now.duration_since(t).as_micros())?)?;
                }
            }
            acked = acked.max(ack.durable_through_sequence);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    drop(tx);
    // Acknowledged means stored; the aggregate deltas follow asynchronously through the
    // log and the outbox. Report how long after the last acknowledgement ProfileService had them all.
    let drain_secs = outbox_drained(&args.database_url, started).await? - secs;
    // CPU from the first batch to the aggregates' arrival in ProfileService: everything an
    // event costs, not only what precedes its acknowledgement.
    let cpu_after = StreamCpu::take(&args);
    let events_u64 = n as u64;
    let cpu_us = [
        (
            "ingest",
            per_event(cpu_before.ingest, cpu_after.ingest, events_u64),
        ),
        (
            "profiles",
            per_event(cpu_before.profiles, cpu_after.profiles, events_u64),
        ),
        (
            "postgres",
            per_event(cpu_before.postgres, cpu_after.postgres, events_u64),
        ),
        (
            "client",
            per_event(cpu_before.client, cpu_after.client, events_u64),
        ),
    ];
    let rps = n as f64 / secs;
    let p = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    let rss = args.server_pid.and_then(peak_rss_mb);
    let ratio = rps / copy_rps;

    println!();
    match &args.scenario {
        None => println!("== ingest: generated stream through IngestStream into PostgreSQL =="),
        Some(name) => println!("== ingest, {name}: generated stream through IngestStream =="),
    }
    println!(
        "{:<44} {:>10} {:>8} {:>8} {:>8} {:>7}",
        "benchmark", "events/s", "p50 ms", "p99 ms", "max ms", "x COPY"
    );
    println!(
        "{:<44} {:>10.0} {:>8.1} {:>8.1} {:>8.1} {:>7.2}",
        "IngestStream (batch ack latency)",
        rps,
        p(0.5),
        p(0.99),
        p(1.0),
        ratio
    );
    println!(
        "{:<44} {:>10.0} {:>8} {:>8} {:>8} {:>7.2}",
        "raw PostgreSQL COPY, same events", copy_rps, "-", "-", "-", 1.0
    );
    let goals = [
        (
            format!("events/s >= 0.6 x raw COPY (measured {ratio:.2})"),
            ratio >= 0.6,
        ),
        (
            format!(
                "p99 batch acknowledgement < 50 ms (measured {:.1} ms)",
                p(0.99)
            ),
            p(0.99) < 50.0,
        ),
        (
            format!(
                "ingest peak RSS < 200 MB (measured {})",
                rss.map_or("n/a".into(), |r| format!("{r:.0} MB"))
            ),
            rss.is_some_and(|r| r < 200.0),
        ),
    ];
    if args.scenario.is_none() {
        for (text, met) in &goals {
            println!("{}  {text}", if *met { "PASS" } else { "MISS" });
        }
    }
    println!(
        "note: {n} events in {total} batches of {}; accepted {accepted}, duplicates {duplicates}, not accepted {rejected}; window {window} batches",
        args.batch_size
    );
    println!(
        "note: aggregates applied in ProfileService {drain_secs:.1} s after the last acknowledgement ({:.0} events/s including them)",
        n as f64 / (secs + drain_secs)
    );
    let shown = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.1}"));
    let total_us: Option<f64> = cpu_us[..3].iter().map(|(_, v)| *v).sum();
    println!(
        "note: CPU per event (µs, first batch to aggregates applied): ingest {}, profiles {}, PostgreSQL {}, bench client {}; servers and PostgreSQL together {} = {} x the PostgreSQL CPU per row of the COPY ({})",
        shown(cpu_us[0].1),
        shown(cpu_us[1].1),
        shown(cpu_us[2].1),
        shown(cpu_us[3].1),
        shown(total_us),
        total_us
            .zip(copy_pg_us)
            .map_or("n/a".into(), |(t, c)| format!("{:.1}", t / c)),
        shown(copy_pg_us),
    );
    if let Some(path) = &args.json_out {
        use std::io::Write as _;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let line = serde_json::json!({
            "suite": "ingest",
            "scenario": args.scenario,
            "customers": args.customers,
            "days": args.days,
            "events": n,
            "events_per_sec": rps,
            "copy_rows_per_sec": copy_rps,
            "ratio_to_copy": ratio,
            "ack_p50_ms": p(0.5),
            "ack_p99_ms": p(0.99),
            "peak_rss_mb": rss,
            "accepted": accepted,
            "duplicates": duplicates,
            "not_accepted": rejected,
            "aggregates_lag_secs": drain_secs,
            "cpu_us_per_event_ingest": cpu_us[0].1,
            "cpu_us_per_event_profiles": cpu_us[1].1,
            "cpu_us_per_event_postgres": cpu_us[2].1,
            "cpu_us_per_event_client": cpu_us[3].1,
            "copy_postgres_cpu_us_per_row": copy_pg_us,
        });
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}
