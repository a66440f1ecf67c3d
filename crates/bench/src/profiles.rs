//! `clientele-bench profiles`: GetProfile over gRPC with a hot Redis cache, beside raw Redis
//! GET throughput measured in the same run.
//!
//! Steps: seed profiles through BatchResolve (customer ids `bench-<i>`), pad each with a
//! string trait so the cached entry is about the size of the raw GET value, warm the cache
//! with one GetProfile each, measure raw Redis GET, run `redis-benchmark` if installed,
//! measure GetProfile, measure raw GET again (so drift from other load on the machine shows),
//! then print the table and append JSON lines.
//!
//! Goal (issue): GetProfile throughput at least half of raw GET, p99 under 2 ms.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clientele_proto::v1 as pb;
use clientele_proto::v1::profile_service_client::ProfileServiceClient;
use prost::Message;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::baseline::{self, RawGet};
use crate::cpu::{self, CpuPerCall};
use crate::load::{self, LoadResult, Window, Worker};
use crate::report::{self, Goal, Row};

/// Fastest GetProfile may be relative to raw GET before the goal is missed.
const GOAL_RATIO: f64 = 0.5;
/// Slowest p99 the goal allows, milliseconds.
const GOAL_P99_MS: f64 = 2.0;

/// Arguments of `clientele-bench profiles`.
#[derive(Debug, clap::Args)]
pub struct ProfilesArgs {
    /// ProfileService endpoint.
    #[arg(
        long,
        env = "CLIENTELE_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    endpoint: String,
    /// Bearer token with `profiles:read` and `profiles:write`.
    #[arg(long, env = "CLIENTELE_TOKEN", hide_env_values = true)]
    token: String,
    /// Redis the server caches in (the raw baseline runs against it too).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Concurrent callers, in both the baseline and the measured run.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Length of each measured period, seconds.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Profiles seeded and read (uniformly at random).
    #[arg(long, default_value_t = 1000)]
    profiles: usize,
    /// Unmeasured load before each measured period, seconds.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// HTTP/2 connections the gRPC callers share round-robin.
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// Bytes of the string trait added to each profile, so the cached entry is about the size
    /// of the raw GET value (1 KB). 0 leaves the profiles bare.
    #[arg(long, default_value_t = 800)]
    pad_bytes: usize,
    /// Key the raw GET baseline reads (set to a 1 KB value for the run, then deleted).
    #[arg(long, default_value = "clientele-bench:raw")]
    raw_key: String,
    /// The server's `redis_key_prefix`: when given, checks every seeded profile is cached
    /// before measuring.
    #[arg(long)]
    server_key_prefix: Option<String>,
    /// The server's metrics address (`host:port`): when given, reports the cache hit ratio and
    /// server-side latency of the measured period.
    #[arg(long)]
    metrics_addr: Option<String>,
    /// The server's process id: when given, reports its CPU time per call.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Requests per `redis-benchmark` run (skipped when it is not installed, or with 0).
    #[arg(long, default_value_t = 200_000)]
    redis_benchmark_requests: u64,
    /// Appends the results as JSON lines to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

/// Adds the bearer token to every call.
#[derive(Debug, Clone)]
struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Client = ProfileServiceClient<InterceptedService<Channel, Bearer>>;

/// One GetProfile caller reading random seeded profiles.
#[derive(Debug)]
struct GetProfile {
    client: Client,
    ids: Arc<Vec<String>>,
    rng: rand::rngs::StdRng,
}

impl Worker for GetProfile {
    async fn call(&mut self) -> anyhow::Result<()> {
        let id = &self.ids[self.rng.gen_range(0..self.ids.len())];
        let resp = self
            .client
            .get_profile(pb::GetProfileRequest {
                profile_id: id.clone(),
            })
            .await?;
        let profile = resp
            .into_inner()
            .profile
            .context("response without profile")?;
        anyhow::ensure!(
            &profile.profile_id == id,
            "got profile {}",
            profile.profile_id
        );
        Ok(())
    }
}

async fn connect(endpoint: &str, channels: usize, token: &str) -> anyhow::Result<Vec<Client>> {
    let bearer =
        Bearer(MetadataValue::try_from(format!("Bearer {token}")).context("token is not ASCII")?);
    let ep = Endpoint::from_shared(endpoint.to_string())
        .context("invalid --endpoint")?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2));
    let mut out = Vec::with_capacity(channels);
    for _ in 0..channels.max(1) {
        let mut attempt = 0;
        let channel = loop {
            match ep.connect().await {
                Ok(c) => break c,
                // The server may still be starting: retry for about ten seconds.
                Err(_) if attempt < 50 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e).with_context(|| format!("connecting to {endpoint}")),
            }
        };
        out.push(
            ProfileServiceClient::with_interceptor(channel, bearer.clone())
                .max_decoding_message_size(16 * 1024 * 1024),
        );
    }
    Ok(out)
}

/// Creates (or finds) `bench-0 … bench-<n-1>` and returns their profile ids in order.
async fn seed(client: &mut Client, n: usize) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let end = (start + 1000).min(n);
        let sets = (start..end)
            .map(|i| pb::IdentifierSet {
                identifiers: vec![pb::Identifier {
                    r#type: pb::IdentifierType::CustomerId as i32,
                    value: format!("bench-{i}"),
                    namespace: String::new(),
                }],
            })
            .collect();
        let resp = client
            .batch_resolve(pb::BatchResolveRequest { sets })
            .await
            .context("BatchResolve")?
            .into_inner();
        anyhow::ensure!(
            resp.results.len() == end - start,
            "BatchResolve answered {} of {} sets",
            resp.results.len(),
            end - start
        );
        ids.extend(resp.results.into_iter().map(|r| r.profile_id));
        start = end;
    }
    Ok(ids)
}

/// Calls `op` for every id, from `tasks` tasks in parallel. Returns the sum of what `op`
/// returned.
async fn for_each_id<F, Fut>(
    clients: &[Client],
    ids: &Arc<Vec<String>>,
    tasks: usize,
    op: F,
) -> anyhow::Result<u64>
where
    F: Fn(Client, String) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<u64>> + Send,
{
    let mut set = JoinSet::new();
    let tasks = tasks.max(1);
    for t in 0..tasks {
        let (ids, op) = (ids.clone(), op.clone());
        let client = clients[t % clients.len()].clone();
        set.spawn(async move {
            let mut sum = 0;
            for id in ids.iter().skip(t).step_by(tasks) {
                sum += op(client.clone(), id.clone()).await?;
            }
            anyhow::Ok(sum)
        });
    }
    let mut total = 0;
    while let Some(r) = set.join_next().await {
        total += r??;
    }
    Ok(total)
}

/// Sums of the server metrics the report uses.
#[derive(Debug, Clone, Copy, Default)]
struct ServerMetrics {
    hits: f64,
    misses: f64,
    errors: f64,
    handling_sum: f64,
    handling_count: f64,
}

async fn scrape(addr: &str) -> anyhow::Result<ServerMetrics> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to metrics at {addr}"))?;
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    let mut m = ServerMetrics::default();
    for line in body.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        if series.starts_with("cache_requests_total{") && series.contains("cache=\"profiles\"") {
            if series.contains("result=\"hit\"") {
                m.hits += value;
            } else if series.contains("result=\"miss\"") {
                m.misses += value;
            } else {
                m.errors += value;
            }
        } else if series.contains("ProfileService/GetProfile") {
            if series.starts_with("grpc_server_handling_seconds_sum{") {
                m.handling_sum += value;
            } else if series.starts_with("grpc_server_handling_seconds_count{") {
                m.handling_count += value;
            }
        }
    }
    Ok(m)
}

/// Runs `workers` for `window`, with CPU readings around the measured part.
async fn measure<W: Worker>(
    workers: Vec<W>,
    window: Window,
    server_pid: Option<u32>,
    control: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<(LoadResult, CpuPerCall)> {
    let run = tokio::spawn(load::drive(workers, window));
    tokio::time::sleep(window.warmup).await;
    let before = cpu::Snapshot::take(server_pid, control).await;
    tokio::time::sleep(window.duration).await;
    let after = cpu::Snapshot::take(server_pid, control).await;
    let result = run.await??;
    let cpu = before.per_call(&after, result.ops + result.errors);
    Ok((result, cpu))
}

/// Runs the profile benchmark.
pub async fn run(args: ProfilesArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    anyhow::ensure!(args.profiles > 0, "--profiles must be at least 1");
    anyhow::ensure!(args.duration_secs > 0, "--duration-secs must be at least 1");
    let window = Window {
        warmup: Duration::from_secs(args.warmup_secs),
        duration: Duration::from_secs(args.duration_secs),
    };
    let redis_client =
        redis::Client::open(args.redis_url.as_str()).context("invalid --redis-url")?;
    let mut control = redis_client
        .get_multiplexed_async_connection()
        .await
        .context("connecting to Redis")?;
    let clients = connect(&args.endpoint, args.channels, &args.token).await?;
    let mut first = clients[0].clone();

    // 1. Seed.
    eprintln!("seeding {} profiles through BatchResolve…", args.profiles);
    let ids = Arc::new(seed(&mut first, args.profiles).await?);
    if args.pad_bytes > 0 {
        let pad = "x".repeat(args.pad_bytes.min(1024));
        for_each_id(&clients, &ids, 16, move |mut c, id| {
            let pad = pad.clone();
            async move {
                let value = pb::Value {
                    kind: Some(pb::value::Kind::StringValue(pad)),
                };
                c.update_traits(pb::UpdateTraitsRequest {
                    profile_id: id,
                    set: [("bench.pad".to_string(), value)].into_iter().collect(),
                    remove: Vec::new(),
                })
                .await
                .context("UpdateTraits")?;
                Ok(0)
            }
        })
        .await?;
    }

    // 2. Warm the cache.
    eprintln!("warming the cache…");
    let bytes = for_each_id(&clients, &ids, 16, |mut c, id| async move {
        let p = c
            .get_profile(pb::GetProfileRequest { profile_id: id })
            .await
            .context("GetProfile")?
            .into_inner()
            .profile
            .context("response without profile")?;
        Ok(p.encoded_len() as u64)
    })
    .await?;
    let profile_bytes = bytes / ids.len() as u64;
    let mut notes = vec![format!(
        "{} profiles of {profile_bytes} bytes (protobuf), read uniformly at random",
        ids.len()
    )];
    if let Some(prefix) = &args.server_key_prefix {
        let mut pipe = redis::pipe();
        for id in ids.iter() {
            pipe.cmd("HEXISTS")
                .arg(format!("{prefix}profiles:{id}"))
                .arg("d");
        }
        let cached: Vec<bool> = pipe.query_async(&mut control).await?;
        let hot = cached.iter().filter(|c| **c).count();
        notes.push(format!(
            "{hot} of {} profiles in Redis before the run",
            ids.len()
        ));
        if hot < ids.len() {
            eprintln!("warning: only {hot} of {} profiles are cached", ids.len());
        }
    }

    // 3. Baselines.
    let raw_value = vec![b'x'; 1024];
    let _: () = redis::cmd("SET")
        .arg(&args.raw_key)
        .arg(&raw_value)
        .arg("EX")
        .arg(3600)
        .query_async(&mut control)
        .await?;
    eprintln!(
        "raw Redis GET baseline: {} connections, {}+{} s…",
        args.concurrency, args.warmup_secs, args.duration_secs
    );
    let workers = RawGet::workers(&redis_client, args.concurrency, &args.raw_key, 1024).await?;
    let (raw_before, raw_before_cpu) =
        measure(workers, window, args.server_pid, &mut control).await?;
    raw_before.check("raw GET")?;

    let mut bench_rows = Vec::new();
    if args.redis_benchmark_requests > 0
        && let Some((host, port)) = baseline::host_port(&redis_client)
    {
        eprintln!("redis-benchmark…");
        for (name, extra) in [
            ("redis-benchmark -t get", vec!["-t", "get"]),
            (
                "redis-benchmark GET 1 KB key",
                vec!["GET", args.raw_key.as_str()],
            ),
        ] {
            match baseline::redis_benchmark(
                &host,
                port,
                args.concurrency,
                args.redis_benchmark_requests,
                &extra,
            )
            .await?
            {
                Some(rps) => bench_rows.push((name, rps)),
                None => {
                    notes.push("redis-benchmark is not installed; skipped".into());
                    break;
                }
            }
        }
    }

    // 4. The measured run.
    eprintln!(
        "gRPC GetProfile: {} callers on {} connections, {}+{} s…",
        args.concurrency, args.channels, args.warmup_secs, args.duration_secs
    );
    let metrics_before = match &args.metrics_addr {
        Some(a) => Some(scrape(a).await?),
        None => None,
    };
    let workers = (0..args.concurrency)
        .map(|i| GetProfile {
            client: clients[i % clients.len()].clone(),
            ids: ids.clone(),
            rng: rand::rngs::StdRng::seed_from_u64(i as u64),
        })
        .collect();
    let (grpc, grpc_cpu) = measure(workers, window, args.server_pid, &mut control).await?;
    grpc.check("GetProfile")?;
    if let (Some(a), Some(before)) = (&args.metrics_addr, metrics_before) {
        let after = scrape(a).await?;
        let (hits, misses, errors) = (
            after.hits - before.hits,
            after.misses - before.misses,
            after.errors - before.errors,
        );
        let looked_up = (hits + misses + errors).max(1.0);
        notes.push(format!(
            "server cache during the gRPC run (warm-up included): {:.2}% hits, {misses} misses, {errors} errors",
            100.0 * hits / looked_up
        ));
        let calls = after.handling_count - before.handling_count;
        if calls > 0.0 {
            notes.push(format!(
                "server-side GetProfile time (to response headers), mean: {:.3} ms",
                1e3 * (after.handling_sum - before.handling_sum) / calls
            ));
        }
    }

    // 5. Raw GET again, so a change in background load shows as a gap between the two.
    eprintln!("raw Redis GET baseline again…");
    let workers = RawGet::workers(&redis_client, args.concurrency, &args.raw_key, 1024).await?;
    let (raw_after, raw_after_cpu) =
        measure(workers, window, args.server_pid, &mut control).await?;
    raw_after.check("raw GET")?;
    let _: () = redis::cmd("DEL")
        .arg(&args.raw_key)
        .query_async(&mut control)
        .await?;

    // 6. Report.
    let raw_rps = (raw_before.rps() + raw_after.rps()) / 2.0;
    let mut rows = vec![
        grpc.row("gRPC GetProfile (hot cache)", grpc_cpu, raw_rps),
        raw_before.row("Redis GET 1 KB (before)", raw_before_cpu, raw_rps),
        raw_after.row("Redis GET 1 KB (after)", raw_after_cpu, raw_rps),
    ];
    for (name, rps) in &bench_rows {
        rows.push(Row {
            name: (*name).to_string(),
            rps: *rps,
            p50_ms: None,
            p99_ms: None,
            p999_ms: None,
            ratio: Some(rps / raw_rps),
            errors: 0,
            cpu: CpuPerCall::default(),
        });
    }
    if let Some((_, rps)) = bench_rows.first() {
        notes.push(format!(
            "GetProfile / redis-benchmark -t get: {:.2}",
            grpc.rps() / rps
        ));
    }
    notes.push(format!(
        "{} concurrent callers; {} s measured after {} s warm-up; raw baseline = mean of before and after",
        args.concurrency, args.duration_secs, args.warmup_secs
    ));
    let goals = vec![
        Goal {
            description: format!(
                "GetProfile throughput >= {GOAL_RATIO} x raw Redis GET (measured {:.2})",
                grpc.rps() / raw_rps
            ),
            met: grpc.rps() >= GOAL_RATIO * raw_rps,
        },
        Goal {
            description: format!(
                "GetProfile p99 < {GOAL_P99_MS} ms (measured {:.3} ms)",
                grpc.ms(0.99)
            ),
            met: grpc.ms(0.99) < GOAL_P99_MS,
        },
    ];
    report::print(
        "profiles: GetProfile with a hot cache",
        &rows,
        &goals,
        &notes,
    );
    if let Some(path) = &args.json_out {
        let context = serde_json::json!({
            "concurrency": args.concurrency,
            "duration_secs": args.duration_secs,
            "warmup_secs": args.warmup_secs,
            "profiles": args.profiles,
            "profile_bytes": profile_bytes,
            "channels": args.channels,
            "cpus": std::thread::available_parallelism().map_or(0, usize::from),
        });
        report::append_json(path, "profiles", &context, &rows, &goals)?;
        eprintln!("results appended to {}", path.display());
    }
    Ok(())
}
