//! Segmentation persistence behind one trait, [`SegmentationStore`], with one SQL
//! implementation for PostgreSQL and SQLite through `sqlx::Any`.
//!
//! * **Feeds, exactly once**: the consumer folds a batch of events (or profile changes) and
//!   advances the feed cursor in the same transaction, after checking the stored cursor is the
//!   one the batch was read after ([`StoreError::CursorMoved`] otherwise), so a crash or a
//!   second consumer never applies an event twice. Orders are keyed `(profile, order id)` (the
//!   first ORDER_COMPLETED wins), refunds by their event key, engagement is a per-day counter.
//! * **Membership changes in commit order**: every transaction that appends to `seg_changes`
//!   first takes one PostgreSQL advisory lock ([`CHANGES_LOCK`]), so sequence numbers are
//!   committed in order and a watcher that has seen `seq = n` never later finds a smaller one.
//!   On SQLite writers are serialised anyway.
//! * **Bulk work in PostgreSQL**: over a native `PgPool` (opened by
//!   [`SqlSegmentationStore::connect_postgres`]) a batch run loads every profile's facts and
//!   the current memberships with `COPY … TO STDOUT` streams, writes only the membership diff
//!   (exits ended with `… USING UNNEST`, binary `COPY` for entries and the change log) and the run's
//!   scores with a binary `COPY` into a partition of their own, so a run costs a constant
//!   number of statements whatever the number of profiles.
//!   A real-time re-score is one read statement and one call
//!   of the `seg_apply_realtime` function. Elsewhere (SQLite, or a store built with
//!   [`SqlSegmentationStore::new`]) the same diff is computed in Rust and written with
//!   multi-row INSERTs chunked under the bind-parameter limits.
//! * **Versioned memberships**: a membership row is valid from `from_version` to
//!   `to_version` (open while current). A published run takes the next version; its member
//!   snapshot is the rows valid at it, so a run whose memberships did not change writes no
//!   membership row. Writes between runs (real-time re-scores, merges, erasure, segment
//!   deletion) end and open rows at the pending version (the newest run's + 1), which no
//!   retained run can see; retention deletes rows closed before the oldest retained run.
//!   Runs published before migration 0003 keep their member snapshot in `seg_run_members`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use async_trait::async_trait;
use clientele_proto::v1 as pb;
use clientele_runtime::db::{Database, WriteTx};
use prost::Message;
use sqlx::any::{AnyArguments, AnyRow};
use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::{Any, AnyConnection, Row};

use crate::scoring::{ProfileData, RunModel, StoredOrder};

/// Advisory lock serialising appends to the membership change log (PostgreSQL).
pub const CHANGES_LOCK: i64 = 0x7365_675f_6368_6773;
/// Advisory lock serialising feed folds and run state changes (PostgreSQL).
const FEED_LOCK: i64 = 0x7365_675f_6665_6564;
const RUN_LOCK: i64 = 0x7365_675f_7275_6e73;
/// How long a batch publication waits for the memberships' exclusive lock before loading its
/// entries through the indexes instead ([`bulk_load_lock`]).
const BULK_LOCK_TIMEOUT: &str = "1s";
/// Bind parameters per statement (SQLite allows 32 766, PostgreSQL 65 535).
const MAX_PARAMS: usize = 30_000;
/// Bind parameters per multi-row INSERT on SQLite.
const SQLITE_PARAMS: usize = 480;
/// Ids per `IN (…)` lookup.
const LOOKUP_CHUNK: usize = 500;
/// Engagement window, days.
pub const ENGAGEMENT_DAYS: i64 = 90;
const DAY_MICROS: i64 = 86_400_000_000;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such segment.
    #[error("segment `{0}` not found")]
    SegmentNotFound(String),
    /// The segment was deleted; ids are never reused.
    #[error("segment `{0}` was deleted; segment ids are never reused")]
    SegmentDeleted(String),
    /// Optimistic concurrency check failed.
    #[error("segment `{id}` is at version {actual}, not {expected}")]
    VersionMismatch {
        /// The segment.
        id: String,
        /// The version the caller expected.
        expected: i64,
        /// The stored version (0: does not exist).
        actual: i64,
    },
    /// No such run.
    #[error("recompute run `{0}` not found")]
    RunNotFound(String),
    /// The feed cursor moved since the batch was read (another consumer applied it).
    #[error("feed `{0}` cursor moved concurrently")]
    CursorMoved(String),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// Stored data could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

/// Result type of the store.
pub type StoreResult<T> = Result<T, StoreError>;

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// One fact folded from the event feed, already mapped to the reporting currency.
#[derive(Debug, Clone, PartialEq)]
pub enum Fact {
    /// A completed order.
    Order {
        /// Profile at ingestion.
        profile_id: String,
        /// Retailer order id.
        order_id: String,
        /// When placed, µs.
        placed_at: i64,
        /// Gross amount, reporting minor units (0 when not convertible).
        amount_minor: i64,
        /// Discount, reporting minor units.
        discount_minor: i64,
        /// Whether the amount could be converted.
        converted: bool,
        /// Category spend (top-level category, reporting minor units).
        lines: Vec<(String, i64)>,
    },
    /// A refund.
    Refund {
        /// Profile at ingestion.
        profile_id: String,
        /// Unique key of the refund event.
        refund_key: String,
        /// Refunded order.
        order_id: String,
        /// Amount, reporting minor units.
        amount_minor: i64,
        /// Whether it refunds the whole order.
        full: bool,
    },
    /// One engagement event.
    Engagement {
        /// Profile at ingestion.
        profile_id: String,
        /// When, µs.
        at: i64,
        /// Kind name (`product_viewed`, `email_opened`, …).
        kind: String,
    },
    /// A profile seen without behaviour (e.g. created).
    Seen {
        /// The profile.
        profile_id: String,
        /// When, µs.
        at: i64,
    },
}

/// A profile change from ProfileService.
#[derive(Debug, Clone, PartialEq)]
pub enum ProfileEvent {
    /// Created or updated (traits, consent, aggregates).
    Touched(String),
    /// `merged` were merged into `survivor`.
    Merged {
        /// The surviving profile.
        survivor: String,
        /// The merged-away profiles.
        merged: Vec<String>,
    },
    /// Erased.
    Erased(String),
}

/// A stored segment.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentRecord {
    /// The segment as stored (definition, names; output-only fields filled on read).
    pub segment: pb::Segment,
    /// Kind code.
    pub kind: i32,
    /// Version.
    pub version: i64,
    /// Created, µs.
    pub created_at: i64,
    /// Updated, µs.
    pub updated_at: i64,
    /// Deleted flag.
    pub deleted: bool,
    /// Latest run that computed this version.
    pub last_run_id: String,
}

/// Scores of one profile as stored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScoreRow {
    /// The profile.
    pub profile_id: String,
    /// R, F, M scores.
    pub rfm: Option<(i64, i64, i64)>,
    /// Named RFM segment.
    pub rfm_name: Option<String>,
    /// Days since last order (window).
    pub recency_days: Option<f64>,
    /// Orders in the window.
    pub frequency: Option<i64>,
    /// Net revenue in the window, reporting minor units.
    pub monetary_minor: Option<i64>,
    /// Lifecycle code.
    pub lifecycle: Option<i64>,
    /// When the lifecycle state was entered, µs.
    pub lifecycle_since: Option<i64>,
    /// CLV, reporting minor units.
    pub clv: Option<f64>,
    /// P(alive).
    pub p_alive: Option<f64>,
    /// Expected purchases over the horizon.
    pub exp_purchases: Option<f64>,
    /// Expected order value, minor units.
    pub exp_aov: Option<f64>,
}

/// A membership (current or in a run snapshot).
#[derive(Debug, Clone, PartialEq)]
pub struct MemberRow {
    /// The segment.
    pub segment_id: String,
    /// The profile.
    pub profile_id: String,
    /// Cluster index, -1 for non-CLUSTER segments.
    pub cluster_index: i64,
    /// Distance to the centroid (CLUSTER only).
    pub distance: Option<f64>,
    /// When entered, µs.
    pub entered_at: i64,
}

/// One membership change.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeRow {
    /// Log position (0 before it is written).
    pub seq: i64,
    /// Unique id.
    pub change_id: String,
    /// The profile.
    pub profile_id: String,
    /// The segment.
    pub segment_id: String,
    /// Cluster index or -1.
    pub cluster_index: i64,
    /// `MembershipChangeType` code.
    pub change_type: i32,
    /// `MembershipChangeReason` code.
    pub reason: i32,
    /// Run id for RECOMPUTE.
    pub run_id: String,
    /// When, µs.
    pub occurred_at: i64,
}

/// A recompute run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    /// Run id.
    pub run_id: String,
    /// Idempotency key.
    pub idempotency_key: String,
    /// Who asked.
    pub requested_by: String,
    /// `RecomputeState` code.
    pub state: i32,
    /// `RecomputePhase` code.
    pub phase: i32,
    /// Processed in the phase.
    pub processed: i64,
    /// Total in the phase.
    pub total: i64,
    /// Accepted, µs.
    pub created_at: i64,
    /// Started, µs.
    pub start_time: Option<i64>,
    /// Finished, µs.
    pub finish_time: Option<i64>,
    /// Failure reason.
    pub error_message: String,
    /// Data as of, µs.
    pub data_as_of: Option<i64>,
    /// Outputs (SUCCEEDED).
    pub outputs: Option<pb::RecomputeOutputs>,
    /// Change cursor after publishing.
    pub changes_cursor: String,
    /// Fitted models (SUCCEEDED).
    pub model: Option<RunModel>,
}

/// Everything a run publishes.
#[derive(Debug, Clone)]
pub struct RunPublication {
    /// The run.
    pub run_id: String,
    /// Scores of every profile.
    pub scores: Vec<ScoreRow>,
    /// New complete memberships of `segments`.
    pub members: Vec<MemberRow>,
    /// Segments evaluated, with the versions evaluated.
    pub segments: Vec<(String, i64)>,
    /// Outputs (entered/exited are filled in by the store).
    pub outputs: pb::RecomputeOutputs,
    /// Fitted models.
    pub model: RunModel,
    /// Publication time, µs.
    pub now: i64,
    /// Run snapshots to keep.
    pub retained_runs: u32,
}

/// The lifecycle a profile was last scored with: what a re-score needs of its previous scores
/// to keep `lifecycle_since` while the state is unchanged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PreviousLifecycle {
    /// Lifecycle code, if any.
    pub lifecycle: Option<i64>,
    /// Since when, µs, if recorded.
    pub lifecycle_since: Option<i64>,
    /// When those scores were computed (re-score time or the run's finish), µs.
    pub scored_at: i64,
}

/// Everything a real-time re-score reads before scoring: on PostgreSQL one statement.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RescoreRead {
    /// The latest succeeded run (its model is cached by the engine).
    pub latest_run: Option<String>,
    /// Changes whenever a segment is defined, redefined or deleted (the engine's compiled
    /// segments are reused while it is unchanged).
    pub segments_stamp: String,
    /// Histories of the known profiles among the requested ids, by id.
    pub profiles: Vec<ProfileData>,
    /// Previous lifecycle of each profile that has scores.
    pub previous: HashMap<String, PreviousLifecycle>,
}

/// Aggregates of a segment in a run snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SummaryRow {
    /// Members.
    pub size: i64,
    /// Members with RFM scores.
    pub scored: i64,
    /// Mean R, F, M.
    pub mean_rfm: (f64, f64, f64),
    /// Mean recency days and orders.
    pub mean_recency_days: f64,
    /// Mean orders.
    pub mean_frequency: f64,
    /// Members' revenue.
    pub revenue: i64,
    /// Members with predictions, mean CLV and P(alive).
    pub predicted: i64,
    /// Mean CLV.
    pub mean_clv: f64,
    /// Mean P(alive).
    pub mean_p_alive: f64,
}

/// Everything SegmentationService persists. Each call is atomic.
#[async_trait]
pub trait SegmentationStore: Send + Sync + std::fmt::Debug {
    /// The stored cursor of `feed`.
    async fn feed_cursor(&self, feed: &str) -> StoreResult<Option<String>>;
    /// Folds `facts` and moves `feed` from `expected` to `cursor` atomically. Returns the
    /// (alias-resolved) profiles whose facts changed.
    async fn apply_events(
        &self,
        feed: &str,
        expected: Option<&str>,
        cursor: &str,
        facts: &[Fact],
    ) -> StoreResult<BTreeSet<String>>;
    /// Applies profile changes and moves `feed`: merges move the merged ids' facts to the
    /// survivor, erasures delete everything about the profile; memberships of merged or
    /// erased ids end with EXITED changes. Returns the profiles to re-score and the changes.
    async fn apply_profile_events(
        &self,
        feed: &str,
        expected: Option<&str>,
        cursor: &str,
        events: &[ProfileEvent],
        now: i64,
    ) -> StoreResult<(BTreeSet<String>, Vec<ChangeRow>)>;
    /// The surviving id of `profile_id` and whether it is known (not erased).
    async fn resolve_profile(&self, profile_id: &str) -> StoreResult<Option<String>>;

    /// Creates or replaces a segment. `expected_version` 0 skips the check.
    async fn define_segment(
        &self,
        segment: &pb::Segment,
        kind: i32,
        expected_version: i64,
        now: i64,
    ) -> StoreResult<(SegmentRecord, bool)>;
    /// One segment (deleted ones included).
    async fn get_segment(&self, id: &str) -> StoreResult<SegmentRecord>;
    /// Live segments with id above `after`, by id.
    async fn list_segments(
        &self,
        kinds: &[i32],
        after: &str,
        limit: i64,
    ) -> StoreResult<Vec<SegmentRecord>>;
    /// Every live segment.
    async fn live_segments(&self) -> StoreResult<Vec<SegmentRecord>>;
    /// Current member counts by segment.
    async fn segment_sizes(&self, ids: &[String]) -> StoreResult<HashMap<String, i64>>;
    /// Deletes a segment; its members exit. `Ok(None)` when already deleted.
    async fn delete_segment(&self, id: &str, now: i64) -> StoreResult<Vec<ChangeRow>>;

    /// Starts a run unless the key was used (that run, false) or one is active (it, false).
    async fn start_run(&self, run: &RunRecord) -> StoreResult<(RunRecord, bool)>;
    /// Records progress; `start_time` is set on the first RUNNING update.
    async fn run_progress(
        &self,
        run_id: &str,
        phase: i32,
        processed: i64,
        total: i64,
        now: i64,
        data_as_of: Option<i64>,
    ) -> StoreResult<()>;
    /// Marks a run FAILED.
    async fn fail_run(&self, run_id: &str, message: &str, now: i64) -> StoreResult<()>;
    /// Marks PENDING/RUNNING runs FAILED (after a restart). Returns how many.
    async fn fail_interrupted_runs(&self, now: i64) -> StoreResult<u64>;
    /// One run.
    async fn get_run(&self, run_id: &str) -> StoreResult<RunRecord>;
    /// Runs newest first, after the `(created_at, run_id)` position.
    async fn list_runs(
        &self,
        states: &[i32],
        before: Option<(i64, String)>,
        limit: i64,
    ) -> StoreResult<Vec<RunRecord>>;
    /// The latest SUCCEEDED run.
    async fn latest_run(&self) -> StoreResult<Option<RunRecord>>;
    /// Publishes a run: memberships diffed and changed, snapshots written, run SUCCEEDED.
    async fn publish_run(&self, publication: RunPublication) -> StoreResult<RunRecord>;

    /// Histories of every known profile (engagement over the 90 days before `as_of`), by id.
    async fn load_all_profiles(&self, as_of: i64) -> StoreResult<Vec<ProfileData>>;
    /// Histories of `ids` (known ones only).
    async fn load_profiles(&self, ids: &[String], as_of: i64) -> StoreResult<Vec<ProfileData>>;
    /// Lifecycle state and since of every profile in a run snapshot.
    async fn run_lifecycles(&self, run_id: &str) -> StoreResult<HashMap<String, (i64, i64)>>;

    /// Current memberships of `profile_ids` in live segments.
    async fn memberships_of(&self, profile_ids: &[String]) -> StoreResult<Vec<MemberRow>>;
    /// Writes real-time scores (at most one row per profile) and replaces the memberships of
    /// `profiles` in `segments` with `members`, appending the changes. Returns the changes.
    async fn apply_realtime(
        &self,
        run_id: &str,
        scores: &[ScoreRow],
        segments: &[String],
        members: &[MemberRow],
        now: i64,
    ) -> StoreResult<Vec<ChangeRow>>;
    /// What a re-score of `ids` reads: the latest run id, the segments stamp, the profiles'
    /// histories and previous lifecycles (on PostgreSQL over the native pool in one statement).
    async fn rescore_read(&self, ids: &[String], as_of: i64) -> StoreResult<RescoreRead>;
    /// The latest scores of a profile: (scores, run id, scored_at).
    async fn profile_scores(
        &self,
        profile_id: &str,
    ) -> StoreResult<Option<(ScoreRow, String, i64)>>;

    /// Members of a segment in a run snapshot after `after_profile`, by profile id.
    async fn run_members(
        &self,
        run_id: &str,
        segment_id: &str,
        cluster: Option<i64>,
        after_profile: &str,
        limit: i64,
    ) -> StoreResult<Vec<(String, i64)>>;
    /// Member count of a segment in a run snapshot.
    async fn run_member_count(
        &self,
        run_id: &str,
        segment_id: &str,
        cluster: Option<i64>,
    ) -> StoreResult<i64>;
    /// Whether the run's snapshot is retained.
    async fn run_retained(&self, run_id: &str) -> StoreResult<bool>;
    /// Aggregates of a segment in a run snapshot.
    async fn run_summary(
        &self,
        run_id: &str,
        segment_id: &str,
        cluster: Option<i64>,
    ) -> StoreResult<SummaryRow>;
    /// (scored customers, their total revenue) in a run snapshot.
    async fn run_totals(&self, run_id: &str) -> StoreResult<(i64, i64)>;
    /// `profile → group` of a run snapshot: RFM name (`"rfm"`) or lifecycle code
    /// (`"lifecycle"`).
    async fn run_score_groups(
        &self,
        run_id: &str,
        dimension: &str,
    ) -> StoreResult<HashMap<String, String>>;
    /// `(profile, segment, cluster)` rows of a run snapshot for `segments`.
    async fn run_member_rows(
        &self,
        run_id: &str,
        segments: &[String],
    ) -> StoreResult<Vec<(String, String, i64)>>;

    /// Membership changes after `seq`, in order.
    async fn changes_after(&self, seq: i64, limit: i64) -> StoreResult<Vec<ChangeRow>>;
    /// The last change's seq (0 when none).
    async fn changes_end(&self) -> StoreResult<i64>;
}

/// The SQL implementation of [`SegmentationStore`].
#[derive(Debug, Clone)]
pub struct SqlSegmentationStore {
    db: Database,
    /// Native PostgreSQL pool for COPY and array binds (batch publication), when on PostgreSQL.
    pg: Option<PgPool>,
}

type AnyQuery<'q> = sqlx::query::Query<'q, Any, AnyArguments<'q>>;

/// Runs `INSERT INTO {head} VALUES (…), (…) {tail}` for `rows` rows of `cols` values, chunked
/// under the parameter limit; `bind` binds row `i`'s values in column order.
async fn insert_many<'a, F>(
    conn: &mut AnyConnection,
    head: &str,
    tail: &str,
    cols: usize,
    rows: usize,
    bind: F,
) -> Result<(), sqlx::Error>
where
    F: for<'q> Fn(AnyQuery<'q>, usize) -> AnyQuery<'q>,
{
    // SQLite binds `$n` parameters by name lookup, which grows with the parameter count;
    // statements of a few hundred parameters are much faster there than huge ones.
    let max_params = if conn.backend_name() == "SQLite" {
        SQLITE_PARAMS
    } else {
        MAX_PARAMS
    };
    let per = (max_params / cols).max(1);
    let mut start = 0;
    while start < rows {
        let end = (start + per).min(rows);
        let mut sql = String::with_capacity(64 + (end - start) * cols * 6);
        sql.push_str("INSERT INTO ");
        sql.push_str(head);
        sql.push_str(" VALUES ");
        let mut p = 1;
        for r in start..end {
            if r > start {
                sql.push(',');
            }
            sql.push('(');
            for c in 0..cols {
                if c > 0 {
                    sql.push(',');
                }
                sql.push('$');
                sql.push_str(&p.to_string());
                p += 1;
            }
            sql.push(')');
        }
        sql.push(' ');
        sql.push_str(tail);
        // Not cached as a prepared statement: chunks share their SQL text while the declared
        // types of NULL parameters differ between them, and PostgreSQL would reject a cached
        // statement's stale parameter types ("incorrect binary data format").
        let mut q = sqlx::query(&sql).persistent(false);
        for r in start..end {
            q = bind(q, r);
        }
        q.execute(&mut *conn).await?;
        start = end;
    }
    Ok(())
}

fn bind_strings<'q>(sql: &'q str, binds: &[String]) -> AnyQuery<'q> {
    let mut q = sqlx::query(sql);
    for b in binds {
        q = q.bind(b.clone());
    }
    q
}

fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

const SEGMENT_COLUMNS: &str =
    "segment_id, definition, kind, version, created_at, updated_at, deleted, last_run_id";

fn segment_from_row(row: &AnyRow) -> StoreResult<SegmentRecord> {
    let hex_def: String = row.try_get("definition")?;
    let bytes = hex::decode(hex_def).map_err(corrupt)?;
    let mut segment = pb::Segment::decode(bytes.as_slice()).map_err(corrupt)?;
    let kind: i64 = row.try_get("kind")?;
    let version: i64 = row.try_get("version")?;
    let created_at: i64 = row.try_get("created_at")?;
    let updated_at: i64 = row.try_get("updated_at")?;
    let last_run_id: String = row.try_get("last_run_id")?;
    let deleted: i64 = row.try_get("deleted")?;
    segment.kind = i32::try_from(kind).map_err(corrupt)?;
    segment.version = version;
    segment.create_time = Some(clientele_runtime::time::timestamp(created_at));
    segment.update_time = Some(clientele_runtime::time::timestamp(updated_at));
    segment.last_run_id.clone_from(&last_run_id);
    Ok(SegmentRecord {
        segment,
        kind: i32::try_from(kind).map_err(corrupt)?,
        version,
        created_at,
        updated_at,
        deleted: deleted != 0,
        last_run_id,
    })
}

/// The stored form of a definition: only the client-settable fields.
fn stored_definition(segment: &pb::Segment) -> String {
    let clean = pb::Segment {
        segment_id: segment.segment_id.clone(),
        display_name: segment.display_name.clone(),
        description: segment.description.clone(),
        definition: segment.definition.clone(),
        ..Default::default()
    };
    hex::encode(clean.encode_to_vec())
}

const RUN_COLUMNS: &str = "run_id, idempotency_key, requested_by, state, phase, processed, total, \
     created_at, start_time, finish_time, error_message, data_as_of, outputs, changes_cursor, model";

fn run_from_row(row: &AnyRow) -> StoreResult<RunRecord> {
    let outputs_hex: String = row.try_get("outputs")?;
    let outputs = if outputs_hex.is_empty() {
        None
    } else {
        let bytes = hex::decode(outputs_hex).map_err(corrupt)?;
        Some(pb::RecomputeOutputs::decode(bytes.as_slice()).map_err(corrupt)?)
    };
    let model_json: String = row.try_get("model")?;
    let model = if model_json.is_empty() {
        None
    } else {
        Some(serde_json::from_str(&model_json).map_err(corrupt)?)
    };
    let state: i64 = row.try_get("state")?;
    let phase: i64 = row.try_get("phase")?;
    Ok(RunRecord {
        run_id: row.try_get("run_id")?,
        idempotency_key: row.try_get("idempotency_key")?,
        requested_by: row.try_get("requested_by")?,
        state: i32::try_from(state).map_err(corrupt)?,
        phase: i32::try_from(phase).map_err(corrupt)?,
        processed: row.try_get("processed")?,
        total: row.try_get("total")?,
        created_at: row.try_get("created_at")?,
        start_time: row.try_get("start_time")?,
        finish_time: row.try_get("finish_time")?,
        error_message: row.try_get("error_message")?,
        data_as_of: row.try_get("data_as_of")?,
        outputs,
        changes_cursor: row.try_get("changes_cursor")?,
        model,
    })
}

const SCORE_COLUMNS: &str = "profile_id, r, f, m, rfm_name, recency_days, frequency, \
     monetary_minor, lifecycle, lifecycle_since, clv, p_alive, exp_purchases, exp_aov";

fn score_from_row(row: &AnyRow) -> StoreResult<ScoreRow> {
    let r: Option<i64> = row.try_get("r")?;
    let f: Option<i64> = row.try_get("f")?;
    let m: Option<i64> = row.try_get("m")?;
    Ok(ScoreRow {
        profile_id: row.try_get("profile_id")?,
        rfm: match (r, f, m) {
            (Some(r), Some(f), Some(m)) => Some((r, f, m)),
            _ => None,
        },
        rfm_name: row.try_get("rfm_name")?,
        recency_days: row.try_get("recency_days")?,
        frequency: row.try_get("frequency")?,
        monetary_minor: row.try_get("monetary_minor")?,
        lifecycle: row.try_get("lifecycle")?,
        lifecycle_since: row.try_get("lifecycle_since")?,
        clv: row.try_get("clv")?,
        p_alive: row.try_get("p_alive")?,
        exp_purchases: row.try_get("exp_purchases")?,
        exp_aov: row.try_get("exp_aov")?,
    })
}

fn bind_score<'q>(q: AnyQuery<'q>, s: &ScoreRow) -> AnyQuery<'q> {
    q.bind(s.profile_id.clone())
        .bind(s.rfm.map(|x| x.0))
        .bind(s.rfm.map(|x| x.1))
        .bind(s.rfm.map(|x| x.2))
        .bind(s.rfm_name.clone())
        .bind(s.recency_days)
        .bind(s.frequency)
        .bind(s.monetary_minor)
        .bind(s.lifecycle)
        .bind(s.lifecycle_since)
        .bind(s.clv)
        .bind(s.p_alive)
        .bind(s.exp_purchases)
        .bind(s.exp_aov)
}

fn change_from_row(row: &AnyRow) -> StoreResult<ChangeRow> {
    let change_type: i64 = row.try_get("change_type")?;
    let reason: i64 = row.try_get("reason")?;
    Ok(ChangeRow {
        seq: row.try_get("seq")?,
        change_id: row.try_get("change_id")?,
        profile_id: row.try_get("profile_id")?,
        segment_id: row.try_get("segment_id")?,
        cluster_index: row.try_get("cluster_index")?,
        change_type: i32::try_from(change_type).map_err(corrupt)?,
        reason: i32::try_from(reason).map_err(corrupt)?,
        run_id: row.try_get("run_id")?,
        occurred_at: row.try_get("occurred_at")?,
    })
}

/// A change about to be appended.
fn change(
    profile_id: &str,
    segment_id: &str,
    cluster_index: i64,
    change_type: pb::MembershipChangeType,
    reason: pb::MembershipChangeReason,
    run_id: &str,
    now: i64,
) -> ChangeRow {
    // A version-4 UUID from the thread's CSPRNG: one getrandom call per change would dominate
    // a run that publishes millions of changes.
    let bytes: [u8; 16] = rand::Rng::r#gen(&mut rand::thread_rng());
    ChangeRow {
        seq: 0,
        change_id: uuid::Builder::from_random_bytes(bytes)
            .into_uuid()
            .to_string(),
        profile_id: profile_id.to_owned(),
        segment_id: segment_id.to_owned(),
        cluster_index,
        change_type: change_type as i32,
        reason: reason as i32,
        run_id: run_id.to_owned(),
        occurred_at: now,
    }
}

/// Current memberships: segment id → profile id → cluster index (-1 outside CLUSTER segments).
type CurrentMembers = HashMap<String, HashMap<String, i64>>;

fn add_current(current: &mut CurrentMembers, segment_id: String, profile_id: String, cluster: i64) {
    current
        .entry(segment_id)
        .or_default()
        .insert(profile_id, cluster);
}

/// The new-vs-current diff of memberships: (rows to delete, rows to insert, changes). A
/// membership whose cluster is unchanged is left alone (no write, no change); a move between
/// clusters is an EXITED then an ENTERED. Exits of memberships absent from `next` come last,
/// ordered by (segment, profile).
fn diff_memberships(
    current: &CurrentMembers,
    next: &[MemberRow],
    reason: pb::MembershipChangeReason,
    run_id: &str,
    now: i64,
) -> (Vec<(String, String)>, Vec<MemberRow>, Vec<ChangeRow>) {
    let mut matcher = MemberMatcher::new(next);
    for (segment, profiles) in current {
        for (profile, cluster) in profiles {
            matcher.current(segment, profile, *cluster);
        }
    }
    matcher.diff(reason, run_id, now)
}

/// [`diff_memberships`] fed one current membership at a time (as a COPY stream is parsed),
/// holding only the run's memberships indexed by (segment, profile) and the current cluster
/// of each: no copy of the current memberships is built. The index is built at the first
/// current membership, so a first run (none) builds none.
struct MemberMatcher<'a> {
    next: &'a [MemberRow],
    index: HashMap<(&'a str, &'a str), usize, foldhash::fast::RandomState>,
    /// The current cluster of `next[i]` once a current membership was seen (`None` when
    /// `next[i]` is not a current membership); empty before.
    old: Vec<Option<i64>>,
    /// Current memberships absent from `next`.
    gone: Vec<(String, String, i64)>,
}

/// The diff of [`MemberMatcher`], borrowing the run's memberships.
struct MemberDiff<'a> {
    next: &'a [MemberRow],
    /// Memberships to write: the index in `next` and, for a cluster move, the old cluster.
    entries: Vec<(usize, Option<i64>)>,
    /// Current memberships absent from `next`, ordered by (segment, profile).
    gone: Vec<(String, String, i64)>,
}

impl<'a> MemberMatcher<'a> {
    fn new(next: &'a [MemberRow]) -> Self {
        Self {
            next,
            index: HashMap::default(),
            old: Vec::new(),
            gone: Vec::new(),
        }
    }

    /// One current membership.
    fn current(&mut self, segment: &str, profile: &str, cluster: i64) {
        if self.old.is_empty() && !self.next.is_empty() {
            self.index.reserve(self.next.len());
            for (i, m) in self.next.iter().enumerate() {
                self.index
                    .insert((m.segment_id.as_str(), m.profile_id.as_str()), i);
            }
            self.old = vec![None; self.next.len()];
        }
        match self.index.get(&(segment, profile)) {
            Some(&i) => self.old[i] = Some(cluster),
            None => self
                .gone
                .push((segment.to_owned(), profile.to_owned(), cluster)),
        }
    }

    /// The memberships to write and the ones gone. A membership whose cluster is unchanged
    /// is left alone (no write, no change); a move between clusters is an EXITED then an
    /// ENTERED.
    fn finish(mut self) -> MemberDiff<'a> {
        let entries = if self.old.is_empty() {
            (0..self.next.len()).map(|i| (i, None)).collect()
        } else {
            self.old
                .iter()
                .enumerate()
                .filter(|(i, old)| **old != Some(self.next[*i].cluster_index))
                .map(|(i, old)| (i, *old))
                .collect()
        };
        self.gone.sort_unstable();
        MemberDiff {
            next: self.next,
            entries,
            gone: self.gone,
        }
    }

    fn diff(
        self,
        reason: pb::MembershipChangeReason,
        run_id: &str,
        now: i64,
    ) -> (Vec<(String, String)>, Vec<MemberRow>, Vec<ChangeRow>) {
        self.finish().rows(reason, run_id, now)
    }
}

impl MemberDiff<'_> {
    /// Memberships ended: the old side of cluster moves (in `next` order), then the gone.
    fn deletes(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries
            .iter()
            .filter(|(_, old)| old.is_some())
            .map(|(i, _)| {
                let m = &self.next[*i];
                (m.segment_id.as_str(), m.profile_id.as_str())
            })
            .chain(self.gone.iter().map(|(s, p, _)| (s.as_str(), p.as_str())))
    }

    /// The changes in log order, without ids: per entry in `next` order an EXITED of the old
    /// cluster (a move) then the ENTERED, then the exits of the gone. Items are (profile,
    /// segment, cluster, entered).
    fn changes(&self) -> impl Iterator<Item = (&str, &str, i64, bool)> {
        self.entries
            .iter()
            .flat_map(|(i, old)| {
                let m = &self.next[*i];
                let (p, s) = (m.profile_id.as_str(), m.segment_id.as_str());
                old.map(|c| (p, s, c, false))
                    .into_iter()
                    .chain(std::iter::once((p, s, m.cluster_index, true)))
            })
            .chain(
                self.gone
                    .iter()
                    .map(|(s, p, c)| (p.as_str(), s.as_str(), *c, false)),
            )
    }

    /// (entered, exited) counts of [`Self::changes`].
    fn counts(&self) -> (usize, usize) {
        let moves = self.entries.iter().filter(|(_, o)| o.is_some()).count();
        (self.entries.len(), moves + self.gone.len())
    }

    /// Owned (rows to delete, rows to insert, changes), for the portable path.
    fn rows(
        &self,
        reason: pb::MembershipChangeReason,
        run_id: &str,
        now: i64,
    ) -> (Vec<(String, String)>, Vec<MemberRow>, Vec<ChangeRow>) {
        use pb::MembershipChangeType as T;
        let deletes = self
            .deletes()
            .map(|(s, p)| (s.to_owned(), p.to_owned()))
            .collect();
        let inserts = self
            .entries
            .iter()
            .map(|(i, _)| MemberRow {
                entered_at: now,
                ..self.next[*i].clone()
            })
            .collect();
        let changes = self
            .changes()
            .map(|(p, s, c, entered)| {
                let kind = if entered { T::Entered } else { T::Exited };
                change(p, s, c, kind, reason, run_id, now)
            })
            .collect();
        (deletes, inserts, changes)
    }
}

/// Streams `rows` through `statement` (`COPY … FROM STDIN WITH (FORMAT binary)`) in ~1 MiB
/// messages: no float or integer is printed here or parsed by the server. `write` appends one
/// tuple ([`bin_fields`] then one `bin_*` call per column).
async fn copy_rows_binary<I: IntoIterator>(
    conn: &mut sqlx::PgConnection,
    statement: &str,
    rows: I,
    write: impl Fn(&mut Vec<u8>, &I::Item),
) -> StoreResult<u64> {
    let mut rows = rows.into_iter().peekable();
    if rows.peek().is_none() {
        return Ok(0);
    }
    const MESSAGE: usize = 1 << 20;
    let mut copy = conn.copy_in_raw(statement).await?;
    let mut buf: Vec<u8> = Vec::with_capacity(MESSAGE + 4096);
    // Signature, flags, header extension length.
    buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    buf.extend_from_slice(&0i32.to_be_bytes());
    buf.extend_from_slice(&0i32.to_be_bytes());
    for r in rows {
        write(&mut buf, &r);
        if buf.len() >= MESSAGE {
            copy.send(buf.as_slice()).await?;
            buf.clear();
        }
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    copy.send(buf.as_slice()).await?;
    Ok(copy.finish().await?)
}

/// One membership tuple in binary COPY format, columns `segment_id, profile_id,
/// cluster_index, distance, entered_at, from_version`.
fn binary_member(out: &mut Vec<u8>, m: &MemberRow, entered_at: i64, version: i64) {
    bin_fields(out, 6);
    bin_text(out, Some(&m.segment_id));
    bin_text(out, Some(&m.profile_id));
    bin_i64(out, Some(m.cluster_index));
    bin_f64(out, m.distance);
    bin_i64(out, Some(entered_at));
    bin_i64(out, Some(version));
}

/// One change-log tuple in binary COPY format, columns `seq, change_id, profile_id,
/// segment_id, cluster_index, change_type, reason, run_id, occurred_at`; `c` is (profile,
/// segment, cluster, entered) and the id a fresh version-4 UUID, as [`change`] makes them.
fn binary_change(
    out: &mut Vec<u8>,
    seq: i64,
    c: &(&str, &str, i64, bool),
    reason: pb::MembershipChangeReason,
    run_id: &str,
    now: i64,
) {
    use pb::MembershipChangeType as T;
    let (profile, segment, cluster, entered) = *c;
    let bytes: [u8; 16] = rand::Rng::r#gen(&mut rand::thread_rng());
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .encode_lower(&mut buf);
    bin_fields(out, 9);
    bin_i64(out, Some(seq));
    bin_text(out, Some(id));
    bin_text(out, Some(profile));
    bin_text(out, Some(segment));
    bin_i64(out, Some(cluster));
    let kind = if entered { T::Entered } else { T::Exited };
    bin_i64(out, Some(kind as i64));
    bin_i64(out, Some(reason as i64));
    bin_text(out, Some(run_id));
    bin_i64(out, Some(now));
}

/// Whether `entries` new memberships are to be loaded with the membership indexes dropped
/// and rebuilt after ([`SqlSegmentationStore::publish_run_pg`]): when they are at least as
/// many as the rows stored, and the table's exclusive lock is had within
/// [`BULK_LOCK_TIMEOUT`]. Readers of memberships then wait for the publication's commit
/// instead of reading the rows before it; a reader holding the table longer sends the run
/// down the indexed path instead. `Some(true)` when the table is empty (a first run), so it
/// can be truncated and loaded frozen.
async fn bulk_load_lock(
    conn: &mut sqlx::PgConnection,
    entries: usize,
) -> StoreResult<Option<bool>> {
    // The planner's estimate first (-1 when the table was never analysed), so a large table
    // is neither locked nor counted for a small diff.
    let estimate: f64 = sqlx::query_scalar(
        "SELECT reltuples::float8 FROM pg_class WHERE oid = 'seg_memberships'::regclass",
    )
    .fetch_one(&mut *conn)
    .await?;
    #[allow(clippy::cast_precision_loss)]
    if estimate > entries as f64 {
        return Ok(None);
    }
    sqlx::query("SAVEPOINT seg_bulk_load")
        .execute(&mut *conn)
        .await?;
    let locked = async {
        sqlx::query(&format!("SET LOCAL lock_timeout = '{BULK_LOCK_TIMEOUT}'"))
            .execute(&mut *conn)
            .await?;
        sqlx::query("LOCK TABLE seg_memberships IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *conn)
            .await
    }
    .await;
    if let Err(e) = locked {
        let timed_out = e
            .as_database_error()
            .and_then(|d| d.code())
            .is_some_and(|c| c == "55P03");
        if !timed_out {
            return Err(e.into());
        }
        tracing::info!("memberships busy; publishing the entries through the indexes");
        // Also undoes the SET LOCAL.
        sqlx::query("ROLLBACK TO SAVEPOINT seg_bulk_load")
            .execute(&mut *conn)
            .await?;
        sqlx::query("RELEASE SAVEPOINT seg_bulk_load")
            .execute(&mut *conn)
            .await?;
        return Ok(None);
    }
    sqlx::query("RELEASE SAVEPOINT seg_bulk_load")
        .execute(&mut *conn)
        .await?;
    sqlx::query("SET LOCAL lock_timeout TO DEFAULT")
        .execute(&mut *conn)
        .await?;
    // Under the lock the count is exact, and cheap next to the load it decides.
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seg_memberships")
        .fetch_one(&mut *conn)
        .await?;
    if usize::try_from(stored).unwrap_or(usize::MAX) > entries {
        return Ok(None);
    }
    Ok(Some(stored == 0))
}

/// Starts a binary COPY tuple of `n` fields.
fn bin_fields(out: &mut Vec<u8>, n: i16) {
    out.extend_from_slice(&n.to_be_bytes());
}

fn bin_null(out: &mut Vec<u8>) {
    out.extend_from_slice(&(-1i32).to_be_bytes());
}

fn bin_text(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        Some(v) => {
            // Ids and names are far below 2 GiB (COPY would reject them anyway).
            out.extend_from_slice(&i32::try_from(v.len()).unwrap_or(i32::MAX).to_be_bytes());
            out.extend_from_slice(v.as_bytes());
        }
        None => bin_null(out),
    }
}

fn bin_i64(out: &mut Vec<u8>, v: Option<i64>) {
    match v {
        Some(v) => {
            out.extend_from_slice(&8i32.to_be_bytes());
            out.extend_from_slice(&v.to_be_bytes());
        }
        None => bin_null(out),
    }
}

fn bin_f64(out: &mut Vec<u8>, v: Option<f64>) {
    match v {
        Some(v) => {
            out.extend_from_slice(&8i32.to_be_bytes());
            out.extend_from_slice(&v.to_bits().to_be_bytes());
        }
        None => bin_null(out),
    }
}

/// One run-score tuple in binary COPY format, columns as `run_id, SCORE_COLUMNS`.
fn binary_score(out: &mut Vec<u8>, run_id: &str, s: &ScoreRow) {
    bin_fields(out, 15);
    bin_text(out, Some(run_id));
    bin_text(out, Some(&s.profile_id));
    bin_i64(out, s.rfm.map(|x| x.0));
    bin_i64(out, s.rfm.map(|x| x.1));
    bin_i64(out, s.rfm.map(|x| x.2));
    bin_text(out, s.rfm_name.as_deref());
    bin_f64(out, s.recency_days);
    bin_i64(out, s.frequency);
    bin_i64(out, s.monetary_minor);
    bin_i64(out, s.lifecycle);
    bin_i64(out, s.lifecycle_since);
    bin_f64(out, s.clv);
    bin_f64(out, s.p_alive);
    bin_f64(out, s.exp_purchases);
    bin_f64(out, s.exp_aov);
}

/// Streams the rows of `statement` (`COPY … TO STDOUT`, text format) to `row` as their raw
/// fields, across message boundaries, without allocating per row.
async fn copy_out_rows(
    conn: &mut sqlx::PgConnection,
    statement: &str,
    mut row: impl FnMut(&[&[u8]]) -> StoreResult<()>,
) -> StoreResult<()> {
    use futures::TryStreamExt as _;
    let mut stream = conn.copy_out_raw(statement).await?;
    let mut pending: Vec<u8> = Vec::new();
    // Rows wider than 16 fields are passed cut at 16 (callers check their width).
    let mut each_line = |bytes: &[u8]| -> StoreResult<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        for line in bytes.split(|b| *b == b'\n') {
            let mut fields: [&[u8]; 16] = [&[]; 16];
            let mut n = 0;
            for part in line.split(|b| *b == b'\t') {
                if n < fields.len() {
                    fields[n] = part;
                }
                n += 1;
            }
            row(&fields[..n.min(fields.len())])?;
        }
        Ok(())
    };
    while let Some(chunk) = stream.try_next().await? {
        let chunk: &[u8] = chunk.as_ref();
        let Some(end) = chunk.iter().rposition(|b| *b == b'\n') else {
            pending.extend_from_slice(chunk);
            continue;
        };
        if pending.is_empty() {
            each_line(&chunk[..end])?;
        } else {
            pending.extend_from_slice(&chunk[..end]);
            each_line(&pending)?;
            pending.clear();
        }
        pending.extend_from_slice(&chunk[end + 1..]);
    }
    if !pending.is_empty() {
        each_line(&pending)?;
    }
    Ok(())
}

/// A COPY text-format field as text (escapes undone).
fn copy_text(f: &[u8]) -> StoreResult<std::borrow::Cow<'_, str>> {
    if !f.contains(&b'\\') {
        return Ok(std::borrow::Cow::Borrowed(
            std::str::from_utf8(f).map_err(corrupt)?,
        ));
    }
    let mut out = Vec::with_capacity(f.len());
    let mut it = f.iter().copied();
    while let Some(b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match it.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'r') => out.push(b'\r'),
            Some(b'b') => out.push(8),
            Some(b'f') => out.push(12),
            Some(b'v') => out.push(11),
            Some(c) => out.push(c),
            None => {}
        }
    }
    Ok(std::borrow::Cow::Owned(
        String::from_utf8(out).map_err(corrupt)?,
    ))
}

/// A COPY text-format integer field (`\N` is `None`).
fn copy_int(f: &[u8]) -> StoreResult<Option<i64>> {
    if f == b"\\N" {
        return Ok(None);
    }
    std::str::from_utf8(f)
        .map_err(corrupt)?
        .parse()
        .map(Some)
        .map_err(corrupt)
}

fn member_from_row(row: &AnyRow) -> StoreResult<MemberRow> {
    Ok(MemberRow {
        segment_id: row.try_get("segment_id")?,
        profile_id: row.try_get("profile_id")?,
        cluster_index: row.try_get("cluster_index")?,
        distance: row.try_get("distance")?,
        entered_at: row.try_get("entered_at")?,
    })
}

/// The pending membership version (one more than the newest run's): writes between runs end
/// and open memberships at it. Read under [`CHANGES_LOCK`] (SQLite: the write lock), which
/// publishing a run also holds.
const PENDING_VERSION_SQL: &str =
    "SELECT CAST(COALESCE(MAX(member_version), 0) + 1 AS BIGINT) FROM seg_runs";

async fn pending_version(conn: &mut AnyConnection) -> StoreResult<i64> {
    Ok(sqlx::query_scalar(PENDING_VERSION_SQL)
        .fetch_one(&mut *conn)
        .await?)
}

/// The memberships of a versioned run's snapshot: rows valid at the run's version `$1`.
const AT_VERSION: &str = "m.from_version <= $1 AND (m.to_version IS NULL OR m.to_version > $1)";

/// Deletes the membership rows no retained run can see: closed at or before the oldest
/// retained versioned run ($1 SUCCEEDED); with none, every closed row.
const PRUNE_CLOSED_SQL: &str = "DELETE FROM seg_memberships WHERE to_version IS NOT NULL \
     AND to_version <= (SELECT COALESCE(MIN(member_version), CAST(9223372036854775807 AS BIGINT)) \
       FROM seg_runs WHERE state = $1 AND snapshot_dropped = 0 AND member_version IS NOT NULL)";

impl SqlSegmentationStore {
    /// A store over `db` (already migrated).
    #[must_use]
    pub fn new(db: Database) -> Self {
        Self { db, pg: None }
    }

    /// A store over `db` (already migrated, PostgreSQL schema `schema` at `url`) that also
    /// opens a native pool of at most `max_connections` connections to the same schema, used
    /// to publish batch runs with COPY.
    ///
    /// # Errors
    /// An invalid URL or a server that cannot be reached.
    pub async fn connect_postgres(
        db: Database,
        url: &str,
        schema: &str,
        max_connections: u32,
    ) -> StoreResult<Self> {
        use std::str::FromStr as _;
        let opts = PgConnectOptions::from_str(url)?.options([("search_path", schema)]);
        let pg = clientele_runtime::db::pg_pool_options::<sqlx::Postgres>(max_connections)
            .min_connections(0)
            .connect_with(opts)
            .await?;
        Ok(Self { db, pg: Some(pg) })
    }

    /// How run `run_id`'s membership snapshot is stored: `None` for a run published before
    /// migration 0003, unknown or pruned, whose rows (if any) are in `seg_run_members`;
    /// otherwise the run's membership version and the segments it evaluated.
    async fn run_snapshot(&self, run_id: &str) -> StoreResult<Option<(i64, BTreeSet<String>)>> {
        let version: Option<Option<i64>> = sqlx::query_scalar(
            "SELECT member_version FROM seg_runs WHERE run_id = $1 AND snapshot_dropped = 0",
        )
        .bind(run_id)
        .fetch_optional(&self.db.pool)
        .await?;
        let Some(Some(v)) = version else {
            return Ok(None);
        };
        let segments: Vec<String> =
            sqlx::query_scalar("SELECT segment_id FROM seg_run_segments WHERE run_id = $1")
                .bind(run_id)
                .fetch_all(&self.db.pool)
                .await?;
        Ok(Some((v, segments.into_iter().collect())))
    }

    /// The `FROM … WHERE` start of a query over run `run_id`'s members of `segment_id` (alias
    /// `m`, `$1` bound to the returned version, or to the run id when `None`): the rows valid
    /// at the run's version, or the legacy snapshot table (also for a segment the run did not
    /// evaluate: it has no rows there, as before).
    async fn members_at(
        &self,
        run_id: &str,
        segment_id: &str,
    ) -> StoreResult<(String, Option<i64>)> {
        Ok(match self.run_snapshot(run_id).await? {
            Some((v, evaluated)) if evaluated.contains(segment_id) => {
                (format!("seg_memberships m WHERE {AT_VERSION}"), Some(v))
            }
            _ => ("seg_run_members m WHERE m.run_id = $1".to_owned(), None),
        })
    }

    async fn begin_write(&self) -> StoreResult<WriteTx<'_>> {
        Ok(self.db.begin_write().await?)
    }

    async fn check_cursor(
        &self,
        conn: &mut AnyConnection,
        feed: &str,
        expected: Option<&str>,
        cursor: &str,
    ) -> StoreResult<()> {
        self.db.lock_id(conn, FEED_LOCK).await?;
        let stored: Option<String> =
            sqlx::query_scalar("SELECT cursor FROM seg_feed_cursors WHERE feed = $1")
                .bind(feed)
                .fetch_optional(&mut *conn)
                .await?;
        if stored.as_deref() != expected {
            return Err(StoreError::CursorMoved(feed.to_owned()));
        }
        sqlx::query(
            "INSERT INTO seg_feed_cursors (feed, cursor) VALUES ($1, $2) \
             ON CONFLICT (feed) DO UPDATE SET cursor = excluded.cursor",
        )
        .bind(feed)
        .bind(cursor)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    async fn survivor(conn: &mut AnyConnection, id: &str) -> StoreResult<String> {
        let s: Option<String> =
            sqlx::query_scalar("SELECT survivor_id FROM seg_aliases WHERE merged_id = $1")
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?;
        Ok(s.unwrap_or_else(|| id.to_owned()))
    }

    /// Appends changes under the change-log lock; fills in their seq.
    async fn append_changes(
        &self,
        conn: &mut AnyConnection,
        changes: &mut [ChangeRow],
    ) -> StoreResult<()> {
        if changes.is_empty() {
            return Ok(());
        }
        self.db.lock_id(conn, CHANGES_LOCK).await?;
        let before: i64 =
            sqlx::query_scalar("SELECT CAST(COALESCE(MAX(seq), 0) AS BIGINT) FROM seg_changes")
                .fetch_one(&mut *conn)
                .await?;
        let rows: &[ChangeRow] = changes;
        insert_many(
            conn,
            "seg_changes (change_id, profile_id, segment_id, cluster_index, change_type, reason, run_id, occurred_at)",
            "",
            8,
            rows.len(),
            |q, i| {
                let c = &rows[i];
                q.bind(c.change_id.clone())
                    .bind(c.profile_id.clone())
                    .bind(c.segment_id.clone())
                    .bind(c.cluster_index)
                    .bind(i64::from(c.change_type))
                    .bind(i64::from(c.reason))
                    .bind(c.run_id.clone())
                    .bind(c.occurred_at)
            },
        )
        .await?;
        // Under the lock the new rows are exactly the seqs after `before`, in insertion order.
        let ids: Vec<(i64, String)> =
            sqlx::query_as("SELECT seq, change_id FROM seg_changes WHERE seq > $1 ORDER BY seq")
                .bind(before)
                .fetch_all(&mut *conn)
                .await?;
        let by_id: HashMap<String, i64> = ids.into_iter().map(|(s, c)| (c, s)).collect();
        for c in changes.iter_mut() {
            c.seq = by_id.get(&c.change_id).copied().unwrap_or(0);
        }
        Ok(())
    }

    /// Ends the current memberships `keys` at version `v`: a row opened at `v` (the pending
    /// version: no run has seen it) is deleted, any other is closed (`to_version = v`) so the
    /// runs before keep it in their snapshots.
    async fn end_members(
        conn: &mut AnyConnection,
        keys: &[(String, String)],
        v: i64,
    ) -> StoreResult<()> {
        for chunk in keys.chunks(LOOKUP_CHUNK) {
            let conds: Vec<String> = (0..chunk.len())
                .map(|i| {
                    format!(
                        "(segment_id = ${} AND profile_id = ${})",
                        2 * i + 2,
                        2 * i + 3
                    )
                })
                .collect();
            for sql in [
                format!(
                    "DELETE FROM seg_memberships WHERE to_version IS NULL AND from_version = $1 \
                     AND ({})",
                    conds.join(" OR ")
                ),
                format!(
                    "UPDATE seg_memberships SET to_version = $1 WHERE to_version IS NULL AND ({})",
                    conds.join(" OR ")
                ),
            ] {
                let mut q = sqlx::query(&sql).bind(v);
                for (s, p) in chunk {
                    q = q.bind(s.clone()).bind(p.clone());
                }
                q.execute(&mut *conn).await?;
            }
        }
        Ok(())
    }

    /// Opens the memberships `rows` at version `v`.
    async fn insert_members(
        conn: &mut AnyConnection,
        rows: &[MemberRow],
        v: i64,
    ) -> StoreResult<()> {
        insert_many(
            conn,
            "seg_memberships (segment_id, profile_id, cluster_index, distance, entered_at, from_version)",
            "",
            6,
            rows.len(),
            |q, i| {
                let m = &rows[i];
                q.bind(m.segment_id.clone())
                    .bind(m.profile_id.clone())
                    .bind(m.cluster_index)
                    .bind(m.distance)
                    .bind(m.entered_at)
                    .bind(v)
            },
        )
        .await?;
        Ok(())
    }

    /// Ends every current membership of `profile` with `reason` at version `v` (see
    /// [`Self::end_members`]) and forgets its real-time scores.
    async fn exit_profile(
        conn: &mut AnyConnection,
        profile: &str,
        reason: pb::MembershipChangeReason,
        now: i64,
        v: i64,
        out: &mut Vec<ChangeRow>,
    ) -> StoreResult<()> {
        let rows = sqlx::query(
            "SELECT segment_id, profile_id, cluster_index, distance, entered_at \
             FROM seg_memberships WHERE profile_id = $1 AND to_version IS NULL ORDER BY segment_id",
        )
        .bind(profile)
        .fetch_all(&mut *conn)
        .await?;
        for r in &rows {
            let m = member_from_row(r)?;
            out.push(change(
                &m.profile_id,
                &m.segment_id,
                m.cluster_index,
                pb::MembershipChangeType::Exited,
                reason,
                "",
                now,
            ));
        }
        for sql in [
            "DELETE FROM seg_memberships WHERE profile_id = $1 AND to_version IS NULL \
             AND from_version = $2",
            "UPDATE seg_memberships SET to_version = $2 WHERE profile_id = $1 AND to_version IS NULL",
            "DELETE FROM seg_scores WHERE profile_id = $1",
        ] {
            let q = sqlx::query(sql).bind(profile);
            let q = if sql.contains("$2") { q.bind(v) } else { q };
            q.execute(&mut *conn).await?;
        }
        Ok(())
    }

    async fn load(&self, filter: Option<&[String]>, as_of: i64) -> StoreResult<Vec<ProfileData>> {
        let mut data: BTreeMap<String, ProfileData> = BTreeMap::new();
        let mut orders: HashMap<(String, String), StoredOrder> = HashMap::new();
        let since_day = as_of.div_euclid(DAY_MICROS) - ENGAGEMENT_DAYS;
        let chunks: Vec<Option<&[String]>> = match filter {
            None => vec![None],
            Some(ids) => ids.chunks(LOOKUP_CHUNK).map(Some).collect(),
        };
        let mut conn = self.db.pool.acquire().await?;
        for chunk in chunks {
            let (cond, binds): (String, Vec<String>) = match chunk {
                None => ("1 = 1".into(), Vec::new()),
                Some(ids) => (
                    format!("profile_id IN ({})", placeholders(1, ids.len())),
                    ids.to_vec(),
                ),
            };
            let n = binds.len();

            for row in bind_strings(
                &format!("SELECT profile_id FROM seg_profiles WHERE {cond}"),
                &binds,
            )
            .fetch_all(&mut *conn)
            .await?
            {
                let id: String = row.try_get(0)?;
                data.insert(
                    id.clone(),
                    ProfileData {
                        profile_id: id,
                        ..Default::default()
                    },
                );
            }
            for row in bind_strings(&format!(
                "SELECT profile_id, order_id, placed_at, amount_minor, discount_minor FROM seg_orders WHERE {cond}"
            ), &binds)
            .fetch_all(&mut *conn)
            .await?
            {
                let key: (String, String) = (row.try_get(0)?, row.try_get(1)?);
                orders.insert(
                    key,
                    StoredOrder {
                        placed_at: row.try_get(2)?,
                        amount_minor: row.try_get(3)?,
                        discount_minor: row.try_get(4)?,
                        refunded_minor: 0,
                        fully_refunded: false,
                        lines: Vec::new(),
                    },
                );
            }
            for row in bind_strings(&format!(
                "SELECT profile_id, order_id, category, amount_minor FROM seg_order_lines WHERE {cond}"
            ), &binds)
            .fetch_all(&mut *conn)
            .await?
            {
                let key: (String, String) = (row.try_get(0)?, row.try_get(1)?);
                if let Some(o) = orders.get_mut(&key) {
                    o.lines.push((row.try_get(2)?, row.try_get(3)?));
                }
            }
            for row in bind_strings(&format!(
                "SELECT profile_id, order_id, CAST(SUM(amount_minor) AS BIGINT), CAST(MAX(full_refund) AS BIGINT) \
                 FROM seg_refunds WHERE {cond} GROUP BY profile_id, order_id"
            ), &binds)
            .fetch_all(&mut *conn)
            .await?
            {
                let key: (String, String) = (row.try_get(0)?, row.try_get(1)?);
                if let Some(o) = orders.get_mut(&key) {
                    let amount: i64 = row.try_get(2)?;
                    let full: i64 = row.try_get(3)?;
                    o.refunded_minor = amount;
                    o.fully_refunded = full != 0;
                }
            }
            let eng_sql = format!(
                "SELECT profile_id, kind, CAST(SUM(n) AS BIGINT) FROM seg_engagement \
                 WHERE {cond} AND day > ${} GROUP BY profile_id, kind",
                n + 1
            );
            for row in bind_strings(&eng_sql, &binds)
                .bind(since_day)
                .fetch_all(&mut *conn)
                .await?
            {
                let id: String = row.try_get(0)?;
                if let Some(d) = data.get_mut(&id) {
                    d.engagement.insert(row.try_get(1)?, row.try_get(2)?);
                }
            }
        }
        for ((profile, _), order) in orders {
            if let Some(d) = data.get_mut(&profile) {
                d.orders.push(order);
            }
        }
        for d in data.values_mut() {
            d.orders.sort_by_key(|o| o.placed_at);
        }
        Ok(data.into_values().collect())
    }

    async fn move_facts(conn: &mut AnyConnection, from: &str, to: &str) -> StoreResult<()> {
        let statements = [
            "INSERT INTO seg_orders (profile_id, order_id, placed_at, amount_minor, discount_minor, converted) \
             SELECT $1, order_id, placed_at, amount_minor, discount_minor, converted FROM seg_orders \
             WHERE profile_id = $2 ON CONFLICT DO NOTHING",
            "INSERT INTO seg_order_lines (profile_id, order_id, category, amount_minor) \
             SELECT $1, order_id, category, amount_minor FROM seg_order_lines \
             WHERE profile_id = $2 ON CONFLICT DO NOTHING",
            "INSERT INTO seg_refunds (profile_id, refund_key, order_id, amount_minor, full_refund) \
             SELECT $1, refund_key, order_id, amount_minor, full_refund FROM seg_refunds \
             WHERE profile_id = $2 ON CONFLICT DO NOTHING",
            "INSERT INTO seg_engagement (profile_id, day, kind, n) \
             SELECT $1, day, kind, n FROM seg_engagement WHERE profile_id = $2 \
             ON CONFLICT (profile_id, day, kind) DO UPDATE SET n = seg_engagement.n + excluded.n",
        ];
        for sql in statements {
            sqlx::query(sql)
                .bind(to)
                .bind(from)
                .execute(&mut *conn)
                .await?;
        }
        Self::forget(conn, from).await
    }

    async fn forget(conn: &mut AnyConnection, id: &str) -> StoreResult<()> {
        for table in [
            "seg_orders",
            "seg_order_lines",
            "seg_refunds",
            "seg_engagement",
            "seg_profiles",
            "seg_scores",
        ] {
            sqlx::query(&format!("DELETE FROM {table} WHERE profile_id = $1"))
                .bind(id)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    /// Every profile's facts over the native pool, as [`Self::load`] returns them (ordered by
    /// profile id), in three `COPY … TO STDOUT` streams parsed without per-row decoding: the
    /// profile ids, every order joined with its refund totals and lines in (profile, order)
    /// order (merge joins over the primary keys, so orders group without hashing), and the
    /// engagement counters.
    async fn load_all_pg(&self, pg: &PgPool, as_of: i64) -> StoreResult<Vec<ProfileData>> {
        let since_day = as_of.div_euclid(DAY_MICROS) - ENGAGEMENT_DAYS;
        let mut conn = pg.acquire().await?;
        let mut data: Vec<ProfileData> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        copy_out_rows(
            &mut conn,
            "COPY (SELECT profile_id FROM seg_profiles ORDER BY profile_id) TO STDOUT",
            |f| {
                let id = copy_text(f[0])?.into_owned();
                index.insert(id.clone(), data.len());
                data.push(ProfileData {
                    profile_id: id,
                    ..Default::default()
                });
                Ok(())
            },
        )
        .await?;
        let mut last_profile: Vec<u8> = Vec::new();
        let mut last_order: Vec<u8> = Vec::new();
        let mut current: Option<usize> = None;
        copy_out_rows(
            &mut conn,
            "COPY (SELECT o.profile_id, o.order_id, o.placed_at, o.amount_minor, o.discount_minor, \
             COALESCE(r.amount, 0)::int8, COALESCE(r.full_refund, 0)::int8, l.category, l.amount_minor \
             FROM seg_orders o \
             LEFT JOIN (SELECT profile_id, order_id, SUM(amount_minor) AS amount, \
               MAX(full_refund) AS full_refund FROM seg_refunds GROUP BY profile_id, order_id) r \
               ON r.profile_id = o.profile_id AND r.order_id = o.order_id \
             LEFT JOIN seg_order_lines l ON l.profile_id = o.profile_id AND l.order_id = o.order_id \
             ORDER BY o.profile_id, o.order_id) TO STDOUT",
            |f| {
                if f.len() != 9 {
                    return Err(corrupt("order row of the wrong width"));
                }
                if f[0] != last_profile.as_slice() {
                    last_profile.clear();
                    last_profile.extend_from_slice(f[0]);
                    last_order.clear();
                    current = index.get(copy_text(f[0])?.as_ref()).copied();
                }
                let Some(i) = current else {
                    return Ok(());
                };
                let orders = &mut data[i].orders;
                if orders.is_empty() || f[1] != last_order.as_slice() {
                    last_order.clear();
                    last_order.extend_from_slice(f[1]);
                    orders.push(StoredOrder {
                        placed_at: copy_int(f[2])?.unwrap_or(0),
                        amount_minor: copy_int(f[3])?.unwrap_or(0),
                        discount_minor: copy_int(f[4])?.unwrap_or(0),
                        refunded_minor: copy_int(f[5])?.unwrap_or(0),
                        fully_refunded: copy_int(f[6])?.unwrap_or(0) != 0,
                        lines: Vec::new(),
                    });
                }
                if f[7] != b"\\N"
                    && let Some(o) = orders.last_mut()
                {
                    o.lines
                        .push((copy_text(f[7])?.into_owned(), copy_int(f[8])?.unwrap_or(0)));
                }
                Ok(())
            },
        )
        .await?;
        copy_out_rows(
            &mut conn,
            &format!(
                "COPY (SELECT profile_id, kind, SUM(n)::int8 FROM seg_engagement WHERE day > {since_day} \
                 GROUP BY profile_id, kind) TO STDOUT"
            ),
            |f| {
                if f.len() != 3 {
                    return Err(corrupt("engagement row of the wrong width"));
                }
                if let Some(&i) = index.get(copy_text(f[0])?.as_ref()) {
                    data[i]
                        .engagement
                        .insert(copy_text(f[1])?.into_owned(), copy_int(f[2])?.unwrap_or(0));
                }
                Ok(())
            },
        )
        .await?;
        for d in &mut data {
            d.orders.sort_by_key(|o| o.placed_at);
        }
        Ok(data)
    }

    /// [`SegmentationStore::rescore_read`] in one statement ([`RESCORE_READ_PG`]).
    async fn rescore_read_pg(pg: &PgPool, ids: &[String], as_of: i64) -> StoreResult<RescoreRead> {
        let since_day = as_of.div_euclid(DAY_MICROS) - ENGAGEMENT_DAYS;
        let (latest_run, n, versions, deleted, updated, json): (
            Option<String>,
            i64,
            i64,
            i64,
            i64,
            String,
        ) = sqlx::query_as(RESCORE_READ_PG)
            .bind(ids)
            .bind(pb::RecomputeState::Succeeded as i64)
            .bind(since_day)
            .fetch_one(pg)
            .await?;
        let rows: Vec<RescoreJson> = serde_json::from_str(&json).map_err(corrupt)?;
        let mut profiles = Vec::with_capacity(rows.len());
        let mut previous = HashMap::new();
        for r in rows {
            let prev = match (r.s, r.rs) {
                (Some((lifecycle, lifecycle_since, scored_at)), _) => Some(PreviousLifecycle {
                    lifecycle,
                    lifecycle_since,
                    scored_at,
                }),
                (None, Some((lifecycle, lifecycle_since, finish))) => Some(PreviousLifecycle {
                    lifecycle,
                    lifecycle_since,
                    scored_at: finish.unwrap_or(0),
                }),
                (None, None) => None,
            };
            if let Some(prev) = prev {
                previous.insert(r.p.clone(), prev);
            }
            let mut orders: Vec<StoredOrder> =
                r.o.into_iter()
                    .map(
                        |(placed_at, amount, discount, refunded, full, lines)| StoredOrder {
                            placed_at,
                            amount_minor: amount,
                            discount_minor: discount,
                            refunded_minor: refunded,
                            fully_refunded: full != 0,
                            lines,
                        },
                    )
                    .collect();
            orders.sort_by_key(|o| o.placed_at);
            profiles.push(ProfileData {
                profile_id: r.p,
                orders,
                engagement: r.e.into_iter().collect(),
            });
        }
        Ok(RescoreRead {
            latest_run,
            segments_stamp: format!("{n}:{versions}:{deleted}:{updated}"),
            profiles,
            previous,
        })
    }

    /// [`SegmentationStore::apply_realtime`] in one round trip: the `seg_apply_realtime`
    /// function (PostgreSQL migration 0002) takes the change-log lock, diffs, writes and
    /// appends the changes in one implicit transaction.
    async fn apply_realtime_pg(
        pg: &PgPool,
        run_id: &str,
        scores: &[ScoreRow],
        segments: &[String],
        members: &[MemberRow],
        now: i64,
    ) -> StoreResult<Vec<ChangeRow>> {
        use pb::MembershipChangeType as T;
        let reason = pb::MembershipChangeReason::Realtime;
        let col = |f: fn(&ScoreRow) -> Option<i64>| scores.iter().map(f).collect::<Vec<_>>();
        let colf = |f: fn(&ScoreRow) -> Option<f64>| scores.iter().map(f).collect::<Vec<_>>();
        let rows: Vec<(i64, String, String, String, i64, i64)> = sqlx::query_as(
            "SELECT * FROM seg_apply_realtime($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
             $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25)",
        )
        .bind(CHANGES_LOCK)
        .bind(run_id)
        .bind(now)
        .bind(reason as i64)
        .bind(T::Entered as i64)
        .bind(T::Exited as i64)
        .bind(segments)
        .bind(
            members
                .iter()
                .map(|m| m.segment_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            members
                .iter()
                .map(|m| m.profile_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(members.iter().map(|m| m.cluster_index).collect::<Vec<_>>())
        .bind(members.iter().map(|m| m.distance).collect::<Vec<_>>())
        .bind(
            scores
                .iter()
                .map(|s| s.profile_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(col(|s| s.rfm.map(|x| x.0)))
        .bind(col(|s| s.rfm.map(|x| x.1)))
        .bind(col(|s| s.rfm.map(|x| x.2)))
        .bind(
            scores
                .iter()
                .map(|s| s.rfm_name.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(colf(|s| s.recency_days))
        .bind(col(|s| s.frequency))
        .bind(col(|s| s.monetary_minor))
        .bind(col(|s| s.lifecycle))
        .bind(col(|s| s.lifecycle_since))
        .bind(colf(|s| s.clv))
        .bind(colf(|s| s.p_alive))
        .bind(colf(|s| s.exp_purchases))
        .bind(colf(|s| s.exp_aov))
        .fetch_all(pg)
        .await?;
        rows.into_iter()
            .map(
                |(seq, change_id, profile_id, segment_id, cluster_index, change_type)| {
                    Ok(ChangeRow {
                        seq,
                        change_id,
                        profile_id,
                        segment_id,
                        cluster_index,
                        change_type: i32::try_from(change_type).map_err(corrupt)?,
                        reason: reason as i32,
                        run_id: String::new(),
                        occurred_at: now,
                    })
                },
            )
            .collect()
    }

    /// [`SegmentationStore::publish_run`] over the native pool: the current memberships are
    /// streamed with `COPY … TO STDOUT` and matched against the run's as they are parsed
    /// ([`MemberMatcher`], the diff of the portable path), and only the diff is written
    /// (exits closed or deleted with `… USING UNNEST`, entries and the change log with
    /// `COPY`) at the run's membership version: the run's member snapshot is the rows valid at
    /// that version, so unchanged memberships cost nothing. Entries at least as many as the
    /// stored rows (a first run) are loaded with the membership indexes dropped and rebuilt
    /// after ([`bulk_load_lock`]). The scores go to a partition of their own (binary `COPY
    /// FREEZE` into a table created in this transaction, indexed after loading, attached);
    /// retention drops partitions.
    ///
    /// Building the score partition on a second connection concurrently with the membership
    /// writes was measured no faster on two shared cores (publish 8.3–10.3 s vs 9.1–9.8 s on a
    /// first 1M run, 3.0–3.2 s vs 3.4 s on a second) and was not kept.
    ///
    /// A set-based variant (new memberships staged with COPY into a temporary table, diffed
    /// with a full join, applied with `INSERT … SELECT`) was measured slower: `INSERT …
    /// SELECT` inserts row by row where `COPY` batches (1.5–2× slower per row), and a first
    /// run writes every membership and change (BENCHMARKS.md).
    #[allow(clippy::too_many_lines)]
    async fn publish_run_pg(&self, pg: &PgPool, p: RunPublication) -> StoreResult<RunRecord> {
        let mut tx = pg.begin().await?;
        sqlx::query("SELECT 1 FROM pg_advisory_xact_lock($1)")
            .bind(CHANGES_LOCK)
            .execute(&mut *tx)
            .await?;
        let version: i64 = sqlx::query_scalar(PENDING_VERSION_SQL)
            .fetch_one(&mut *tx)
            .await?;
        let ids: Vec<String> = p.segments.iter().map(|(s, _)| s.clone()).collect();
        // The current memberships of the evaluated segments, streamed with COPY (segment ids
        // are quoted as SQL literals: COPY takes no parameters).
        let mut matcher = MemberMatcher::new(&p.members);
        if !ids.is_empty() {
            let list: Vec<String> = ids
                .iter()
                .map(|id| format!("'{}'", id.replace('\'', "''")))
                .collect();
            copy_out_rows(
                &mut tx,
                &format!(
                    "COPY (SELECT segment_id, profile_id, cluster_index FROM seg_memberships \
                     WHERE to_version IS NULL AND segment_id IN ({})) TO STDOUT",
                    list.join(", ")
                ),
                |f| {
                    if f.len() != 3 {
                        return Err(corrupt("membership row of the wrong width"));
                    }
                    matcher.current(
                        &copy_text(f[0])?,
                        &copy_text(f[1])?,
                        copy_int(f[2])?.unwrap_or(-1),
                    );
                    Ok(())
                },
            )
            .await?;
        }
        let reason = pb::MembershipChangeReason::Recompute;
        let diff = matcher.finish();
        let (segs, profiles): (Vec<&str>, Vec<&str>) = diff.deletes().unzip();
        if !segs.is_empty() {
            // Ended at the run's version (see [`Self::end_members`]).
            for sql in [
                "DELETE FROM seg_memberships m USING UNNEST($1::text[], $2::text[]) AS d(s, p) \
                 WHERE m.segment_id = d.s AND m.profile_id = d.p AND m.to_version IS NULL \
                 AND m.from_version = $3",
                "UPDATE seg_memberships m SET to_version = $3 \
                 FROM UNNEST($1::text[], $2::text[]) AS d(s, p) \
                 WHERE m.segment_id = d.s AND m.profile_id = d.p AND m.to_version IS NULL",
            ] {
                sqlx::query(sql)
                    .bind(&segs)
                    .bind(&profiles)
                    .bind(version)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        // Entries at least as many as the stored rows (a first run above all) are loaded
        // with the two membership indexes dropped and rebuilt after: one sort each instead of
        // a B-tree insertion per row. Into an empty table they are also written frozen.
        let bulk = if diff.entries.is_empty() {
            None
        } else {
            bulk_load_lock(&mut tx, diff.entries.len()).await?
        };
        if let Some(empty) = bulk {
            if empty {
                sqlx::query("TRUNCATE seg_memberships")
                    .execute(&mut *tx)
                    .await?;
            }
            for sql in [
                "ALTER TABLE seg_memberships DROP CONSTRAINT seg_memberships_pkey",
                "DROP INDEX seg_memberships_by_profile",
            ] {
                sqlx::query(sql).execute(&mut *tx).await?;
            }
        }
        copy_rows_binary(
            &mut tx,
            if bulk == Some(true) {
                "COPY seg_memberships (segment_id, profile_id, cluster_index, distance, \
                 entered_at, from_version) FROM STDIN WITH (FORMAT binary, FREEZE)"
            } else {
                "COPY seg_memberships (segment_id, profile_id, cluster_index, distance, \
                 entered_at, from_version) FROM STDIN WITH (FORMAT binary)"
            },
            &diff.entries,
            |out, (i, _)| binary_member(out, &p.members[*i], p.now, version),
        )
        .await?;
        if bulk.is_some() {
            for sql in [
                // Sorts in memory where a 64 MB default would spill.
                "SELECT set_config('maintenance_work_mem', '256MB', true) \
                 WHERE pg_size_bytes(current_setting('maintenance_work_mem')) < 268435456",
                // As migration 0003 declares them.
                "ALTER TABLE seg_memberships ADD CONSTRAINT seg_memberships_pkey \
                 PRIMARY KEY (segment_id, profile_id, from_version)",
                "CREATE INDEX seg_memberships_by_profile ON seg_memberships (profile_id)",
            ] {
                sqlx::query(sql).execute(&mut *tx).await?;
            }
        }
        // Under the change-log lock no other transaction takes sequence numbers: the changes
        // reserve theirs at once and are written with them, in order (no `nextval` per row).
        let (entered, exited) = diff.counts();
        let count = i64::try_from(entered + exited).map_err(corrupt)?;
        if count > 0 {
            let first: i64 =
                sqlx::query_scalar("SELECT nextval(pg_get_serial_sequence('seg_changes', 'seq'))")
                    .fetch_one(&mut *tx)
                    .await?;
            if count > 1 {
                sqlx::query("SELECT setval(pg_get_serial_sequence('seg_changes', 'seq'), $1)")
                    .bind(first + count - 1)
                    .execute(&mut *tx)
                    .await?;
            }
            copy_rows_binary(
                &mut tx,
                "COPY seg_changes (seq, change_id, profile_id, segment_id, cluster_index, \
                 change_type, reason, run_id, occurred_at) FROM STDIN WITH (FORMAT binary)",
                (first..).zip(diff.changes()),
                |out, (seq, c)| binary_change(out, *seq, c, reason, &p.run_id, p.now),
            )
            .await?;
        }
        // The run's scores: a partition of their own, created in this transaction (so COPY
        // FREEZE writes the rows frozen), loaded in binary, indexed after loading (one sort
        // instead of a B-tree insertion per row) and attached (its CHECK constraint spares the
        // validating scan). Retention drops it.
        let part: String = sqlx::query_scalar("SELECT seg_run_scores_partition($1)")
            .bind(&p.run_id)
            .fetch_one(&mut *tx)
            .await?;
        let literal = format!("'{}'", p.run_id.replace('\'', "''"));
        sqlx::query(&format!(
            "CREATE TABLE \"{part}\" (LIKE seg_run_scores, CHECK (run_id = {literal}))"
        ))
        .execute(&mut *tx)
        .await?;
        copy_rows_binary(
            &mut tx,
            &format!(
                "COPY \"{part}\" (run_id, {SCORE_COLUMNS}) FROM STDIN WITH (FORMAT binary, FREEZE)"
            ),
            &p.scores,
            |out, s| binary_score(out, &p.run_id, s),
        )
        .await?;
        sqlx::query(&format!("CREATE UNIQUE INDEX ON \"{part}\" (profile_id)"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "ALTER TABLE seg_run_scores ATTACH PARTITION \"{part}\" FOR VALUES IN ({literal})"
        ))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO seg_run_segments (run_id, segment_id) SELECT $1, UNNEST($2::text[])",
        )
        .bind(&p.run_id)
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM seg_scores WHERE scored_at <= $1")
            .bind(p.now)
            .execute(&mut *tx)
            .await?;
        let (seg_ids, versions): (Vec<&str>, Vec<i64>) =
            p.segments.iter().map(|(s, v)| (s.as_str(), *v)).unzip();
        sqlx::query(
            "UPDATE seg_segments s SET last_run_id = $1 FROM UNNEST($2::text[], $3::int8[]) AS u(id, v) \
             WHERE s.segment_id = u.id AND s.version = u.v",
        )
        .bind(&p.run_id)
        .bind(&seg_ids)
        .bind(&versions)
        .execute(&mut *tx)
        .await?;
        let mut outputs = p.outputs.clone();
        outputs.entered = i64::try_from(entered).unwrap_or(i64::MAX);
        outputs.exited = i64::try_from(exited).unwrap_or(i64::MAX);
        let end: i64 =
            sqlx::query_scalar("SELECT CAST(COALESCE(MAX(seq), 0) AS BIGINT) FROM seg_changes")
                .fetch_one(&mut *tx)
                .await?;
        let model = serde_json::to_string(&p.model).map_err(corrupt)?;
        sqlx::query(FINISH_RUN_SQL)
            .bind(pb::RecomputeState::Succeeded as i64)
            .bind(pb::RecomputePhase::Publishing as i64)
            .bind(p.now)
            .bind(hex::encode(outputs.encode_to_vec()))
            .bind(crate::service::change_cursor(end))
            .bind(model)
            .bind(&p.run_id)
            .bind(version)
            .execute(&mut *tx)
            .await?;
        // Retention: drop snapshots of succeeded runs beyond the newest `retained_runs`,
        // recording it on the run (an empty run has no rows but is still retained).
        let keep = i64::from(p.retained_runs);
        let dropped: Vec<String> = sqlx::query_scalar(
            "UPDATE seg_runs SET snapshot_dropped = 1 WHERE snapshot_dropped = 0 AND run_id IN \
             (SELECT run_id FROM seg_runs WHERE state = $1 \
              ORDER BY finish_time DESC, run_id DESC OFFSET $2) RETURNING run_id",
        )
        .bind(pb::RecomputeState::Succeeded as i64)
        .bind(keep)
        .fetch_all(&mut *tx)
        .await?;
        if !dropped.is_empty() {
            // Runs published before migration 0003 keep their members in seg_run_members.
            for table in ["seg_run_members", "seg_run_segments"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE run_id = ANY($1)"))
                    .bind(&dropped)
                    .execute(&mut *tx)
                    .await?;
            }
            let parts: Vec<String> = sqlx::query_scalar(
                "SELECT seg_run_scores_partition(r) FROM UNNEST($1::text[]) AS r",
            )
            .bind(&dropped)
            .fetch_all(&mut *tx)
            .await?;
            for part in parts {
                sqlx::query(&format!("DROP TABLE IF EXISTS \"{part}\""))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        sqlx::query(PRUNE_CLOSED_SQL)
            .bind(pb::RecomputeState::Succeeded as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.get_run(&p.run_id).await
    }
}

/// (count, sum of versions, deleted, latest update) of the segment definitions: any define,
/// redefine or delete changes it.
const SEGMENTS_STAMP: &str = "SELECT CAST(COUNT(*) AS BIGINT), CAST(COALESCE(SUM(version), 0) AS BIGINT), \
     CAST(COALESCE(SUM(deleted), 0) AS BIGINT), CAST(COALESCE(MAX(updated_at), 0) AS BIGINT) FROM seg_segments";

/// An order in [`RESCORE_READ_PG`]'s JSON: (placed_at, amount, discount, refunded, full
/// refund, [(category, amount)]).
type OrderJson = (i64, i64, i64, i64, i64, Vec<(String, i64)>);

/// One profile of [`RESCORE_READ_PG`]'s JSON.
#[derive(Debug, serde::Deserialize)]
struct RescoreJson {
    p: String,
    o: Vec<OrderJson>,
    /// (kind, n).
    e: Vec<(String, i64)>,
    /// Real-time scores: (lifecycle, since, scored_at).
    s: Option<(Option<i64>, Option<i64>, i64)>,
    /// The latest run's scores: (lifecycle, since, run finish).
    rs: Option<(Option<i64>, Option<i64>, Option<i64>)>,
}

/// The read half of a re-score in one statement ($1 ids, $2 SUCCEEDED, $3 first engagement
/// day excluded): the latest run, the segments stamp, and per known profile its orders with
/// refunds and lines, engagement, and previous lifecycle, as JSON.
const RESCORE_READ_PG: &str = "WITH latest AS (SELECT run_id, finish_time FROM seg_runs WHERE state = $2 \
       ORDER BY finish_time DESC, run_id DESC LIMIT 1) \
     SELECT (SELECT run_id FROM latest), \
       (SELECT COUNT(*)::int8 FROM seg_segments), (SELECT COALESCE(SUM(version), 0)::int8 FROM seg_segments), \
       (SELECT COALESCE(SUM(deleted), 0)::int8 FROM seg_segments), (SELECT COALESCE(MAX(updated_at), 0)::int8 FROM seg_segments), \
       COALESCE((SELECT json_agg(json_build_object( \
         'p', p.profile_id, \
         'o', (SELECT COALESCE(json_agg(json_build_array(o.placed_at, o.amount_minor, o.discount_minor, \
                 COALESCE(r.amount, 0), COALESCE(r.full_refund, 0), \
                 (SELECT COALESCE(json_agg(json_build_array(l.category, l.amount_minor)), '[]'::json) \
                  FROM seg_order_lines l WHERE l.profile_id = o.profile_id AND l.order_id = o.order_id))), '[]'::json) \
               FROM seg_orders o LEFT JOIN (SELECT x.order_id, SUM(x.amount_minor)::int8 AS amount, \
                 MAX(x.full_refund)::int8 AS full_refund FROM seg_refunds x WHERE x.profile_id = p.profile_id \
                 GROUP BY x.order_id) r ON r.order_id = o.order_id \
               WHERE o.profile_id = p.profile_id), \
         'e', (SELECT COALESCE(json_agg(json_build_array(g.kind, g.n)), '[]'::json) FROM \
               (SELECT e.kind, SUM(e.n)::int8 AS n FROM seg_engagement e \
                WHERE e.profile_id = p.profile_id AND e.day > $3 GROUP BY e.kind) g), \
         's', (SELECT json_build_array(s.lifecycle, s.lifecycle_since, s.scored_at) FROM seg_scores s \
               WHERE s.profile_id = p.profile_id), \
         'rs', (SELECT json_build_array(rs.lifecycle, rs.lifecycle_since, lr.finish_time) \
                FROM seg_run_scores rs CROSS JOIN latest lr \
                WHERE rs.run_id = (SELECT run_id FROM latest) AND rs.profile_id = p.profile_id)) \
         ORDER BY p.profile_id) \
        FROM seg_profiles p WHERE p.profile_id = ANY($1)), '[]'::json)::text";

fn run_segment_filter(cluster: Option<i64>, next_param: usize) -> String {
    if cluster.is_some() {
        format!(" AND m.cluster_index = ${next_param}")
    } else {
        String::new()
    }
}

#[async_trait]
impl SegmentationStore for SqlSegmentationStore {
    async fn feed_cursor(&self, feed: &str) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT cursor FROM seg_feed_cursors WHERE feed = $1")
                .bind(feed)
                .fetch_optional(&self.db.pool)
                .await?,
        )
    }

    async fn apply_events(
        &self,
        feed: &str,
        expected: Option<&str>,
        cursor: &str,
        facts: &[Fact],
    ) -> StoreResult<BTreeSet<String>> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        self.check_cursor(conn, feed, expected, cursor).await?;
        let mut touched = BTreeSet::new();
        let mut aliases: HashMap<String, String> = HashMap::new();
        for fact in facts {
            let raw = match fact {
                Fact::Order { profile_id, .. }
                | Fact::Refund { profile_id, .. }
                | Fact::Engagement { profile_id, .. }
                | Fact::Seen { profile_id, .. } => profile_id,
            };
            let profile = match aliases.get(raw) {
                Some(p) => p.clone(),
                None => {
                    let p = Self::survivor(conn, raw).await?;
                    aliases.insert(raw.clone(), p.clone());
                    p
                }
            };
            let at = match fact {
                Fact::Order { placed_at, .. } => *placed_at,
                Fact::Engagement { at, .. } | Fact::Seen { at, .. } => *at,
                Fact::Refund { .. } => clientele_runtime::time::now_micros(),
            };
            sqlx::query(
                "INSERT INTO seg_profiles (profile_id, first_seen) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(&profile)
            .bind(at)
            .execute(&mut *conn)
            .await?;
            match fact {
                Fact::Order {
                    order_id,
                    placed_at,
                    amount_minor,
                    discount_minor,
                    converted,
                    lines,
                    ..
                } => {
                    let inserted = sqlx::query(
                        "INSERT INTO seg_orders (profile_id, order_id, placed_at, amount_minor, discount_minor, converted) \
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                    )
                    .bind(&profile)
                    .bind(order_id)
                    .bind(*placed_at)
                    .bind(*amount_minor)
                    .bind(*discount_minor)
                    .bind(i64::from(*converted))
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                    if inserted > 0 {
                        for (category, amount) in lines {
                            sqlx::query(
                                "INSERT INTO seg_order_lines (profile_id, order_id, category, amount_minor) \
                                 VALUES ($1, $2, $3, $4) ON CONFLICT (profile_id, order_id, category) \
                                 DO UPDATE SET amount_minor = seg_order_lines.amount_minor + excluded.amount_minor",
                            )
                            .bind(&profile)
                            .bind(order_id)
                            .bind(category)
                            .bind(*amount)
                            .execute(&mut *conn)
                            .await?;
                        }
                        touched.insert(profile.clone());
                    }
                }
                Fact::Refund {
                    refund_key,
                    order_id,
                    amount_minor,
                    full,
                    ..
                } => {
                    sqlx::query(
                        "INSERT INTO seg_refunds (profile_id, refund_key, order_id, amount_minor, full_refund) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    )
                    .bind(&profile)
                    .bind(refund_key)
                    .bind(order_id)
                    .bind(*amount_minor)
                    .bind(i64::from(*full))
                    .execute(&mut *conn)
                    .await?;
                    touched.insert(profile.clone());
                }
                Fact::Engagement { at, kind, .. } => {
                    sqlx::query(
                        "INSERT INTO seg_engagement (profile_id, day, kind, n) VALUES ($1, $2, $3, 1) \
                         ON CONFLICT (profile_id, day, kind) DO UPDATE SET n = seg_engagement.n + 1",
                    )
                    .bind(&profile)
                    .bind(at.div_euclid(DAY_MICROS))
                    .bind(kind)
                    .execute(&mut *conn)
                    .await?;
                    touched.insert(profile.clone());
                }
                Fact::Seen { .. } => {}
            }
        }
        w.tx.commit().await?;
        Ok(touched)
    }

    async fn apply_profile_events(
        &self,
        feed: &str,
        expected: Option<&str>,
        cursor: &str,
        events: &[ProfileEvent],
        now: i64,
    ) -> StoreResult<(BTreeSet<String>, Vec<ChangeRow>)> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        self.check_cursor(conn, feed, expected, cursor).await?;
        let mut touched = BTreeSet::new();
        let mut changes = Vec::new();
        // The pending membership version, read under the change-log lock at the first merge
        // or erasure (memberships end at it).
        let mut version: Option<i64> = None;
        for event in events {
            if !matches!(event, ProfileEvent::Touched(_)) && version.is_none() {
                self.db.lock_id(conn, CHANGES_LOCK).await?;
                version = Some(pending_version(conn).await?);
            }
            let v = version.unwrap_or(0);
            match event {
                ProfileEvent::Touched(id) => {
                    let id = Self::survivor(conn, id).await?;
                    sqlx::query(
                        "INSERT INTO seg_profiles (profile_id, first_seen) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    )
                    .bind(&id)
                    .bind(now)
                    .execute(&mut *conn)
                    .await?;
                    touched.insert(id);
                }
                ProfileEvent::Merged { survivor, merged } => {
                    sqlx::query(
                        "INSERT INTO seg_profiles (profile_id, first_seen) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    )
                    .bind(survivor)
                    .bind(now)
                    .execute(&mut *conn)
                    .await?;
                    for m in merged {
                        if m == survivor {
                            continue;
                        }
                        Self::exit_profile(
                            conn,
                            m,
                            pb::MembershipChangeReason::ProfileMerged,
                            now,
                            v,
                            &mut changes,
                        )
                        .await?;
                        Self::move_facts(conn, m, survivor).await?;
                        sqlx::query(
                            "INSERT INTO seg_aliases (merged_id, survivor_id) VALUES ($1, $2) \
                             ON CONFLICT (merged_id) DO UPDATE SET survivor_id = excluded.survivor_id",
                        )
                        .bind(m)
                        .bind(survivor)
                        .execute(&mut *conn)
                        .await?;
                        sqlx::query(
                            "UPDATE seg_aliases SET survivor_id = $1 WHERE survivor_id = $2",
                        )
                        .bind(survivor)
                        .bind(m)
                        .execute(&mut *conn)
                        .await?;
                        touched.remove(m);
                    }
                    touched.insert(survivor.clone());
                }
                ProfileEvent::Erased(id) => {
                    Self::exit_profile(
                        conn,
                        id,
                        pb::MembershipChangeReason::ProfileErased,
                        now,
                        v,
                        &mut changes,
                    )
                    .await?;
                    Self::forget(conn, id).await?;
                    // The person's merged-away ids are the same person: forget them too.
                    let mut ids: Vec<String> = sqlx::query_scalar(
                        "SELECT merged_id FROM seg_aliases WHERE survivor_id = $1",
                    )
                    .bind(id)
                    .fetch_all(&mut *conn)
                    .await?;
                    ids.push(id.clone());
                    for pid in &ids {
                        // Every version of the person's memberships too: the snapshots of
                        // retained runs forget them.
                        for table in [
                            "seg_run_scores",
                            "seg_run_members",
                            "seg_memberships",
                            "seg_changes",
                        ] {
                            sqlx::query(&format!("DELETE FROM {table} WHERE profile_id = $1"))
                                .bind(pid)
                                .execute(&mut *conn)
                                .await?;
                        }
                    }
                    sqlx::query("DELETE FROM seg_aliases WHERE survivor_id = $1 OR merged_id = $1")
                        .bind(id)
                        .execute(&mut *conn)
                        .await?;
                    touched.remove(id);
                }
            }
        }
        self.append_changes(conn, &mut changes).await?;
        w.tx.commit().await?;
        Ok((touched, changes))
    }

    async fn resolve_profile(&self, profile_id: &str) -> StoreResult<Option<String>> {
        let mut conn = self.db.pool.acquire().await?;
        let id = Self::survivor(&mut conn, profile_id).await?;
        let known: Option<String> =
            sqlx::query_scalar("SELECT profile_id FROM seg_profiles WHERE profile_id = $1")
                .bind(&id)
                .fetch_optional(&mut *conn)
                .await?;
        Ok(known)
    }

    async fn define_segment(
        &self,
        segment: &pb::Segment,
        kind: i32,
        expected_version: i64,
        now: i64,
    ) -> StoreResult<(SegmentRecord, bool)> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        self.db
            .lock_keys(conn, [format!("segment:{}", segment.segment_id)])
            .await?;
        let def = stored_definition(segment);
        let sql = format!("SELECT {SEGMENT_COLUMNS} FROM seg_segments WHERE segment_id = $1");
        let existing = sqlx::query(&sql)
            .bind(&segment.segment_id)
            .fetch_optional(&mut *conn)
            .await?
            .map(|r| segment_from_row(&r))
            .transpose()?;
        let created = match &existing {
            None => {
                if expected_version != 0 {
                    return Err(StoreError::VersionMismatch {
                        id: segment.segment_id.clone(),
                        expected: expected_version,
                        actual: 0,
                    });
                }
                sqlx::query(
                    "INSERT INTO seg_segments (segment_id, definition, kind, version, created_at, updated_at, deleted, last_run_id) \
                     VALUES ($1, $2, $3, 1, $4, $5, 0, '')",
                )
                .bind(&segment.segment_id)
                .bind(&def)
                .bind(i64::from(kind))
                .bind(now)
                .bind(now)
                .execute(&mut *conn)
                .await?;
                true
            }
            Some(e) if e.deleted => {
                return Err(StoreError::SegmentDeleted(segment.segment_id.clone()));
            }
            Some(e) => {
                if expected_version != 0 && e.version != expected_version {
                    return Err(StoreError::VersionMismatch {
                        id: segment.segment_id.clone(),
                        expected: expected_version,
                        actual: e.version,
                    });
                }
                if stored_definition(&e.segment) != def {
                    sqlx::query(
                        "UPDATE seg_segments SET definition = $1, kind = $2, version = version + 1, \
                         updated_at = $3, last_run_id = '' WHERE segment_id = $4",
                    )
                    .bind(&def)
                    .bind(i64::from(kind))
                    .bind(now)
                    .bind(&segment.segment_id)
                    .execute(&mut *conn)
                    .await?;
                }
                false
            }
        };
        let row = sqlx::query(&sql)
            .bind(&segment.segment_id)
            .fetch_one(&mut *conn)
            .await?;
        let record = segment_from_row(&row)?;
        w.tx.commit().await?;
        Ok((record, created))
    }

    async fn get_segment(&self, id: &str) -> StoreResult<SegmentRecord> {
        let sql = format!("SELECT {SEGMENT_COLUMNS} FROM seg_segments WHERE segment_id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.db.pool)
            .await?
            .ok_or_else(|| StoreError::SegmentNotFound(id.to_owned()))?;
        segment_from_row(&row)
    }

    async fn list_segments(
        &self,
        kinds: &[i32],
        after: &str,
        limit: i64,
    ) -> StoreResult<Vec<SegmentRecord>> {
        let mut sql = format!(
            "SELECT {SEGMENT_COLUMNS} FROM seg_segments WHERE deleted = 0 AND segment_id > $1"
        );
        if !kinds.is_empty() {
            sql.push_str(&format!(" AND kind IN ({})", placeholders(2, kinds.len())));
        }
        sql.push_str(&format!(
            " ORDER BY segment_id LIMIT CAST(${} AS BIGINT)",
            kinds.len() + 2
        ));
        let mut q = sqlx::query(&sql).bind(after);
        for k in kinds {
            q = q.bind(i64::from(*k));
        }
        q.bind(limit)
            .fetch_all(&self.db.pool)
            .await?
            .iter()
            .map(segment_from_row)
            .collect()
    }

    async fn live_segments(&self) -> StoreResult<Vec<SegmentRecord>> {
        self.list_segments(&[], "", i64::MAX).await
    }

    async fn segment_sizes(&self, ids: &[String]) -> StoreResult<HashMap<String, i64>> {
        let mut out = HashMap::new();
        for chunk in ids.chunks(LOOKUP_CHUNK) {
            let sql = format!(
                "SELECT segment_id, CAST(COUNT(*) AS BIGINT) FROM seg_memberships \
                 WHERE to_version IS NULL AND segment_id IN ({}) GROUP BY segment_id",
                placeholders(1, chunk.len())
            );
            let mut q = sqlx::query_as::<_, (String, i64)>(&sql);
            for id in chunk {
                q = q.bind(id.clone());
            }
            out.extend(q.fetch_all(&self.db.pool).await?);
        }
        Ok(out)
    }

    async fn delete_segment(&self, id: &str, now: i64) -> StoreResult<Vec<ChangeRow>> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        self.db.lock_keys(conn, [format!("segment:{id}")]).await?;
        let deleted: Option<i64> =
            sqlx::query_scalar("SELECT deleted FROM seg_segments WHERE segment_id = $1")
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?;
        match deleted {
            None => return Err(StoreError::SegmentNotFound(id.to_owned())),
            Some(d) if d != 0 => return Ok(Vec::new()),
            Some(_) => {}
        }
        self.db.lock_id(conn, CHANGES_LOCK).await?;
        let v = pending_version(conn).await?;
        let rows = sqlx::query(
            "SELECT segment_id, profile_id, cluster_index, distance, entered_at \
             FROM seg_memberships WHERE segment_id = $1 AND to_version IS NULL ORDER BY profile_id",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
        let mut changes = Vec::with_capacity(rows.len());
        for r in &rows {
            let m = member_from_row(r)?;
            changes.push(change(
                &m.profile_id,
                id,
                m.cluster_index,
                pb::MembershipChangeType::Exited,
                pb::MembershipChangeReason::SegmentDeleted,
                "",
                now,
            ));
        }
        // Ended at the pending version: the retained runs keep the segment's members.
        for sql in [
            "DELETE FROM seg_memberships WHERE segment_id = $1 AND to_version IS NULL \
             AND from_version = $2",
            "UPDATE seg_memberships SET to_version = $2 WHERE segment_id = $1 AND to_version IS NULL",
        ] {
            sqlx::query(sql)
                .bind(id)
                .bind(v)
                .execute(&mut *conn)
                .await?;
        }
        sqlx::query("UPDATE seg_segments SET deleted = 1, updated_at = $1 WHERE segment_id = $2")
            .bind(now)
            .bind(id)
            .execute(&mut *conn)
            .await?;
        self.append_changes(conn, &mut changes).await?;
        w.tx.commit().await?;
        Ok(changes)
    }

    async fn start_run(&self, run: &RunRecord) -> StoreResult<(RunRecord, bool)> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        self.db.lock_id(conn, RUN_LOCK).await?;
        let sql = format!("SELECT {RUN_COLUMNS} FROM seg_runs WHERE idempotency_key = $1");
        if let Some(row) = sqlx::query(&sql)
            .bind(&run.idempotency_key)
            .fetch_optional(&mut *conn)
            .await?
        {
            return Ok((run_from_row(&row)?, false));
        }
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM seg_runs WHERE state IN ($1, $2) ORDER BY created_at LIMIT 1"
        );
        if let Some(row) = sqlx::query(&sql)
            .bind(pb::RecomputeState::Pending as i64)
            .bind(pb::RecomputeState::Running as i64)
            .fetch_optional(&mut *conn)
            .await?
        {
            return Ok((run_from_row(&row)?, false));
        }
        sqlx::query(
            "INSERT INTO seg_runs (run_id, idempotency_key, requested_by, state, phase, processed, total, \
             created_at, error_message, outputs, changes_cursor, model) \
             VALUES ($1, $2, $3, $4, 0, 0, 0, $5, '', '', '', '')",
        )
        .bind(&run.run_id)
        .bind(&run.idempotency_key)
        .bind(&run.requested_by)
        .bind(pb::RecomputeState::Pending as i64)
        .bind(run.created_at)
        .execute(&mut *conn)
        .await?;
        w.tx.commit().await?;
        Ok((self.get_run(&run.run_id).await?, true))
    }

    async fn run_progress(
        &self,
        run_id: &str,
        phase: i32,
        processed: i64,
        total: i64,
        now: i64,
        data_as_of: Option<i64>,
    ) -> StoreResult<()> {
        let mut w = self.begin_write().await?;
        sqlx::query(
            "UPDATE seg_runs SET state = $1, phase = $2, processed = $3, total = $4, \
             start_time = COALESCE(start_time, $5), data_as_of = COALESCE($6, data_as_of) \
             WHERE run_id = $7",
        )
        .bind(pb::RecomputeState::Running as i64)
        .bind(i64::from(phase))
        .bind(processed)
        .bind(total)
        .bind(now)
        .bind(data_as_of)
        .bind(run_id)
        .execute(&mut *w.tx)
        .await?;
        w.tx.commit().await?;
        Ok(())
    }

    async fn fail_run(&self, run_id: &str, message: &str, now: i64) -> StoreResult<()> {
        let mut w = self.begin_write().await?;
        sqlx::query(
            "UPDATE seg_runs SET state = $1, error_message = $2, finish_time = $3 WHERE run_id = $4",
        )
        .bind(pb::RecomputeState::Failed as i64)
        .bind(message)
        .bind(now)
        .bind(run_id)
        .execute(&mut *w.tx)
        .await?;
        w.tx.commit().await?;
        Ok(())
    }

    async fn fail_interrupted_runs(&self, now: i64) -> StoreResult<u64> {
        let mut w = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE seg_runs SET state = $1, error_message = 'interrupted by a restart', \
             finish_time = $2 WHERE state IN ($3, $4)",
        )
        .bind(pb::RecomputeState::Failed as i64)
        .bind(now)
        .bind(pb::RecomputeState::Pending as i64)
        .bind(pb::RecomputeState::Running as i64)
        .execute(&mut *w.tx)
        .await?
        .rows_affected();
        w.tx.commit().await?;
        Ok(n)
    }

    async fn get_run(&self, run_id: &str) -> StoreResult<RunRecord> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM seg_runs WHERE run_id = $1");
        let row = sqlx::query(&sql)
            .bind(run_id)
            .fetch_optional(&self.db.pool)
            .await?
            .ok_or_else(|| StoreError::RunNotFound(run_id.to_owned()))?;
        run_from_row(&row)
    }

    async fn list_runs(
        &self,
        states: &[i32],
        before: Option<(i64, String)>,
        limit: i64,
    ) -> StoreResult<Vec<RunRecord>> {
        let mut sql = format!("SELECT {RUN_COLUMNS} FROM seg_runs WHERE 1 = 1");
        let mut p = 1;
        if before.is_some() {
            sql.push_str(" AND (created_at < $1 OR (created_at = $2 AND run_id < $3))");
            p = 4;
        }
        if !states.is_empty() {
            sql.push_str(&format!(
                " AND state IN ({})",
                placeholders(p, states.len())
            ));
            p += states.len();
        }
        sql.push_str(&format!(
            " ORDER BY created_at DESC, run_id DESC LIMIT CAST(${p} AS BIGINT)"
        ));
        let mut q = sqlx::query(&sql);
        if let Some((at, id)) = before {
            q = q.bind(at).bind(at).bind(id);
        }
        for s in states {
            q = q.bind(i64::from(*s));
        }
        q.bind(limit)
            .fetch_all(&self.db.pool)
            .await?
            .iter()
            .map(run_from_row)
            .collect()
    }

    async fn latest_run(&self) -> StoreResult<Option<RunRecord>> {
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM seg_runs WHERE state = $1 \
             ORDER BY finish_time DESC, run_id DESC LIMIT 1"
        );
        sqlx::query(&sql)
            .bind(pb::RecomputeState::Succeeded as i64)
            .fetch_optional(&self.db.pool)
            .await?
            .map(|r| run_from_row(&r))
            .transpose()
    }

    async fn publish_run(&self, p: RunPublication) -> StoreResult<RunRecord> {
        if let Some(pg) = &self.pg {
            return self.publish_run_pg(pg, p).await;
        }
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        self.db.lock_id(conn, CHANGES_LOCK).await?;
        let version = pending_version(conn).await?;
        // Current memberships of the evaluated segments, diffed against the run's.
        let mut current = CurrentMembers::new();
        let ids: Vec<String> = p.segments.iter().map(|(s, _)| s.clone()).collect();
        for chunk in ids.chunks(LOOKUP_CHUNK) {
            let sql = format!(
                "SELECT segment_id, profile_id, cluster_index, distance, entered_at \
                 FROM seg_memberships WHERE to_version IS NULL AND segment_id IN ({})",
                placeholders(1, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id.clone());
            }
            for r in q.fetch_all(&mut *conn).await? {
                let m = member_from_row(&r)?;
                add_current(&mut current, m.segment_id, m.profile_id, m.cluster_index);
            }
        }
        let (deletes, inserts, mut changes) = diff_memberships(
            &current,
            &p.members,
            pb::MembershipChangeReason::Recompute,
            &p.run_id,
            p.now,
        );
        Self::end_members(conn, &deletes, version).await?;
        Self::insert_members(conn, &inserts, version).await?;
        // Distances of stayers are refreshed in bulk only for CLUSTER segments; skipped here
        // (the run snapshot holds the assignment; distance is informational).
        self.append_changes(conn, &mut changes).await?;
        let scores = &p.scores;
        insert_many(
            conn,
            &format!("seg_run_scores (run_id, {SCORE_COLUMNS})"),
            "",
            15,
            scores.len(),
            |q, i| bind_score(q.bind(p.run_id.clone()), &scores[i]),
        )
        .await?;
        insert_many(
            conn,
            "seg_run_segments (run_id, segment_id)",
            "",
            2,
            p.segments.len(),
            |q, i| q.bind(p.run_id.clone()).bind(p.segments[i].0.clone()),
        )
        .await?;
        sqlx::query("DELETE FROM seg_scores WHERE scored_at <= $1")
            .bind(p.now)
            .execute(&mut *conn)
            .await?;
        for (id, version) in &p.segments {
            sqlx::query(
                "UPDATE seg_segments SET last_run_id = $1 WHERE segment_id = $2 AND version = $3",
            )
            .bind(&p.run_id)
            .bind(id)
            .bind(*version)
            .execute(&mut *conn)
            .await?;
        }
        let outputs = outputs_with_changes(&p.outputs, &changes);
        let end: i64 =
            sqlx::query_scalar("SELECT CAST(COALESCE(MAX(seq), 0) AS BIGINT) FROM seg_changes")
                .fetch_one(&mut *conn)
                .await?;
        let model = serde_json::to_string(&p.model).map_err(corrupt)?;
        sqlx::query(FINISH_RUN_SQL)
            .bind(pb::RecomputeState::Succeeded as i64)
            .bind(pb::RecomputePhase::Publishing as i64)
            .bind(p.now)
            .bind(hex::encode(outputs.encode_to_vec()))
            .bind(crate::service::change_cursor(end))
            .bind(model)
            .bind(&p.run_id)
            .bind(version)
            .execute(&mut *conn)
            .await?;
        // Retention: drop snapshots of succeeded runs beyond the newest `retained_runs`.
        let succeeded: Vec<String> = sqlx::query_scalar(
            "SELECT run_id FROM seg_runs WHERE state = $1 AND snapshot_dropped = 0 \
             ORDER BY finish_time DESC, run_id DESC",
        )
        .bind(pb::RecomputeState::Succeeded as i64)
        .fetch_all(&mut *conn)
        .await?;
        let keep = usize::try_from(p.retained_runs).unwrap_or(usize::MAX);
        let old = succeeded.into_iter().skip(keep);
        for run in old {
            sqlx::query("UPDATE seg_runs SET snapshot_dropped = 1 WHERE run_id = $1")
                .bind(&run)
                .execute(&mut *conn)
                .await?;
            for table in ["seg_run_scores", "seg_run_members", "seg_run_segments"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE run_id = $1"))
                    .bind(&run)
                    .execute(&mut *conn)
                    .await?;
            }
        }
        sqlx::query(PRUNE_CLOSED_SQL)
            .bind(pb::RecomputeState::Succeeded as i64)
            .execute(&mut *conn)
            .await?;
        w.tx.commit().await?;
        self.get_run(&p.run_id).await
    }

    async fn load_all_profiles(&self, as_of: i64) -> StoreResult<Vec<ProfileData>> {
        if let Some(pg) = &self.pg {
            return self.load_all_pg(pg, as_of).await;
        }
        self.load(None, as_of).await
    }

    async fn load_profiles(&self, ids: &[String], as_of: i64) -> StoreResult<Vec<ProfileData>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.load(Some(ids), as_of).await
    }

    async fn run_lifecycles(&self, run_id: &str) -> StoreResult<HashMap<String, (i64, i64)>> {
        const SQL: &str = "SELECT profile_id, lifecycle, lifecycle_since FROM seg_run_scores \
             WHERE run_id = $1 AND lifecycle IS NOT NULL AND lifecycle_since IS NOT NULL";
        let rows: Vec<(String, i64, i64)> = match &self.pg {
            // The whole snapshot (every profile of the run) streamed with COPY, parsed in
            // place; the run id is quoted as a literal (COPY takes no parameters).
            Some(pg) => {
                let mut conn = pg.acquire().await?;
                let mut map = HashMap::new();
                copy_out_rows(
                    &mut conn,
                    &format!(
                        "COPY (SELECT profile_id, lifecycle, lifecycle_since FROM seg_run_scores \
                         WHERE run_id = '{}' AND lifecycle IS NOT NULL AND lifecycle_since IS NOT NULL) \
                         TO STDOUT",
                        run_id.replace('\'', "''")
                    ),
                    |f| {
                        if f.len() != 3 {
                            return Err(corrupt("lifecycle row of the wrong width"));
                        }
                        map.insert(
                            copy_text(f[0])?.into_owned(),
                            (copy_int(f[1])?.unwrap_or(0), copy_int(f[2])?.unwrap_or(0)),
                        );
                        Ok(())
                    },
                )
                .await?;
                return Ok(map);
            }
            None => {
                sqlx::query_as(SQL)
                    .bind(run_id)
                    .fetch_all(&self.db.pool)
                    .await?
            }
        };
        Ok(rows.into_iter().map(|(p, l, s)| (p, (l, s))).collect())
    }

    async fn memberships_of(&self, profile_ids: &[String]) -> StoreResult<Vec<MemberRow>> {
        let mut out = Vec::new();
        for chunk in profile_ids.chunks(LOOKUP_CHUNK) {
            let sql = format!(
                "SELECT m.segment_id, m.profile_id, m.cluster_index, m.distance, m.entered_at \
                 FROM seg_memberships m JOIN seg_segments s ON s.segment_id = m.segment_id \
                 WHERE s.deleted = 0 AND m.to_version IS NULL AND m.profile_id IN ({}) \
                 ORDER BY m.profile_id, m.segment_id",
                placeholders(1, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id.clone());
            }
            for r in q.fetch_all(&self.db.pool).await? {
                out.push(member_from_row(&r)?);
            }
        }
        Ok(out)
    }

    async fn apply_realtime(
        &self,
        run_id: &str,
        scores: &[ScoreRow],
        segments: &[String],
        members: &[MemberRow],
        now: i64,
    ) -> StoreResult<Vec<ChangeRow>> {
        if let Some(pg) = &self.pg {
            return Self::apply_realtime_pg(pg, run_id, scores, segments, members, now).await;
        }
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        self.db.lock_id(conn, CHANGES_LOCK).await?;
        let v = pending_version(conn).await?;
        let profiles: Vec<String> = scores.iter().map(|s| s.profile_id.clone()).collect();
        let segs: BTreeSet<&String> = segments.iter().collect();
        let mut current = CurrentMembers::new();
        for chunk in profiles.chunks(LOOKUP_CHUNK) {
            let sql = format!(
                "SELECT segment_id, profile_id, cluster_index, distance, entered_at \
                 FROM seg_memberships WHERE to_version IS NULL AND profile_id IN ({})",
                placeholders(1, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id.clone());
            }
            for r in q.fetch_all(&mut *conn).await? {
                let m = member_from_row(&r)?;
                if segs.contains(&m.segment_id) {
                    add_current(&mut current, m.segment_id, m.profile_id, m.cluster_index);
                }
            }
        }
        let (deletes, inserts, mut changes) = diff_memberships(
            &current,
            members,
            pb::MembershipChangeReason::Realtime,
            "",
            now,
        );
        Self::end_members(conn, &deletes, v).await?;
        Self::insert_members(conn, &inserts, v).await?;
        self.append_changes(conn, &mut changes).await?;
        for chunk in profiles.chunks(LOOKUP_CHUNK) {
            let sql = format!(
                "DELETE FROM seg_scores WHERE profile_id IN ({})",
                placeholders(1, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id.clone());
            }
            q.execute(&mut *conn).await?;
        }
        insert_many(
            conn,
            &format!("seg_scores (run_id, scored_at, {SCORE_COLUMNS})"),
            "",
            16,
            scores.len(),
            |q, i| bind_score(q.bind(run_id.to_owned()).bind(now), &scores[i]),
        )
        .await?;
        w.tx.commit().await?;
        Ok(changes)
    }

    async fn rescore_read(&self, ids: &[String], as_of: i64) -> StoreResult<RescoreRead> {
        if let Some(pg) = &self.pg {
            return Self::rescore_read_pg(pg, ids, as_of).await;
        }
        let latest_run = self.latest_run().await?.map(|r| r.run_id);
        let (n, versions, deleted, updated): (i64, i64, i64, i64) = sqlx::query_as(SEGMENTS_STAMP)
            .fetch_one(&self.db.pool)
            .await?;
        let profiles = self.load_profiles(ids, as_of).await?;
        let mut previous = HashMap::new();
        for p in &profiles {
            if let Some((row, _, at)) = self.profile_scores(&p.profile_id).await? {
                previous.insert(
                    p.profile_id.clone(),
                    PreviousLifecycle {
                        lifecycle: row.lifecycle,
                        lifecycle_since: row.lifecycle_since,
                        scored_at: at,
                    },
                );
            }
        }
        Ok(RescoreRead {
            latest_run,
            segments_stamp: format!("{n}:{versions}:{deleted}:{updated}"),
            profiles,
            previous,
        })
    }

    async fn profile_scores(
        &self,
        profile_id: &str,
    ) -> StoreResult<Option<(ScoreRow, String, i64)>> {
        let sql = format!(
            "SELECT run_id, scored_at, {SCORE_COLUMNS} FROM seg_scores WHERE profile_id = $1"
        );
        if let Some(row) = sqlx::query(&sql)
            .bind(profile_id)
            .fetch_optional(&self.db.pool)
            .await?
        {
            return Ok(Some((
                score_from_row(&row)?,
                row.try_get("run_id")?,
                row.try_get("scored_at")?,
            )));
        }
        let Some(run) = self.latest_run().await? else {
            return Ok(None);
        };
        let sql = format!(
            "SELECT {SCORE_COLUMNS} FROM seg_run_scores WHERE run_id = $1 AND profile_id = $2"
        );
        let row = sqlx::query(&sql)
            .bind(&run.run_id)
            .bind(profile_id)
            .fetch_optional(&self.db.pool)
            .await?;
        row.map(|r| {
            Ok((
                score_from_row(&r)?,
                run.run_id.clone(),
                run.finish_time.unwrap_or(0),
            ))
        })
        .transpose()
    }

    async fn run_members(
        &self,
        run_id: &str,
        segment_id: &str,
        cluster: Option<i64>,
        after_profile: &str,
        limit: i64,
    ) -> StoreResult<Vec<(String, i64)>> {
        let (source, version) = self.members_at(run_id, segment_id).await?;
        let sql = format!(
            "SELECT m.profile_id, m.cluster_index FROM {source} AND m.segment_id = $2 \
             AND m.profile_id > $3{} ORDER BY m.profile_id LIMIT CAST(${} AS BIGINT)",
            run_segment_filter(cluster, 4),
            if cluster.is_some() { 5 } else { 4 }
        );
        let q = sqlx::query_as(&sql);
        let mut q = match version {
            Some(v) => q.bind(v),
            None => q.bind(run_id.to_owned()),
        }
        .bind(segment_id)
        .bind(after_profile);
        if let Some(c) = cluster {
            q = q.bind(c);
        }
        Ok(q.bind(limit).fetch_all(&self.db.pool).await?)
    }

    async fn run_member_count(
        &self,
        run_id: &str,
        segment_id: &str,
        cluster: Option<i64>,
    ) -> StoreResult<i64> {
        let (source, version) = self.members_at(run_id, segment_id).await?;
        let sql = format!(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM {source} AND m.segment_id = $2{}",
            run_segment_filter(cluster, 3)
        );
        let q = sqlx::query_scalar(&sql);
        let mut q = match version {
            Some(v) => q.bind(v),
            None => q.bind(run_id.to_owned()),
        }
        .bind(segment_id);
        if let Some(c) = cluster {
            q = q.bind(c);
        }
        Ok(q.fetch_one(&self.db.pool).await?)
    }

    async fn run_retained(&self, run_id: &str) -> StoreResult<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM seg_runs \
             WHERE run_id = $1 AND state = $2 AND snapshot_dropped = 0",
        )
        .bind(run_id)
        .bind(pb::RecomputeState::Succeeded as i64)
        .fetch_one(&self.db.pool)
        .await?;
        Ok(n > 0)
    }

    async fn run_summary(
        &self,
        run_id: &str,
        segment_id: &str,
        cluster: Option<i64>,
    ) -> StoreResult<SummaryRow> {
        let (source, version) = self.members_at(run_id, segment_id).await?;
        // $3 is the run id in both shapes (the scores' partition key).
        let source = source.replacen(
            "m WHERE",
            "m LEFT JOIN seg_run_scores s ON s.run_id = $3 AND s.profile_id = m.profile_id WHERE",
            1,
        );
        let sql = format!(
            "SELECT CAST(COUNT(*) AS BIGINT), CAST(COUNT(s.r) AS BIGINT), \
             CAST(COALESCE(AVG(s.r), 0) AS DOUBLE PRECISION), CAST(COALESCE(AVG(s.f), 0) AS DOUBLE PRECISION), \
             CAST(COALESCE(AVG(s.m), 0) AS DOUBLE PRECISION), CAST(COALESCE(AVG(s.recency_days), 0) AS DOUBLE PRECISION), \
             CAST(COALESCE(AVG(s.frequency), 0) AS DOUBLE PRECISION), CAST(COALESCE(SUM(s.monetary_minor), 0) AS BIGINT), \
             CAST(COUNT(s.clv) AS BIGINT), CAST(COALESCE(AVG(s.clv), 0) AS DOUBLE PRECISION), \
             CAST(COALESCE(AVG(s.p_alive), 0) AS DOUBLE PRECISION) \
             FROM {source} AND m.segment_id = $2{}",
            run_segment_filter(cluster, 4)
        );
        let q = sqlx::query(&sql);
        let mut q = match version {
            Some(v) => q.bind(v),
            None => q.bind(run_id.to_owned()),
        }
        .bind(segment_id)
        .bind(run_id);
        if let Some(c) = cluster {
            q = q.bind(c);
        }
        let r = q.fetch_one(&self.db.pool).await?;
        Ok(SummaryRow {
            size: r.try_get(0)?,
            scored: r.try_get(1)?,
            mean_rfm: (r.try_get(2)?, r.try_get(3)?, r.try_get(4)?),
            mean_recency_days: r.try_get(5)?,
            mean_frequency: r.try_get(6)?,
            revenue: r.try_get(7)?,
            predicted: r.try_get(8)?,
            mean_clv: r.try_get(9)?,
            mean_p_alive: r.try_get(10)?,
        })
    }

    async fn run_totals(&self, run_id: &str) -> StoreResult<(i64, i64)> {
        Ok(sqlx::query_as(
            "SELECT CAST(COUNT(*) AS BIGINT), CAST(COALESCE(SUM(monetary_minor), 0) AS BIGINT) \
             FROM seg_run_scores WHERE run_id = $1 AND r IS NOT NULL",
        )
        .bind(run_id)
        .fetch_one(&self.db.pool)
        .await?)
    }

    async fn run_score_groups(
        &self,
        run_id: &str,
        dimension: &str,
    ) -> StoreResult<HashMap<String, String>> {
        let sql = if dimension == "rfm" {
            "SELECT profile_id, rfm_name FROM seg_run_scores WHERE run_id = $1 AND rfm_name IS NOT NULL"
        } else {
            "SELECT profile_id, CAST(lifecycle AS TEXT) FROM seg_run_scores WHERE run_id = $1 AND lifecycle IS NOT NULL"
        };
        let rows: Vec<(String, String)> = sqlx::query_as(sql)
            .bind(run_id)
            .fetch_all(&self.db.pool)
            .await?;
        Ok(rows.into_iter().collect())
    }

    async fn run_member_rows(
        &self,
        run_id: &str,
        segments: &[String],
    ) -> StoreResult<Vec<(String, String, i64)>> {
        let (version, segments): (Option<i64>, Vec<&String>) =
            match self.run_snapshot(run_id).await? {
                Some((v, evaluated)) => (
                    Some(v),
                    segments.iter().filter(|s| evaluated.contains(*s)).collect(),
                ),
                None => (None, segments.iter().collect()),
            };
        if segments.is_empty() {
            return Ok(Vec::new());
        }
        let source = match version {
            Some(_) => format!("seg_memberships m WHERE {AT_VERSION}"),
            None => "seg_run_members m WHERE m.run_id = $1".to_owned(),
        };
        let sql = format!(
            "SELECT m.profile_id, m.segment_id, m.cluster_index FROM {source} \
             AND m.segment_id IN ({})",
            placeholders(2, segments.len())
        );
        let q = sqlx::query_as(&sql);
        let mut q = match version {
            Some(v) => q.bind(v),
            None => q.bind(run_id.to_owned()),
        };
        for s in segments {
            q = q.bind(s.clone());
        }
        Ok(q.fetch_all(&self.db.pool).await?)
    }

    async fn changes_after(&self, seq: i64, limit: i64) -> StoreResult<Vec<ChangeRow>> {
        sqlx::query(
            "SELECT seq, change_id, profile_id, segment_id, cluster_index, change_type, reason, run_id, occurred_at \
             FROM seg_changes WHERE seq > $1 ORDER BY seq LIMIT CAST($2 AS BIGINT)",
        )
        .bind(seq)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?
        .iter()
        .map(change_from_row)
        .collect()
    }

    async fn changes_end(&self) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT CAST(COALESCE(MAX(seq), 0) AS BIGINT) FROM seg_changes")
                .fetch_one(&self.db.pool)
                .await?,
        )
    }
}

/// Marks a published run succeeded with its outputs, change-log cursor and model; the same
/// statement on both engines (the native PostgreSQL publish and the `sqlx::Any` one).
const FINISH_RUN_SQL: &str = "UPDATE seg_runs SET state = $1, phase = $2, finish_time = $3, \
     outputs = $4, changes_cursor = $5, model = $6, member_version = $8 WHERE run_id = $7";

/// The run's outputs with the entered / exited counts of the membership changes it published.
fn outputs_with_changes(
    outputs: &pb::RecomputeOutputs,
    changes: &[ChangeRow],
) -> pb::RecomputeOutputs {
    let entered = changes
        .iter()
        .filter(|c| c.change_type == pb::MembershipChangeType::Entered as i32)
        .count();
    let mut outputs = outputs.clone();
    outputs.entered = i64::try_from(entered).unwrap_or(i64::MAX);
    outputs.exited = i64::try_from(changes.len() - entered).unwrap_or(i64::MAX);
    outputs
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn member(segment: &str, profile: &str, cluster: i64) -> MemberRow {
        MemberRow {
            segment_id: segment.into(),
            profile_id: profile.into(),
            cluster_index: cluster,
            distance: None,
            entered_at: 0,
        }
    }

    #[test]
    fn binary_copy_tuples_spell_fields_nulls_and_fresh_change_ids() {
        let mut out = Vec::new();
        let m = MemberRow {
            distance: Some(0.5),
            ..member("seg", "p1", 2)
        };
        binary_member(&mut out, &m, 7, 3);
        let mut want = 6i16.to_be_bytes().to_vec();
        for text in ["seg", "p1"] {
            want.extend_from_slice(&i32::try_from(text.len()).unwrap().to_be_bytes());
            want.extend_from_slice(text.as_bytes());
        }
        want.extend_from_slice(&8i32.to_be_bytes());
        want.extend_from_slice(&2i64.to_be_bytes());
        want.extend_from_slice(&8i32.to_be_bytes());
        want.extend_from_slice(&0.5f64.to_bits().to_be_bytes());
        for v in [7i64, 3] {
            want.extend_from_slice(&8i32.to_be_bytes());
            want.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(out, want);
        let mut out = Vec::new();
        bin_f64(&mut out, None);
        assert_eq!(out, (-1i32).to_be_bytes());

        let change = ("p1", "seg", -1, true);
        let reason = pb::MembershipChangeReason::Recompute;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        binary_change(&mut a, 5, &change, reason, "run", 9);
        binary_change(&mut b, 5, &change, reason, "run", 9);
        assert_eq!(&a[..2], &9i16.to_be_bytes());
        assert_eq!(&a[2..6], &8i32.to_be_bytes());
        assert_eq!(&a[6..14], &5i64.to_be_bytes());
        assert_eq!(&a[14..18], &36i32.to_be_bytes());
        let id = std::str::from_utf8(&a[18..54]).unwrap();
        let parsed = uuid::Uuid::parse_str(id).unwrap();
        assert_eq!(parsed.get_version_num(), 4);
        assert_eq!(parsed.hyphenated().to_string(), id);
        assert_ne!(a[18..54], b[18..54], "each change gets its own id");
        assert_eq!(a[54..], b[54..]);
    }

    #[test]
    fn a_first_run_diff_enters_every_membership_in_order() {
        let next = vec![member("vip", "p1", -1), member("clusters", "p1", 3)];
        let (deletes, inserts, changes) = diff_memberships(
            &CurrentMembers::new(),
            &next,
            pb::MembershipChangeReason::Recompute,
            "run",
            7,
        );
        assert!(deletes.is_empty());
        assert_eq!(
            inserts,
            next.iter()
                .map(|m| MemberRow {
                    entered_at: 7,
                    ..m.clone()
                })
                .collect::<Vec<_>>()
        );
        let kinds: Vec<(&str, i64, i32)> = changes
            .iter()
            .map(|c| (c.segment_id.as_str(), c.cluster_index, c.change_type))
            .collect();
        let entered = pb::MembershipChangeType::Entered as i32;
        assert_eq!(kinds, vec![("vip", -1, entered), ("clusters", 3, entered)]);
    }

    #[test]
    fn the_membership_diff_writes_only_what_changed() {
        let mut current = CurrentMembers::new();
        add_current(&mut current, "vip".into(), "p1".into(), -1);
        add_current(&mut current, "vip".into(), "p2".into(), -1);
        add_current(&mut current, "clusters".into(), "p1".into(), 0);
        add_current(&mut current, "clusters".into(), "p2".into(), 1);
        let next = vec![
            member("vip", "p1", -1),     // stays: nothing written
            member("vip", "p3", -1),     // enters
            member("clusters", "p1", 0), // stays
            member("clusters", "p2", 2), // moves from cluster 1 to 2
        ];
        let (deletes, inserts, changes) = diff_memberships(
            &current,
            &next,
            pb::MembershipChangeReason::Recompute,
            "run",
            7,
        );
        assert_eq!(
            deletes,
            vec![
                ("clusters".to_owned(), "p2".to_owned()),
                ("vip".to_owned(), "p2".to_owned())
            ]
        );
        let inserted: Vec<(&str, &str, i64, i64)> = inserts
            .iter()
            .map(|m| {
                (
                    m.segment_id.as_str(),
                    m.profile_id.as_str(),
                    m.cluster_index,
                    m.entered_at,
                )
            })
            .collect();
        assert_eq!(
            inserted,
            vec![("vip", "p3", -1, 7), ("clusters", "p2", 2, 7)]
        );
        use pb::MembershipChangeType as T;
        let summary: Vec<(&str, &str, i64, i32)> = changes
            .iter()
            .map(|c| {
                (
                    c.segment_id.as_str(),
                    c.profile_id.as_str(),
                    c.cluster_index,
                    c.change_type,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("vip", "p3", -1, T::Entered as i32),
                ("clusters", "p2", 1, T::Exited as i32),
                ("clusters", "p2", 2, T::Entered as i32),
                ("vip", "p2", -1, T::Exited as i32),
            ]
        );
        let ids: BTreeSet<&str> = changes.iter().map(|c| c.change_id.as_str()).collect();
        assert_eq!(ids.len(), 4, "change ids are unique");
        assert!(
            changes.iter().all(
                |c| uuid::Uuid::parse_str(&c.change_id).is_ok_and(|u| u.get_version_num() == 4)
            )
        );
    }
}
