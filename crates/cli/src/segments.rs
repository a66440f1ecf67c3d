//! `clientele segments list|show|members|flows|recompute`: segment definitions with their
//! sizes, one segment's summary (the 80/20 check) and clusters, a segment's members streamed
//! chunk by chunk, the flow matrix between two recompute runs, and a batch recompute followed
//! until it finishes — all through SegmentationService.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clientele_proto::v1 as pb;
use clientele_proto::v1::segmentation_service_client::SegmentationServiceClient;
use clientele_runtime::client::ClientInterceptor;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use tokio_stream::StreamExt as _;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::client::{ConnectionOptions, OutputFormat, authed_channel, emit};
use crate::money::format_minor;

type Client = SegmentationServiceClient<InterceptedService<Channel, ClientInterceptor>>;

/// How often `recompute` asks for the run's progress.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Without a terminal, `recompute` prints a progress line at most this often (and at every
/// phase change).
const LINE_INTERVAL: Duration = Duration::from_secs(5);
/// How many times `members` resumes a broken stream from its last chunk token.
const MEMBER_STREAM_RETRIES: u32 = 5;

/// Segment subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum SegmentsCommand {
    /// List segment definitions with their kind, version and current size.
    List {
        /// Only these kinds (repeatable): rfm, cluster, rule, lifecycle, predicted-value.
        #[arg(long = "kind", value_parser = parse_kind)]
        kinds: Vec<i32>,
    },
    /// One segment: definition, size, summary of a run (RFM means, revenue share, CLV) and,
    /// for CLUSTER segments, the clusters with their centroids.
    Show {
        /// Segment id.
        segment_id: String,
        /// Only this cluster of a CLUSTER segment.
        #[arg(long)]
        cluster: Option<i32>,
        /// The run to summarise (default: the latest successful run).
        #[arg(long, default_value = "")]
        run: String,
    },
    /// Stream the members of a segment as of one run (one profile id per line).
    Members {
        /// Segment id.
        segment_id: String,
        /// Only this cluster of a CLUSTER segment.
        #[arg(long)]
        cluster: Option<i32>,
        /// The run whose snapshot to list (default: the latest successful run).
        #[arg(long, default_value = "")]
        run: String,
        /// Members per streamed chunk (1..=10000).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i32).range(1..=10_000))]
        page_size: i32,
        /// Stop after this many members.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// How many profiles moved between groups from one run to another (e.g. Champions → At
    /// Risk). Without --from/--to: the two latest successful runs.
    Flows {
        /// The earlier run.
        #[arg(long, requires = "to")]
        from: Option<String>,
        /// The later run.
        #[arg(long, requires = "from")]
        to: Option<String>,
        /// Partition by lifecycle state instead of named RFM segment.
        #[arg(long, conflicts_with_all = ["cluster_segment", "segment"])]
        lifecycle: bool,
        /// Partition by the clusters of this CLUSTER segment.
        #[arg(long, conflicts_with = "segment")]
        cluster_segment: Option<String>,
        /// Partition by these segments (repeat, 2..=50; they may overlap).
        #[arg(long = "segment")]
        segment: Vec<String>,
    },
    /// Start a batch recompute of every score and segment and follow it until it finishes.
    Recompute {
        /// Idempotency key: a retry with the same key follows the same run (default: new).
        #[arg(long)]
        key: Option<String>,
        /// Return as soon as the run is accepted instead of following it.
        #[arg(long)]
        detach: bool,
        /// Give up following after this many seconds (the run keeps going on the server).
        #[arg(long, default_value_t = 3600)]
        timeout_secs: u64,
    },
}

/// A kind name → `pb::SegmentKind`.
pub fn parse_kind(s: &str) -> Result<i32, String> {
    let k = match s.to_ascii_lowercase().replace('_', "-").as_str() {
        "rfm" => pb::SegmentKind::Rfm,
        "cluster" => pb::SegmentKind::Cluster,
        "rule" => pb::SegmentKind::Rule,
        "lifecycle" => pb::SegmentKind::Lifecycle,
        "predicted-value" | "predicted" => pb::SegmentKind::PredictedValue,
        _ => {
            return Err(format!(
                "`{s}`: expected rfm, cluster, rule, lifecycle or predicted-value"
            ));
        }
    };
    Ok(k as i32)
}

/// `SEGMENT_KIND_RULE` → `rule`, `RECOMPUTE_PHASE_RFM` → `rfm`: the enum name without its
/// type prefix, lower case; the number for values this build does not know.
fn short_name<E: TryFrom<i32>>(
    raw: i32,
    name: impl Fn(&E) -> &'static str,
    prefix: &str,
) -> String {
    E::try_from(raw).map_or_else(
        |_| raw.to_string(),
        |e| {
            let n = name(&e);
            n.strip_prefix(prefix).unwrap_or(n).to_ascii_lowercase()
        },
    )
}

fn kind_name(kind: i32) -> String {
    short_name(kind, pb::SegmentKind::as_str_name, "SEGMENT_KIND_").replace('_', "-")
}

fn phase_name(phase: i32) -> String {
    short_name(phase, pb::RecomputePhase::as_str_name, "RECOMPUTE_PHASE_").replace('_', " ")
}

fn state_name(state: i32) -> String {
    short_name(state, pb::RecomputeState::as_str_name, "RECOMPUTE_STATE_")
}

fn lifecycle_name(state: i32) -> String {
    short_name(state, pb::LifecycleState::as_str_name, "LIFECYCLE_STATE_").replace('_', " ")
}

fn money(m: Option<&pb::Money>) -> String {
    m.map_or_else(|| "-".into(), |m| format_minor(m.amount_minor, &m.currency))
}

fn money_json(m: Option<&pb::Money>) -> serde_json::Value {
    m.map_or(
        serde_json::Value::Null,
        |m| json!({"amount_minor": m.amount_minor, "currency": m.currency}),
    )
}

/// A random 32-hex-digit idempotency key.
fn new_key() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..16)
        .map(|_| format!("{:02x}", rng.r#gen::<u8>()))
        .collect()
}

fn print(
    options: &ConnectionOptions,
    value: &serde_json::Value,
    human: &str,
) -> anyhow::Result<()> {
    match options.output {
        OutputFormat::Json => emit(&format!("{}\n", serde_json::to_string_pretty(value)?)),
        OutputFormat::Human => emit(human),
    }
}

fn segment_json(s: &pb::Segment) -> serde_json::Value {
    json!({
        "segment_id": s.segment_id,
        "display_name": s.display_name,
        "description": s.description,
        "kind": kind_name(s.kind),
        "version": s.version,
        "size": s.size,
        "last_run_id": s.last_run_id,
        "create_time": crate::json::timestamp(s.create_time.as_ref()),
        "update_time": crate::json::timestamp(s.update_time.as_ref()),
    })
}

/// One line describing a definition (what selects the members).
fn definition_text(s: &pb::Segment) -> String {
    use pb::segment::Definition as D;
    let range =
        |name: &str, r: Option<&pb::ScoreRange>| r.map(|r| format!("{name} {}..{}", r.min, r.max));
    match &s.definition {
        Some(D::Rfm(r)) => {
            let mut parts = Vec::new();
            if !r.segment_names.is_empty() {
                parts.push(format!("named {}", r.segment_names.join(" | ")));
            }
            parts.extend(range("R", r.recency.as_ref()));
            parts.extend(range("F", r.frequency.as_ref()));
            parts.extend(range("M", r.monetary.as_ref()));
            format!("RFM: {}", parts.join(", "))
        }
        Some(D::Cluster(c)) => {
            let features: Vec<String> = c
                .features
                .iter()
                .map(|f| short_name(*f, pb::ClusterFeature::as_str_name, "CLUSTER_FEATURE_"))
                .collect();
            let k = if c.k == 0 {
                "k by silhouette".to_string()
            } else {
                format!("k = {}", c.k)
            };
            format!(
                "{} on {} ({k}, seed {})",
                short_name(
                    c.method,
                    pb::ClusteringMethod::as_str_name,
                    "CLUSTERING_METHOD_"
                ),
                features.join(", "),
                c.seed
            )
        }
        Some(D::Rule(r)) => format!("rule: {}", r.expression),
        Some(D::Lifecycle(l)) => {
            let states: Vec<String> = l.states.iter().map(|s| lifecycle_name(*s)).collect();
            format!("lifecycle: {}", states.join(" | "))
        }
        Some(D::PredictedValue(p)) => {
            let mut parts = Vec::new();
            if let Some(m) = &p.min_clv {
                parts.push(format!("CLV >= {}", money(Some(m))));
            }
            if let Some(m) = &p.max_clv {
                parts.push(format!("CLV < {}", money(Some(m))));
            }
            if let Some(v) = p.min_p_alive {
                parts.push(format!("P(alive) >= {v}"));
            }
            if let Some(v) = p.max_p_alive {
                parts.push(format!("P(alive) < {v}"));
            }
            if let Some(v) = p.min_expected_purchases {
                parts.push(format!("expected purchases >= {v}"));
            }
            if let Some(v) = p.top_fraction {
                parts.push(format!("top {}% by CLV", v * 100.0));
            }
            format!("predicted value: {}", parts.join(", "))
        }
        None => "(no definition)".into(),
    }
}

/// The `segments list` table.
fn list_table(segments: &[pb::Segment]) -> String {
    let width = segments
        .iter()
        .map(|s| s.segment_id.len())
        .max()
        .unwrap_or(0)
        .max("SEGMENT".len());
    let mut out = format!(
        "{:<width$}  {:<15}  {:>7}  {:>10}  {:<36}  NAME\n",
        "SEGMENT", "KIND", "VERSION", "SIZE", "LAST RUN"
    );
    for s in segments {
        let _ = writeln!(
            out,
            "{:<width$}  {:<15}  {:>7}  {:>10}  {:<36}  {}",
            s.segment_id,
            kind_name(s.kind),
            s.version,
            s.size,
            if s.last_run_id.is_empty() {
                "-"
            } else {
                &s.last_run_id
            },
            s.display_name
        );
    }
    if segments.is_empty() {
        out.push_str("(no segments defined)\n");
    }
    out
}

fn summary_text(out: &mut String, s: &pb::GetSegmentSummaryResponse) {
    let _ = writeln!(out, "Summary of run {}", s.run_id);
    let _ = writeln!(
        out,
        "  members          {} ({:.1}% of scored customers)",
        s.size,
        s.share_of_customers * 100.0
    );
    let _ = writeln!(
        out,
        "  revenue          {} of {} ({:.1}%)",
        money(s.revenue.as_ref()),
        money(s.total_revenue.as_ref()),
        s.revenue_share * 100.0
    );
    let _ = writeln!(
        out,
        "  mean R / F / M   {:.2} / {:.2} / {:.2}",
        s.mean_recency_score, s.mean_frequency_score, s.mean_monetary_score
    );
    let _ = writeln!(
        out,
        "  mean recency     {:.1} days, {:.2} orders",
        s.mean_recency_days, s.mean_frequency_orders
    );
    let _ = writeln!(
        out,
        "  predicted CLV    {} mean, P(alive) {:.2}",
        money(s.mean_predicted_clv.as_ref()),
        s.mean_p_alive
    );
}

fn summary_json(s: &pb::GetSegmentSummaryResponse) -> serde_json::Value {
    json!({
        "run_id": s.run_id,
        "size": s.size,
        "share_of_customers": s.share_of_customers,
        "mean_recency_score": s.mean_recency_score,
        "mean_frequency_score": s.mean_frequency_score,
        "mean_monetary_score": s.mean_monetary_score,
        "mean_recency_days": s.mean_recency_days,
        "mean_frequency_orders": s.mean_frequency_orders,
        "revenue": money_json(s.revenue.as_ref()),
        "total_revenue": money_json(s.total_revenue.as_ref()),
        "revenue_share": s.revenue_share,
        "mean_predicted_clv": money_json(s.mean_predicted_clv.as_ref()),
        "mean_p_alive": s.mean_p_alive,
    })
}

fn clusters_text(out: &mut String, c: &pb::ClusterOutput) {
    let features: Vec<String> = c
        .features
        .iter()
        .map(|f| short_name(*f, pb::ClusterFeature::as_str_name, "CLUSTER_FEATURE_"))
        .collect();
    let _ = writeln!(
        out,
        "Clusters (k = {}, {} customers, inertia {:.1}, silhouette {:.3}, stability ARI {:.3})",
        c.k, c.customers, c.inertia, c.silhouette, c.stability_ari
    );
    let _ = write!(out, "  {:>5}  {:>10}", "INDEX", "SIZE");
    for f in &features {
        let _ = write!(out, "  {f:>22}");
    }
    out.push('\n');
    for cl in &c.clusters {
        let _ = write!(out, "  {:>5}  {:>10}", cl.index, cl.size);
        for v in &cl.centroid {
            let _ = write!(out, "  {v:>22.2}");
        }
        out.push('\n');
    }
}

fn cluster_json(c: &pb::ClusterOutput) -> serde_json::Value {
    json!({
        "k": c.k,
        "customers": c.customers,
        "inertia": c.inertia,
        "silhouette": c.silhouette,
        "stability_ari": c.stability_ari,
        "features": c.features.iter().map(|f| short_name(*f, pb::ClusterFeature::as_str_name, "CLUSTER_FEATURE_")).collect::<Vec<_>>(),
        "clusters": c.clusters.iter().map(|cl| json!({
            "index": cl.index,
            "size": cl.size,
            "centroid": cl.centroid,
            "centroid_scaled": cl.centroid_scaled,
        })).collect::<Vec<_>>(),
    })
}

/// A flow group's label.
fn group_label(g: Option<&pb::FlowGroup>) -> String {
    use pb::flow_group::Group;
    match g.and_then(|g| g.group.as_ref()) {
        None => "(outside)".into(),
        Some(Group::RfmSegmentName(n)) => n.clone(),
        Some(Group::LifecycleState(s)) => lifecycle_name(*s),
        Some(Group::ClusterIndex(i)) => format!("cluster {i}"),
        Some(Group::SegmentId(s)) => s.clone(),
    }
}

/// Order of groups in the matrix: lifecycle states and clusters by number, names
/// alphabetically, "(outside)" last.
fn group_order(g: Option<&pb::FlowGroup>) -> (u8, i64, String) {
    use pb::flow_group::Group;
    match g.and_then(|g| g.group.as_ref()) {
        None => (2, 0, String::new()),
        Some(Group::LifecycleState(s)) => (0, i64::from(*s), String::new()),
        Some(Group::ClusterIndex(i)) => (0, i64::from(*i), String::new()),
        Some(Group::RfmSegmentName(n) | Group::SegmentId(n)) => (1, 0, n.clone()),
    }
}

/// The flow matrix: one row per group at the earlier run, one column per group at the later
/// run, with row and column totals. Cells with no profiles show `.`.
pub fn flow_matrix(cells: &[pb::FlowCell]) -> String {
    let mut rows: BTreeMap<(u8, i64, String), String> = BTreeMap::new();
    let mut cols: BTreeMap<(u8, i64, String), String> = BTreeMap::new();
    let mut counts: BTreeMap<(String, String), i64> = BTreeMap::new();
    for c in cells {
        let (from, to) = (group_label(c.from.as_ref()), group_label(c.to.as_ref()));
        rows.insert(group_order(c.from.as_ref()), from.clone());
        cols.insert(group_order(c.to.as_ref()), to.clone());
        *counts.entry((from, to)).or_default() += c.profiles;
    }
    if cells.is_empty() {
        return "(no profiles in either run)\n".into();
    }
    let label_w = rows
        .values()
        .map(String::len)
        .max()
        .unwrap_or(0)
        .max("FROM \\ TO".len());
    let widths: Vec<usize> = cols
        .values()
        .map(|c| {
            let widest = rows
                .values()
                .map(|r| {
                    counts
                        .get(&(r.clone(), c.clone()))
                        .map_or(1, |n| n.to_string().len())
                })
                .max()
                .unwrap_or(1);
            c.len().max(widest)
        })
        .collect();
    let mut out = format!("{:<label_w$}", "FROM \\ TO");
    for (c, w) in cols.values().zip(&widths) {
        let _ = write!(out, "  {c:>w$}");
    }
    out.push_str("      TOTAL\n");
    let mut col_totals = vec![0i64; cols.len()];
    for r in rows.values() {
        let _ = write!(out, "{r:<label_w$}");
        let mut total = 0;
        for (i, (c, w)) in cols.values().zip(&widths).enumerate() {
            match counts.get(&(r.clone(), c.clone())) {
                Some(n) => {
                    total += n;
                    col_totals[i] += n;
                    let _ = write!(out, "  {n:>w$}");
                }
                None => {
                    let _ = write!(out, "  {:>w$}", ".");
                }
            }
        }
        let _ = writeln!(out, "  {total:>9}");
    }
    let _ = write!(out, "{:<label_w$}", "TOTAL");
    for (n, w) in col_totals.iter().zip(&widths) {
        let _ = write!(out, "  {n:>w$}");
    }
    let _ = writeln!(out, "  {:>9}", col_totals.iter().sum::<i64>());
    out
}

fn flows_json(cells: &[pb::FlowCell]) -> serde_json::Value {
    json!(
        cells
            .iter()
            .map(|c| json!({
                "from": group_label(c.from.as_ref()),
                "to": group_label(c.to.as_ref()),
                "profiles": c.profiles,
            }))
            .collect::<Vec<_>>()
    )
}

fn run_json(r: &pb::Recompute) -> serde_json::Value {
    let outputs = r.outputs.as_ref().map(|o| {
        json!({
            "entered": o.entered,
            "exited": o.exited,
            "scored_customers": o.rfm.as_ref().map_or(0, |r| r.scored_customers),
            "rfm_segments": o.rfm.as_ref().map(|r| r.segment_counts.iter().map(|c| json!({"segment_name": c.segment_name, "customers": c.customers})).collect::<Vec<_>>()),
            "lifecycle": o.lifecycle_counts.iter().map(|c| json!({"state": lifecycle_name(c.state), "customers": c.customers})).collect::<Vec<_>>(),
            "segments": o.segments.iter().map(|s| json!({"segment_id": s.segment_id, "size": s.size})).collect::<Vec<_>>(),
            "clusters": o.clusters.iter().map(|c| json!({"segment_id": c.segment_id, "cluster": cluster_json(c)})).collect::<Vec<_>>(),
        })
    });
    json!({
        "run_id": r.run_id,
        "state": state_name(r.state),
        "phase": phase_name(r.phase),
        "processed": r.processed,
        "total": r.total,
        "requested_by": r.requested_by,
        "create_time": crate::json::timestamp(r.create_time.as_ref()),
        "start_time": crate::json::timestamp(r.start_time.as_ref()),
        "finish_time": crate::json::timestamp(r.finish_time.as_ref()),
        "data_as_of": crate::json::timestamp(r.data_as_of.as_ref()),
        "error_message": r.error_message,
        "changes_cursor": r.changes_cursor,
        "outputs": outputs,
    })
}

/// What a finished run produced, as text.
fn run_text(r: &pb::Recompute) -> String {
    let mut out = String::new();
    let took = match (&r.start_time, &r.finish_time) {
        (Some(s), Some(f)) => {
            #[allow(clippy::cast_precision_loss)]
            let secs = (f.seconds - s.seconds) as f64 + f64::from(f.nanos - s.nanos) / 1e9;
            format!(" in {secs:.1} s")
        }
        _ => String::new(),
    };
    let _ = writeln!(out, "run {}: {}{took}", r.run_id, state_name(r.state));
    if !r.error_message.is_empty() {
        let _ = writeln!(out, "  error: {}", r.error_message);
    }
    let Some(o) = &r.outputs else {
        return out;
    };
    if let Some(rfm) = &o.rfm {
        let _ = writeln!(
            out,
            "RFM segments ({} scored customers)",
            rfm.scored_customers
        );
        let mut counts = rfm.segment_counts.clone();
        counts.sort_by(|a, b| {
            b.customers
                .cmp(&a.customers)
                .then(a.segment_name.cmp(&b.segment_name))
        });
        for c in &counts {
            let _ = writeln!(out, "  {:<22} {:>10}", c.segment_name, c.customers);
        }
    }
    if !o.lifecycle_counts.is_empty() {
        out.push_str("Lifecycle\n");
        for c in &o.lifecycle_counts {
            let _ = writeln!(out, "  {:<22} {:>10}", lifecycle_name(c.state), c.customers);
        }
    }
    if !o.segments.is_empty() || !o.clusters.is_empty() {
        out.push_str("Segments\n");
        for s in &o.segments {
            let _ = writeln!(out, "  {:<22} {:>10}", s.segment_id, s.size);
        }
        for c in &o.clusters {
            let sizes: Vec<String> = c.clusters.iter().map(|x| x.size.to_string()).collect();
            let _ = writeln!(
                out,
                "  {:<22} {:>10}  clusters [{}]",
                c.segment_id,
                c.customers,
                sizes.join(", ")
            );
        }
    }
    let _ = writeln!(
        out,
        "Membership changes: {} entered, {} exited",
        o.entered, o.exited
    );
    out
}

/// Follows run `run_id` until it finishes, showing progress on standard error (a bar on a
/// terminal, otherwise a line at each phase change and every few seconds).
async fn follow(
    client: &mut Client,
    run_id: &str,
    key: &str,
    timeout: Duration,
) -> anyhow::Result<pb::Recompute> {
    let progress = if std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:<14} {bar:40} {pos}/{len} profiles  {elapsed}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let lines = progress.is_hidden();
    let started = Instant::now();
    let mut last_line: Option<(i32, Instant)> = None;
    loop {
        let run = client
            .get_recompute(pb::GetRecomputeRequest {
                run_id: run_id.to_owned(),
            })
            .await?
            .into_inner()
            .run
            .context("server returned no run")?;
        let finished = run.state == pb::RecomputeState::Succeeded as i32
            || run.state == pb::RecomputeState::Failed as i32;
        let phase = if run.state == pb::RecomputeState::Pending as i32 {
            "pending".to_string()
        } else {
            phase_name(run.phase)
        };
        progress.set_message(phase.clone());
        progress.set_length(u64::try_from(run.total).unwrap_or(0));
        progress.set_position(u64::try_from(run.processed).unwrap_or(0));
        if lines && !finished {
            let due =
                last_line.is_none_or(|(p, at)| p != run.phase || at.elapsed() >= LINE_INTERVAL);
            if due {
                eprintln!(
                    "{:>6.1} s  {phase}: {}/{} profiles",
                    started.elapsed().as_secs_f64(),
                    run.processed,
                    run.total
                );
                last_line = Some((run.phase, Instant::now()));
            }
        }
        if finished {
            progress.finish_and_clear();
            return Ok(run);
        }
        if started.elapsed() > timeout {
            progress.abandon();
            bail!(
                "run {run_id} is still {} after {} s; it keeps going on the server (follow it with \
                 `clientele segments recompute --key {key}`)",
                state_name(run.state),
                timeout.as_secs()
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The two latest successful runs (older first).
async fn latest_two_runs(client: &mut Client) -> anyhow::Result<(String, String)> {
    let runs = client
        .list_recomputes(pb::ListRecomputesRequest {
            states: vec![pb::RecomputeState::Succeeded as i32],
            page_size: 2,
            page_token: String::new(),
        })
        .await?
        .into_inner()
        .runs;
    match runs.as_slice() {
        [newer, older, ..] => Ok((older.run_id.clone(), newer.run_id.clone())),
        _ => bail!(
            "flows need two successful recompute runs; there are {} (start one with `clientele segments recompute`)",
            runs.len()
        ),
    }
}

/// Streams the members, resuming from the last chunk's token when the stream breaks. Calls
/// `each` for every member; stops after `limit`. Returns (members seen, total, run id).
async fn stream_members(
    client: &mut Client,
    mut request: pb::ListSegmentMembersRequest,
    limit: Option<u64>,
    mut each: impl FnMut(&pb::SegmentMember) -> anyhow::Result<()>,
) -> anyhow::Result<(u64, i64, String)> {
    let mut seen = 0u64;
    let mut total = 0;
    let mut run_id = String::new();
    let mut retries = 0;
    'outer: loop {
        let mut stream = match client.list_segment_members(request.clone()).await {
            Ok(r) => r.into_inner(),
            Err(e)
                if retries < MEMBER_STREAM_RETRIES
                    && !request.page_token.is_empty()
                    && resumable(&e) =>
            {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(200 << retries)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) if retries < MEMBER_STREAM_RETRIES && resumable(&e) => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(200 << retries)).await;
                    continue 'outer;
                }
                Err(e) => return Err(e.into()),
            };
            total = chunk.total_members;
            run_id.clone_from(&chunk.run_id);
            for m in &chunk.members {
                if limit.is_some_and(|l| seen >= l) {
                    break 'outer;
                }
                each(m)?;
                seen += 1;
            }
            if chunk.next_page_token.is_empty() {
                break 'outer;
            }
            // The next chunk resumes after this one, in the same snapshot.
            request.page_token = chunk.next_page_token;
            request.run_id.clear();
        }
        break;
    }
    Ok((seen, total, run_id))
}

/// Whether a failed stream is worth resuming from its last token.
fn resumable(e: &tonic::Status) -> bool {
    matches!(
        e.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::Cancelled
    )
}

/// Runs a segments subcommand.
#[allow(clippy::too_many_lines)]
pub async fn run(command: SegmentsCommand, options: &ConnectionOptions) -> anyhow::Result<()> {
    let mut client: Client = SegmentationServiceClient::new(authed_channel(options)?);
    match command {
        SegmentsCommand::List { kinds } => {
            let mut segments = Vec::new();
            let mut token = String::new();
            loop {
                let r = client
                    .list_segments(pb::ListSegmentsRequest {
                        kinds: kinds.clone(),
                        page_size: 500,
                        page_token: token.clone(),
                    })
                    .await?
                    .into_inner();
                segments.extend(r.segments);
                if r.next_page_token.is_empty() {
                    break;
                }
                token = r.next_page_token;
            }
            print(
                options,
                &json!(segments.iter().map(segment_json).collect::<Vec<_>>()),
                &list_table(&segments),
            )
        }
        SegmentsCommand::Show {
            segment_id,
            cluster,
            run,
        } => {
            let segment = client
                .get_segment(pb::GetSegmentRequest {
                    segment_id: segment_id.clone(),
                })
                .await?
                .into_inner()
                .segment
                .context("server returned no segment")?;
            let mut text = format!(
                "Segment {}  ({}, version {})\n  name        {}\n",
                segment.segment_id,
                kind_name(segment.kind),
                segment.version,
                segment.display_name
            );
            if !segment.description.is_empty() {
                let _ = writeln!(text, "  description {}", segment.description);
            }
            let _ = writeln!(text, "  definition  {}", definition_text(&segment));
            let _ = writeln!(text, "  size        {}", segment.size);
            let _ = writeln!(
                text,
                "  updated     {}",
                crate::render::timestamp(segment.update_time.as_ref())
            );
            let mut value = segment_json(&segment);
            let has_run = !run.is_empty() || !segment.last_run_id.is_empty();
            if has_run {
                let summary = client
                    .get_segment_summary(pb::GetSegmentSummaryRequest {
                        segment: Some(pb::SegmentRef {
                            segment_id: segment_id.clone(),
                            cluster_index: cluster,
                        }),
                        run_id: run.clone(),
                    })
                    .await?
                    .into_inner();
                summary_text(&mut text, &summary);
                value["summary"] = summary_json(&summary);
                if segment.kind == pb::SegmentKind::Cluster as i32 {
                    let outputs = client
                        .get_recompute(pb::GetRecomputeRequest {
                            run_id: summary.run_id.clone(),
                        })
                        .await?
                        .into_inner()
                        .run
                        .and_then(|r| r.outputs);
                    if let Some(c) = outputs
                        .iter()
                        .flat_map(|o| o.clusters.iter())
                        .find(|c| c.segment_id == segment_id)
                    {
                        let mut c = c.clone();
                        if let Some(i) = cluster {
                            c.clusters.retain(|x| x.index == i);
                        }
                        clusters_text(&mut text, &c);
                        value["clusters"] = cluster_json(&c);
                    }
                }
            } else {
                text.push_str("  (not computed by a recompute run yet)\n");
            }
            print(options, &value, &text)
        }
        SegmentsCommand::Members {
            segment_id,
            cluster,
            run,
            page_size,
            limit,
        } => {
            let request = pb::ListSegmentMembersRequest {
                segment: Some(pb::SegmentRef {
                    segment_id,
                    cluster_index: cluster,
                }),
                run_id: run,
                page_size,
                page_token: String::new(),
            };
            let json_out = options.output == OutputFormat::Json;
            // Members are written as they arrive (JSON Lines with --output json), so a large
            // segment is never held in memory.
            let (seen, total, run_id) = stream_members(&mut client, request, limit, |m| {
                let line = if json_out {
                    format!(
                        "{}\n",
                        json!({"profile_id": m.profile_id, "cluster_index": m.cluster_index})
                    )
                } else {
                    match m.cluster_index {
                        Some(c) => format!("{}\t{c}\n", m.profile_id),
                        None => format!("{}\n", m.profile_id),
                    }
                };
                emit(&line)
            })
            .await?;
            if !json_out {
                eprintln!("{seen} of {total} members (run {run_id})");
            }
            Ok(())
        }
        SegmentsCommand::Flows {
            from,
            to,
            lifecycle,
            cluster_segment,
            segment,
        } => {
            use pb::flow_dimension::Dimension;
            let dimension = if lifecycle {
                Dimension::LifecycleStates(true)
            } else if let Some(id) = cluster_segment {
                Dimension::ClusterSegmentId(id)
            } else if !segment.is_empty() {
                Dimension::Segments(pb::SegmentIdList {
                    segment_ids: segment,
                })
            } else {
                Dimension::RfmSegments(true)
            };
            let (from, to) = match (from, to) {
                (Some(f), Some(t)) => (f, t),
                _ => latest_two_runs(&mut client).await?,
            };
            let cells = client
                .get_segment_flows(pb::GetSegmentFlowsRequest {
                    from_run_id: from.clone(),
                    to_run_id: to.clone(),
                    dimension: Some(pb::FlowDimension {
                        dimension: Some(dimension),
                    }),
                })
                .await?
                .into_inner()
                .cells;
            let moved: i64 = cells
                .iter()
                .filter(|c| group_label(c.from.as_ref()) != group_label(c.to.as_ref()))
                .map(|c| c.profiles)
                .sum();
            let text = format!(
                "Flows from run {from} to run {to} ({moved} profiles changed group)\n{}",
                flow_matrix(&cells)
            );
            print(
                options,
                &json!({"from_run_id": from, "to_run_id": to, "cells": flows_json(&cells)}),
                &text,
            )
        }
        SegmentsCommand::Recompute {
            key,
            detach,
            timeout_secs,
        } => {
            let key = key.unwrap_or_else(new_key);
            let started = client
                .start_recompute(pb::StartRecomputeRequest {
                    idempotency_key: key.clone(),
                    requested_by: "clientele-cli".into(),
                })
                .await?
                .into_inner();
            let run = started.run.context("server returned no run")?;
            if !started.created && options.output == OutputFormat::Human {
                eprintln!("following run {} that was already started", run.run_id);
            }
            let run = if detach {
                run
            } else {
                follow(
                    &mut client,
                    &run.run_id,
                    &key,
                    Duration::from_secs(timeout_secs),
                )
                .await?
            };
            print(options, &run_json(&run), &run_text(&run))?;
            if run.state == pb::RecomputeState::Failed as i32 {
                bail!("recompute run {} failed: {}", run.run_id, run.error_message);
            }
            Ok(())
        }
    }
}

/// Distinct group labels of one side of the cells (for tests and callers that list groups).
#[cfg(test)]
fn labels(cells: &[pb::FlowCell], from: bool) -> std::collections::BTreeSet<String> {
    cells
        .iter()
        .map(|c| group_label(if from { c.from.as_ref() } else { c.to.as_ref() }))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn name(n: &str) -> Option<pb::FlowGroup> {
        Some(pb::FlowGroup {
            group: Some(pb::flow_group::Group::RfmSegmentName(n.into())),
        })
    }

    fn cell(from: Option<pb::FlowGroup>, to: Option<pb::FlowGroup>, n: i64) -> pb::FlowCell {
        pb::FlowCell {
            from,
            to,
            profiles: n,
        }
    }

    #[test]
    fn kinds_parse_by_name() {
        assert_eq!(parse_kind("rule").unwrap(), pb::SegmentKind::Rule as i32);
        assert_eq!(
            parse_kind("predicted_value").unwrap(),
            pb::SegmentKind::PredictedValue as i32
        );
        assert!(parse_kind("clusters").is_err());
    }

    #[test]
    fn the_flow_matrix_puts_earlier_groups_in_rows_and_totals_both_ways() {
        let cells = vec![
            cell(name("Champions"), name("Champions"), 70),
            cell(name("Champions"), name("At Risk"), 30),
            cell(name("At Risk"), name("Lost"), 5),
            cell(None, name("New Customers"), 12),
        ];
        let m = flow_matrix(&cells);
        let lines: Vec<&str> = m.lines().collect();
        assert!(lines[0].starts_with("FROM \\ TO"), "{m}");
        // Columns alphabetical: At Risk, Champions, Lost, New Customers.
        let header: Vec<&str> = lines[0]
            .split("  ")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        assert_eq!(
            header,
            [
                "FROM \\ TO",
                "At Risk",
                "Champions",
                "Lost",
                "New Customers",
                "TOTAL"
            ]
        );
        let champions: Vec<&str> = lines
            .iter()
            .find(|l| l.starts_with("Champions"))
            .unwrap()
            .split_whitespace()
            .collect();
        assert_eq!(champions, ["Champions", "30", "70", ".", ".", "100"]);
        // "(outside)" is the last row; the last line totals the columns.
        assert!(lines[lines.len() - 2].starts_with("(outside)"), "{m}");
        let total: Vec<&str> = lines[lines.len() - 1].split_whitespace().collect();
        assert_eq!(total, ["TOTAL", "30", "70", "5", "12", "117"]);
        assert_eq!(labels(&cells, true).len(), 3);
    }

    #[test]
    fn lifecycle_and_cluster_groups_are_ordered_by_number() {
        use pb::flow_group::Group;
        let state = |s: pb::LifecycleState| {
            Some(pb::FlowGroup {
                group: Some(Group::LifecycleState(s as i32)),
            })
        };
        let cells = vec![
            cell(
                state(pb::LifecycleState::Lapsed),
                state(pb::LifecycleState::Churned),
                4,
            ),
            cell(
                state(pb::LifecycleState::New),
                state(pb::LifecycleState::Active),
                9,
            ),
        ];
        let m = flow_matrix(&cells);
        let rows: Vec<&str> = m
            .lines()
            .skip(1)
            .map(|l| l.split("  ").next().unwrap())
            .collect();
        assert_eq!(rows, ["new", "lapsed", "TOTAL"]);
        assert!(
            m.lines().next().unwrap().find("active") < m.lines().next().unwrap().find("churned")
        );
        assert_eq!(flow_matrix(&[]), "(no profiles in either run)\n");
    }

    #[test]
    fn a_finished_run_lists_rfm_counts_largest_first_and_the_changes() {
        let run = pb::Recompute {
            run_id: "r1".into(),
            state: pb::RecomputeState::Succeeded as i32,
            outputs: Some(pb::RecomputeOutputs {
                rfm: Some(pb::RfmOutput {
                    scored_customers: 10,
                    segment_counts: vec![
                        pb::RfmSegmentCount {
                            segment_name: "Lost".into(),
                            segment: 11,
                            customers: 3,
                        },
                        pb::RfmSegmentCount {
                            segment_name: "Champions".into(),
                            segment: 1,
                            customers: 7,
                        },
                    ],
                    ..Default::default()
                }),
                entered: 12,
                exited: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = run_text(&run);
        assert!(text.starts_with("run r1: succeeded"), "{text}");
        assert!(text.find("Champions") < text.find("Lost"), "{text}");
        assert!(text.contains("12 entered, 2 exited"), "{text}");
        assert_eq!(run_json(&run)["outputs"]["scored_customers"], 10);
    }
}
