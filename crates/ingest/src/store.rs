//! Event storage: the [`EventStore`] trait and its two implementations.
//!
//! - [`PgEventStore`] (production): `ingest_lookup` finds the batch's keys the log remembers
//!   ([`EventStore::look_up_keys`], which the service runs beside the batch's BatchResolve and
//!   hands in with the [`CommitTurn`]); then one transaction: the log lock, the PL/pgSQL
//!   function `ingest_append_looked_up` (migration 0003) called with the batch as arrays
//!   (`UNNEST` inside, never row by row), then the producer's sequence and the batch result;
//!   over a native `sqlx::PgPool`, because `sqlx::Any` cannot bind arrays. A [`CommitTurn`]
//!   lets one stream's next batch send its rows while the previous batch holds the lock.
//! - [`SqliteEventStore`] (the embedded default): the same transaction, statement by
//!   statement, behind one writer lock.
//!
//! Both keep the same tables (see `migrations/`) and pass one conformance suite. A commit
//! appends, atomically and in commit order (`seq`, under the log lock), one `events` row per
//! accepted event carrying its dedup key (`payload_hash`, unique per `(source, event_id)` while
//! remembered) and its aggregate delta (`delta`, delivered later to
//! ProfileService.ApplyAggregates by [`crate::forwarder`], which follows the log by `seq`);
//! refunds whose order is not known yet wait in the outbox instead. For IngestStream it also
//! stores the producer's new sequence and the batch's result. Reads (timelines, the log, the
//! deltas, the outbox) are the same SQL on both engines and go through `sqlx::Any`.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use clientele_proto::v1 as pb;
use clientele_runtime::db::{Backend, Database};
use prost::Message;
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool};

use crate::validate::Effect;
use clientele_runtime::time::timestamp;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("database setup: {0}")]
    Setup(#[from] clientele_runtime::db::DbError),
    /// A stream batch's sequence does not follow the producer's durable sequence: another
    /// stream of the same producer got there first.
    #[error("producer `{producer_id}` is not at sequence {expected}")]
    Sequence {
        /// The producer.
        producer_id: String,
        /// The sequence this commit expected to follow.
        expected: u64,
    },
    /// Stored data could not be decoded.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// A feed's stored cursor moved since it was read: another replica applied the same
    /// changes first. Nothing was written; read the cursor again.
    #[error("feed `{0}` cursor moved (another consumer applied it)")]
    CursorMoved(String),
}

/// Result of store calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// A validated, resolved event ready to commit.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Source, part of the key.
    pub source: String,
    /// Event id, part of the key.
    pub event_id: String,
    /// Payload hash.
    pub hash: Vec<u8>,
    /// Resolved profile id.
    pub profile_id: String,
    /// `EventKind` number.
    pub kind: i32,
    /// Custom event name, for custom events.
    pub custom_name: Option<String>,
    /// µs since the epoch.
    pub occurred_at: i64,
    /// Encoded redacted `Event`.
    pub body: Vec<u8>,
    /// `IdentifierType` numbers of the redacted identifiers.
    pub redacted: Vec<i32>,
    /// ApplyAggregates idempotency key.
    pub aggregate_key: String,
    /// What the event does to the profile's aggregates.
    pub effect: Effect,
}

/// What a commit did with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored now.
    Accepted,
    /// Already stored with the same payload; the stored event's profile id.
    Duplicate(String),
    /// Already stored with a different payload; the stored event's profile id.
    Conflict(String),
}

/// Marks a commit as IngestStream batch `sequence` of `producer_id`; `result` encodes the
/// batch's result from the outcomes and is stored with it.
pub struct StreamMark<'a> {
    /// The producer.
    pub producer_id: &'a str,
    /// The batch sequence; the producer must be durable through `sequence - 1`.
    pub sequence: u64,
    /// Builds the stored result from the commit's outcomes.
    pub result: &'a (dyn Fn(&[Outcome]) -> Vec<u8> + Send + Sync),
}

impl std::fmt::Debug for StreamMark<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamMark")
            .field("producer_id", &self.producer_id)
            .field("sequence", &self.sequence)
            .finish()
    }
}

/// A stored event as read back.
#[derive(Debug, Clone)]
pub struct StoredRow {
    /// Log position.
    pub seq: i64,
    /// Profile id at ingestion.
    pub profile_id: String,
    /// `EventKind` number.
    pub kind: i32,
    /// µs.
    pub occurred_at: i64,
    /// µs.
    pub ingested_at: i64,
    /// Encoded redacted event.
    pub body: Vec<u8>,
    /// Redacted identifier types.
    pub redacted: Vec<i32>,
}

impl StoredRow {
    /// The protobuf form; `profile_id` overrides the stored one (merges).
    pub fn to_proto(&self, profile_id: Option<&str>) -> StoreResult<pb::StoredEvent> {
        let event = pb::Event::decode(self.body.as_slice())
            .map_err(|e| StoreError::Corrupt(format!("event {}: {e}", self.seq)))?;
        Ok(pb::StoredEvent {
            event: Some(event),
            kind: self.kind,
            profile_id: profile_id.unwrap_or(&self.profile_id).to_string(),
            ingested_at: Some(timestamp(self.ingested_at)),
            redacted_identifier_types: self.redacted.clone(),
        })
    }
}

/// Orders commits of one stream that run side by side: each takes the log lock only after
/// the previous one holds it, so they append and advance the producer in sequence order while
/// their work before the lock (sending the batch, looking up its keys) overlaps the previous
/// commit's locked part.
#[derive(Debug, Default)]
pub struct CommitTurn {
    /// Resolves once the previous commit holds the log lock, or has failed (its sender
    /// dropped; this commit then fails its sequence check if it needed that batch).
    pub after: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Sent once this commit holds the log lock; dropped (releasing the next) if it fails first.
    pub locked: Option<tokio::sync::oneshot::Sender<()>>,
    /// The batch's keys already looked up by [`EventStore::look_up_keys`] (run beside the
    /// batch's BatchResolve), so the commit skips its own lookup. Advisory like that lookup:
    /// a key stored after it is still caught under the log lock.
    pub looked_up: Option<LookedUpKeys>,
}

/// The keys the log remembers among a batch's, looked up ahead of its commit: (source,
/// event_id, stored payload hash, stored profile id) for each key found (usually none).
#[derive(Debug, Default)]
pub struct LookedUpKeys(Vec<(String, String, Vec<u8>, String)>);

/// A page of a timeline.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    /// The profile and the profiles merged into it.
    pub profile_ids: Vec<String>,
    /// Kinds; empty means all.
    pub kinds: Vec<i32>,
    /// Custom event names; empty means all.
    pub custom_names: Vec<String>,
    /// Inclusive lower bound on `occurred_at`, µs.
    pub start: Option<i64>,
    /// Exclusive upper bound on `occurred_at`, µs.
    pub end: Option<i64>,
    /// Continue after this `(occurred_at, seq)`.
    pub after: Option<(i64, i64)>,
    /// Ascending instead of descending.
    pub oldest_first: bool,
    /// Rows to return.
    pub limit: i64,
}

/// An outbox row: an encoded `AggregateDelta`.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Row id.
    pub id: i64,
    /// Encoded `pb::AggregateDelta`.
    pub delta: Vec<u8>,
}

/// A log record as the aggregate follower sees it.
#[derive(Debug, Clone)]
pub struct LogDelta {
    /// Log position.
    pub seq: i64,
    /// Encoded `pb::AggregateDelta`; `None` when the event counts nothing now (a repeated
    /// ORDER_COMPLETED, or a refund waiting in the outbox for its order).
    pub delta: Option<Vec<u8>>,
}

/// A merge or an erasure from ProfileService's changes feed (shared with the other
/// consumers of that feed).
pub use clientele_runtime::feed::IdentityChange as ProfileChange;

/// What applying a batch of profile changes did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErasureOutcome {
    /// Profile ids (erased ones and the ids merged into them) newly marked erased.
    pub erased_ids: u64,
    /// Stored events deleted.
    pub deleted_events: u64,
}

/// Storage of the event log and everything that makes ingestion exactly-once.
#[async_trait::async_trait]
pub trait EventStore: Send + Sync + std::fmt::Debug {
    /// Commits `events` (keys unique within the call) in one transaction and returns one
    /// outcome per event. With `stream`, also advances the producer to `stream.sequence` and
    /// stores the batch result, or fails with [`StoreError::Sequence`] writing nothing.
    async fn commit(
        &self,
        events: &[NewEvent],
        stream: Option<StreamMark<'_>>,
        now: i64,
    ) -> StoreResult<Vec<Outcome>>;
    /// [`EventStore::commit`] in its [`CommitTurn`]. Stores without a separate lookup phase
    /// (SQLite, one writer at a time) wait for their turn, commit, then pass it on.
    async fn commit_in_turn(
        &self,
        events: &[NewEvent],
        stream: Option<StreamMark<'_>>,
        now: i64,
        turn: CommitTurn,
    ) -> StoreResult<Vec<Outcome>> {
        if let Some(after) = turn.after {
            let _ = after.await;
        }
        let out = self.commit(events, stream, now).await;
        if let Some(locked) = turn.locked {
            let _ = locked.send(());
        }
        out
    }
    /// The `sqlx::Any` pool the shared reads below run on.
    fn database(&self) -> &Database;
    /// Which of `keys` ((source, event_id)) the log remembers, read outside any commit so that
    /// it can run beside the batch's identity resolution; `None` for stores whose commits look
    /// up keys inside their own transaction (SQLite, one writer at a time).
    async fn look_up_keys(&self, _keys: &[(&str, &str)]) -> StoreResult<Option<LookedUpKeys>> {
        Ok(None)
    }
    /// The producer's highest durable sequence (0 if none).
    async fn durable_sequence(&self, producer_id: &str) -> StoreResult<u64> {
        any_durable_sequence(self.database(), producer_id).await
    }
    /// Stored results of the producer's batches in `from..=through`, in order.
    async fn batch_results(
        &self,
        producer_id: &str,
        from: u64,
        through: u64,
    ) -> StoreResult<Vec<(u64, Vec<u8>)>> {
        any_batch_results(self.database(), producer_id, from, through).await
    }
    /// One page of a timeline.
    async fn list(&self, q: &EventQuery) -> StoreResult<Vec<StoredRow>> {
        any_list(self.database(), q).await
    }
    /// Up to `limit` log records after `after`, in log order.
    async fn log_after(&self, after: i64, limit: i64) -> StoreResult<Vec<StoredRow>> {
        any_log_after(self.database(), after, limit).await
    }
    /// The current end of the log (0 if empty).
    async fn log_end(&self) -> StoreResult<i64> {
        any_log_end(self.database()).await
    }
    /// Up to `limit` log records after `after` with their aggregate deltas, in log order.
    async fn log_deltas_after(&self, after: i64, limit: i64) -> StoreResult<Vec<LogDelta>> {
        any_log_deltas_after(self.database(), after, limit).await
    }
    /// Feed `feed`'s stored position and up to `limit` log records after it with their
    /// aggregate deltas, in log order, read together (the forwarder's page: one round trip on
    /// PostgreSQL).
    async fn log_deltas_after_cursor(
        &self,
        feed: &str,
        limit: i64,
    ) -> StoreResult<(i64, Vec<LogDelta>)> {
        let at = self.feed_position(feed).await?;
        Ok((at, self.log_deltas_after(at, limit).await?))
    }
    /// Moves feed `feed`'s stored position from `expected` to `position`; fails with
    /// [`StoreError::CursorMoved`], writing nothing, when it is no longer `expected`. The move
    /// may be lost in a crash (PostgreSQL commits it without waiting for the WAL flush), hence
    /// the name: only for a feed whose consumer ignores a redelivered page (the aggregates
    /// feed, by ProfileService's feed positions). A cursor that must survive a crash is moved
    /// in the transaction of its effect instead (as [`EventStore::apply_profile_changes`]).
    async fn advance_redeliverable_feed(
        &self,
        feed: &str,
        expected: i64,
        position: i64,
        now: i64,
    ) -> StoreResult<()> {
        any_advance_redeliverable_feed(self.database(), feed, expected, position, now).await
    }
    /// Parks a log delta that ProfileService refused as invalid (an outbox row with ready 2).
    async fn park(&self, key: &str, delta: &[u8], now: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO outbox (idempotency_key, delta, ready, order_id, created_at) VALUES ($1, $2, 2, NULL, $3)",
        )
        .bind(key)
        .bind(delta.to_vec())
        .bind(now)
        .execute(&self.database().pool)
        .await?;
        Ok(())
    }
    /// Up to `limit` deliverable outbox rows (refunds whose order arrived), oldest first.
    async fn outbox(&self, limit: i64) -> StoreResult<Vec<OutboxRow>> {
        any_outbox(self.database(), limit).await
    }
    /// Removes delivered outbox rows.
    async fn outbox_done(&self, ids: &[i64]) -> StoreResult<()> {
        any_outbox_done(self.database(), ids).await
    }
    /// Parks an outbox row that ProfileService refused as invalid.
    async fn outbox_dead(&self, id: i64) -> StoreResult<()> {
        any_outbox_dead(self.database(), id).await
    }
    /// Forgets the dedup keys of events ingested before `keys_before` (walking the log from
    /// the stored `dedup_keys` position up to the first younger event) and stream results
    /// created before `results_before`; returns keys forgotten plus results removed.
    async fn prune(&self, keys_before: i64, results_before: i64) -> StoreResult<u64> {
        any_prune(self.database(), keys_before, results_before).await
    }
    /// This log's identity as a feed of aggregate deltas (migration 0004: random, made once),
    /// sent as `ApplyAggregatesRequest.feed` with each delta's `seq` as its position.
    async fn log_identity(&self) -> StoreResult<String> {
        let row = sqlx::query("SELECT feed FROM log_identity")
            .fetch_one(&self.database().pool)
            .await?;
        Ok(row.try_get(0)?)
    }
    /// Makes the log hand out positions (`seq`) above `position` from now on; returns whether
    /// it had to move (the log's sequence was at or below it: restored to an older point).
    /// Taken under the log lock, so no append runs meanwhile.
    async fn ensure_positions_above(&self, position: i64) -> StoreResult<bool>;
    /// The stored position of feed `feed` (0 if never consumed).
    async fn feed_position(&self, feed: &str) -> StoreResult<i64> {
        let row = sqlx::query("SELECT position FROM feed_cursors WHERE feed = $1")
            .bind(feed)
            .fetch_optional(&self.database().pool)
            .await?;
        Ok(match row {
            Some(r) => r.try_get(0)?,
            None => 0,
        })
    }
    /// Applies `changes` (in feed order) and moves feed `feed` from `expected` to `position`,
    /// in one transaction: merges are remembered as aliases; an erasure deletes the stored
    /// events (and their dedup keys) of the profile and of every id merged into it, and marks
    /// those ids so that no later commit stores an event for them. Idempotent per change;
    /// fails with [`StoreError::CursorMoved`], writing nothing, when the stored position is
    /// no longer `expected`.
    async fn apply_profile_changes(
        &self,
        feed: &str,
        expected: i64,
        position: i64,
        changes: &[ProfileChange],
        now: i64,
    ) -> StoreResult<ErasureOutcome>;
}

/// The shared body of [`EventStore::apply_profile_changes`] inside transaction `tx`;
/// `log_lock` takes PostgreSQL's log advisory lock before deleting, so a commit that resolved
/// an erased profile just before the erasure either finishes first (and its events are
/// deleted here) or runs after (and sees the erased mark).
async fn apply_profile_changes_in(
    tx: &mut sqlx::AnyConnection,
    log_lock: bool,
    feed: &str,
    expected: i64,
    position: i64,
    changes: &[ProfileChange],
    now: i64,
) -> StoreResult<ErasureOutcome> {
    sqlx::query(
        "INSERT INTO feed_cursors (feed, position, updated_at) VALUES ($1, 0, $2) ON CONFLICT DO NOTHING",
    )
    .bind(feed)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    let moved = sqlx::query(
        "UPDATE feed_cursors SET position = $1, updated_at = $2 WHERE feed = $3 AND position = $4",
    )
    .bind(position)
    .bind(now)
    .bind(feed)
    .bind(expected)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if moved != 1 {
        return Err(StoreError::CursorMoved(feed.to_string()));
    }
    let mut out = ErasureOutcome::default();
    let mut locked = false;
    for change in changes {
        match change {
            ProfileChange::Merged { survivor, merged } => {
                for m in merged.iter().filter(|m| *m != survivor) {
                    sqlx::query(
                        "UPDATE profile_aliases SET survivor_id = $1 WHERE survivor_id = $2",
                    )
                    .bind(survivor)
                    .bind(m)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "INSERT INTO profile_aliases (alias_id, survivor_id) VALUES ($1, $2) \
                         ON CONFLICT (alias_id) DO UPDATE SET survivor_id = excluded.survivor_id",
                    )
                    .bind(m)
                    .bind(survivor)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            ProfileChange::Erased(profile_id) => {
                if log_lock && !locked {
                    sqlx::query("SELECT 1 FROM pg_advisory_xact_lock($1)")
                        .bind(LOG_LOCK)
                        .execute(&mut *tx)
                        .await?;
                    locked = true;
                }
                let mut ids = vec![profile_id.clone()];
                for r in sqlx::query("SELECT alias_id FROM profile_aliases WHERE survivor_id = $1")
                    .bind(profile_id)
                    .fetch_all(&mut *tx)
                    .await?
                {
                    ids.push(r.try_get(0)?);
                }
                for id in &ids {
                    // The dedup keys are in the rows deleted here.
                    out.deleted_events += sqlx::query("DELETE FROM events WHERE profile_id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    out.erased_ids += sqlx::query(
                        "INSERT INTO erased_profiles (profile_id, erased_at) VALUES ($1, $2) \
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                }
            }
        }
    }
    Ok(out)
}

/// An outbox row for a refund waiting for its order.
struct OutboxPlan {
    key: String,
    delta: Vec<u8>,
    order_id: String,
}

/// Where a stored event's aggregate delta goes.
enum Route {
    /// Counts nothing (a repeated ORDER_COMPLETED).
    Nothing,
    /// Into the event's log row, delivered by the log follower.
    Log(Vec<u8>),
    /// Into the outbox, until the refund's order is counted.
    Wait(OutboxPlan),
}

impl Route {
    fn log_delta(&self) -> Option<&[u8]> {
        match self {
            Route::Log(d) => Some(d.as_slice()),
            _ => None,
        }
    }
}

fn delta(e: &NewEvent, orders: i64) -> Option<pb::AggregateDelta> {
    let mut d = pb::AggregateDelta {
        idempotency_key: e.aggregate_key.clone(),
        profile_id: e.profile_id.clone(),
        occurred_at: Some(timestamp(e.occurred_at)),
        ..Default::default()
    };
    match &e.effect {
        Effect::Order {
            currency, amount, ..
        } => {
            d.orders = orders;
            d.gross = Some(pb::Money {
                amount_minor: *amount,
                currency: currency.clone(),
            });
        }
        Effect::Refund {
            currency, amount, ..
        } => {
            d.orders = orders;
            d.refunds = 1;
            d.refunded = Some(pb::Money {
                amount_minor: *amount,
                currency: currency.clone(),
            });
        }
        Effect::Engagement(name) => {
            d.engagement.insert((*name).to_string(), 1);
        }
    }
    Some(d)
}

/// Routes each stored event's delta. `won_orders`: order ids whose first ORDER_COMPLETED is
/// `key`; `first_full`: keys of refunds that are the first full refund of their order;
/// `known`: order ids with a counted order (after this commit).
fn plan(
    stored: &[&NewEvent],
    won_orders: &HashMap<String, String>,
    first_full: &HashSet<String>,
    known: &HashSet<String>,
) -> Vec<Route> {
    stored
        .iter()
        .map(|e| match &e.effect {
            Effect::Order { order_id, .. } => {
                if won_orders.get(order_id) != Some(&e.aggregate_key) {
                    // A second ORDER_COMPLETED for an order: stored, but it does not count.
                    return Route::Nothing;
                }
                delta(e, 1).map_or(Route::Nothing, |d| Route::Log(d.encode_to_vec()))
            }
            Effect::Refund { order_id, full, .. } => {
                let reverse = *full && first_full.contains(&e.aggregate_key);
                let Some(d) = delta(e, if reverse { -1 } else { 0 }) else {
                    return Route::Nothing;
                };
                if known.contains(order_id) {
                    Route::Log(d.encode_to_vec())
                } else {
                    Route::Wait(OutboxPlan {
                        key: e.aggregate_key.clone(),
                        delta: d.encode_to_vec(),
                        order_id: order_id.clone(),
                    })
                }
            }
            Effect::Engagement(_) => {
                delta(e, 0).map_or(Route::Nothing, |d| Route::Log(d.encode_to_vec()))
            }
        })
        .collect()
}

fn join_ints(v: &[i32]) -> String {
    v.iter().map(i32::to_string).collect::<Vec<_>>().join(",")
}

fn split_ints(s: &str) -> Vec<i32> {
    s.split(',').filter_map(|x| x.parse().ok()).collect()
}

/// One outcome per event from the remembered key found for it (`existing`, aligned with
/// `events`): none means the key is new.
fn outcomes_from(events: &[NewEvent], existing: &[Option<(Vec<u8>, String)>]) -> Vec<Outcome> {
    events
        .iter()
        .zip(existing)
        .map(|(e, found)| match found {
            None => Outcome::Accepted,
            Some((hash, pid)) if *hash == e.hash => Outcome::Duplicate(pid.clone()),
            Some((_, pid)) => Outcome::Conflict(pid.clone()),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Shared reads (sqlx::Any, same SQL on both engines)
// ---------------------------------------------------------------------------------------------

const ROW_COLUMNS: &str = "seq, profile_id, kind, occurred_at, ingested_at, body, redacted";

fn stored_row(r: &sqlx::any::AnyRow) -> StoreResult<StoredRow> {
    Ok(StoredRow {
        seq: r.try_get(0)?,
        profile_id: r.try_get(1)?,
        kind: i32::try_from(r.try_get::<i64, _>(2)?).unwrap_or(0),
        occurred_at: r.try_get(3)?,
        ingested_at: r.try_get(4)?,
        body: r.try_get(5)?,
        redacted: split_ints(&r.try_get::<String, _>(6)?),
    })
}

async fn any_durable_sequence(db: &Database, producer_id: &str) -> StoreResult<u64> {
    let row = sqlx::query("SELECT last_sequence FROM producers WHERE producer_id = $1")
        .bind(producer_id)
        .fetch_optional(&db.pool)
        .await?;
    Ok(match row {
        Some(r) => u64::try_from(r.try_get::<i64, _>(0)?).unwrap_or(0),
        None => 0,
    })
}

async fn any_batch_results(
    db: &Database,
    producer_id: &str,
    from: u64,
    through: u64,
) -> StoreResult<Vec<(u64, Vec<u8>)>> {
    let rows = sqlx::query(
        "SELECT sequence, result FROM stream_batches WHERE producer_id = $1 AND sequence >= $2 \
         AND sequence <= $3 ORDER BY sequence",
    )
    .bind(producer_id)
    .bind(i64::try_from(from).unwrap_or(i64::MAX))
    .bind(i64::try_from(through).unwrap_or(i64::MAX))
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                u64::try_from(r.try_get::<i64, _>(0)?).unwrap_or(0),
                r.try_get::<Vec<u8>, _>(1)?,
            ))
        })
        .collect()
}

async fn any_list(db: &Database, q: &EventQuery) -> StoreResult<Vec<StoredRow>> {
    if q.profile_ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut sql = format!("SELECT {ROW_COLUMNS} FROM events WHERE profile_id IN (");
    let mut n = 0;
    let mut next = |sql: &mut String| {
        n += 1;
        sql.push_str(&format!("${n}"));
    };
    for (i, _) in q.profile_ids.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        next(&mut sql);
    }
    sql.push(')');
    if !q.kinds.is_empty() {
        sql.push_str(" AND kind IN (");
        for (i, _) in q.kinds.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            next(&mut sql);
        }
        sql.push(')');
    }
    if !q.custom_names.is_empty() {
        sql.push_str(&format!(
            " AND (kind <> {} OR custom_name IN (",
            pb::EventKind::Custom as i32
        ));
        for (i, _) in q.custom_names.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            next(&mut sql);
        }
        sql.push_str("))");
    }
    if q.start.is_some() {
        sql.push_str(" AND occurred_at >= ");
        next(&mut sql);
    }
    if q.end.is_some() {
        sql.push_str(" AND occurred_at < ");
        next(&mut sql);
    }
    let (cmp, dir) = if q.oldest_first {
        (">", "ASC")
    } else {
        ("<", "DESC")
    };
    if q.after.is_some() {
        sql.push_str(&format!(" AND (occurred_at {cmp} "));
        next(&mut sql);
        sql.push_str(" OR (occurred_at = ");
        next(&mut sql);
        sql.push_str(&format!(" AND seq {cmp} "));
        next(&mut sql);
        sql.push_str("))");
    }
    sql.push_str(&format!(
        " ORDER BY occurred_at {dir}, seq {dir} LIMIT {}",
        q.limit.max(1)
    ));
    let mut query = sqlx::query(&sql);
    for p in &q.profile_ids {
        query = query.bind(p);
    }
    for k in &q.kinds {
        query = query.bind(i64::from(*k));
    }
    for c in &q.custom_names {
        query = query.bind(c);
    }
    if let Some(s) = q.start {
        query = query.bind(s);
    }
    if let Some(e) = q.end {
        query = query.bind(e);
    }
    if let Some((at, seq)) = q.after {
        query = query.bind(at).bind(at).bind(seq);
    }
    let rows = query.fetch_all(&db.pool).await?;
    rows.iter().map(stored_row).collect()
}

async fn any_log_after(db: &Database, after: i64, limit: i64) -> StoreResult<Vec<StoredRow>> {
    let rows = sqlx::query(&format!(
        "SELECT {ROW_COLUMNS} FROM events WHERE seq > $1 ORDER BY seq LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(&db.pool)
    .await?;
    rows.iter().map(stored_row).collect()
}

async fn any_log_end(db: &Database) -> StoreResult<i64> {
    let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) FROM events")
        .fetch_one(&db.pool)
        .await?;
    Ok(row.try_get::<i64, _>(0)?)
}

async fn any_outbox(db: &Database, limit: i64) -> StoreResult<Vec<OutboxRow>> {
    let rows = sqlx::query("SELECT id, delta FROM outbox WHERE ready = 1 ORDER BY id LIMIT $1")
        .bind(limit)
        .fetch_all(&db.pool)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(OutboxRow {
                id: r.try_get(0)?,
                delta: r.try_get(1)?,
            })
        })
        .collect()
}

async fn any_outbox_done(db: &Database, ids: &[i64]) -> StoreResult<()> {
    for chunk in ids.chunks(500) {
        let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "DELETE FROM outbox WHERE id IN ({})",
            placeholders.join(", ")
        );
        let mut q = sqlx::query(&sql);
        for id in chunk {
            q = q.bind(*id);
        }
        q.execute(&db.pool).await?;
    }
    Ok(())
}

async fn any_outbox_dead(db: &Database, id: i64) -> StoreResult<()> {
    sqlx::query("UPDATE outbox SET ready = 2 WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// Feed name (in `feed_cursors`) of the log follower delivering aggregate deltas.
pub const AGGREGATES_FEED: &str = "aggregates";
/// Feed name (in `feed_cursors`) of how far the pruning has forgotten dedup keys.
const DEDUP_KEYS_FEED: &str = "dedup_keys";

async fn any_log_deltas_after(db: &Database, after: i64, limit: i64) -> StoreResult<Vec<LogDelta>> {
    let rows = sqlx::query("SELECT seq, delta FROM events WHERE seq > $1 ORDER BY seq LIMIT $2")
        .bind(after)
        .bind(limit)
        .fetch_all(&db.pool)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(LogDelta {
                seq: r.try_get(0)?,
                delta: r.try_get(1)?,
            })
        })
        .collect()
}

async fn any_advance_redeliverable_feed(
    db: &Database,
    feed: &str,
    expected: i64,
    position: i64,
    now: i64,
) -> StoreResult<()> {
    if expected == 0 {
        sqlx::query(
            "INSERT INTO feed_cursors (feed, position, updated_at) VALUES ($1, 0, $2) ON CONFLICT DO NOTHING",
        )
        .bind(feed)
        .bind(now)
        .execute(&db.pool)
        .await?;
    }
    // On PostgreSQL the move commits without waiting for the WAL flush: one statement, its
    // own transaction, and the `set_config` (local to that transaction, evaluated once as an
    // init plan) is in force when it commits. A move lost in a crash only resends a page.
    let unflushed = match db.backend {
        Backend::Postgres => " AND (SELECT set_config('synchronous_commit', 'off', true)) = 'off'",
        Backend::Sqlite => "",
    };
    let moved = sqlx::query(&format!(
        "UPDATE feed_cursors SET position = $1, updated_at = $2 WHERE feed = $3 AND position = $4{unflushed}"
    ))
    .bind(position)
    .bind(now)
    .bind(feed)
    .bind(expected)
    .execute(&db.pool)
    .await?
    .rows_affected();
    if moved != 1 {
        return Err(StoreError::CursorMoved(feed.to_string()));
    }
    Ok(())
}

async fn any_prune(db: &Database, keys_before: i64, results_before: i64) -> StoreResult<u64> {
    // The log is in commit order and `ingested_at` follows it (to within the time a commit
    // waits for the log lock), so the keys to forget are those from the stored position up to
    // the first event ingested at or after `keys_before`: found by walking the primary key,
    // without an index on `ingested_at`. An event a little older than a younger one before it
    // keeps its key until the next pass: a key is never forgotten early.
    let from: i64 = sqlx::query("SELECT position FROM feed_cursors WHERE feed = $1")
        .bind(DEDUP_KEYS_FEED)
        .fetch_optional(&db.pool)
        .await?
        .map(|r| r.try_get(0))
        .transpose()?
        .unwrap_or(0);
    let younger: Option<i64> = sqlx::query(
        "SELECT seq FROM events WHERE seq > $1 AND ingested_at >= $2 ORDER BY seq LIMIT 1",
    )
    .bind(from)
    .bind(keys_before)
    .fetch_optional(&db.pool)
    .await?
    .map(|r| r.try_get(0))
    .transpose()?;
    let through = match younger {
        Some(seq) => seq - 1,
        None => any_log_end(db).await?,
    };
    let mut forgotten = 0;
    let mut at = from;
    while at < through {
        let to = through.min(at.saturating_add(20_000));
        forgotten += sqlx::query(
            "UPDATE events SET payload_hash = NULL WHERE seq > $1 AND seq <= $2 AND payload_hash IS NOT NULL",
        )
        .bind(at)
        .bind(to)
        .execute(&db.pool)
        .await?
        .rows_affected();
        sqlx::query(
            "INSERT INTO feed_cursors (feed, position, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (feed) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at",
        )
        .bind(DEDUP_KEYS_FEED)
        .bind(to)
        .bind(keys_before)
        .execute(&db.pool)
        .await?;
        at = to;
    }
    let results = sqlx::query("DELETE FROM stream_batches WHERE created_at < $1")
        .bind(results_before)
        .execute(&db.pool)
        .await?
        .rows_affected();
    Ok(forgotten + results)
}

/// Producer upsert that only advances from `sequence - 1`; SQL shared by both engines.
const ADVANCE_PRODUCER: &str = "INSERT INTO producers (producer_id, last_sequence, updated_at) VALUES ($1, $2, $3) \
     ON CONFLICT (producer_id) DO UPDATE SET last_sequence = excluded.last_sequence, \
     updated_at = excluded.updated_at WHERE producers.last_sequence = excluded.last_sequence - 1";

fn seq_i64(s: u64) -> i64 {
    i64::try_from(s).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

/// Advisory lock serialising the log-append tail of commits, so that `events.seq` order is
/// commit order and a WatchEvents cursor never skips a row committed late.
const LOG_LOCK: i64 = 0x1_6e6e_6573_7400;

/// The PostgreSQL store: bulk array writes over a native pool, shared reads over `sqlx::Any`.
#[derive(Debug, Clone)]
pub struct PgEventStore {
    db: Database,
    pg: PgPool,
}

impl PgEventStore {
    /// A store over `db` (already migrated, schema `schema`), opening a native pool to `url`
    /// whose connections use the same schema.
    pub async fn connect(
        db: Database,
        url: &str,
        schema: &str,
        max_connections: u32,
    ) -> StoreResult<Self> {
        let opts = PgConnectOptions::from_str(url)?.options([("search_path", schema)]);
        let pg = clientele_runtime::db::pg_pool_options::<sqlx::Postgres>(max_connections)
            .connect_with(opts)
            .await?;
        Ok(Self { db, pg })
    }
}

#[async_trait::async_trait]
impl EventStore for PgEventStore {
    async fn commit(
        &self,
        events: &[NewEvent],
        stream: Option<StreamMark<'_>>,
        now: i64,
    ) -> StoreResult<Vec<Outcome>> {
        self.commit_in_turn(events, stream, now, CommitTurn::default())
            .await
    }

    async fn commit_in_turn(
        &self,
        events: &[NewEvent],
        stream: Option<StreamMark<'_>>,
        now: i64,
        turn: CommitTurn,
    ) -> StoreResult<Vec<Outcome>> {
        let started = std::time::Instant::now();
        let mut lap = started;
        let mut laps = [0.0f64; 4];
        let mut mark_lap = |i: usize| {
            let t = std::time::Instant::now();
            laps[i] = (t - lap).as_secs_f64() * 1e3;
            lap = t;
        };
        // Before the lock: which keys the log already remembers ([`EventStore::look_up_keys`],
        // usually run beside the batch's BatchResolve and handed in with the turn). A key stored
        // by another commit after that lookup is caught by the append, which looks it up again
        // under the lock.
        let looked_up = match turn.looked_up {
            Some(l) => l,
            None => {
                let keys: Vec<(&str, &str)> = events
                    .iter()
                    .map(|e| (e.source.as_str(), e.event_id.as_str()))
                    .collect();
                self.look_up_keys(&keys).await?.unwrap_or_default()
            }
        };
        let mut existing: Vec<Option<(Vec<u8>, String)>> = vec![None; events.len()];
        let mut found: Vec<i64> = Vec::with_capacity(looked_up.0.len());
        if !looked_up.0.is_empty() {
            let position: HashMap<(&str, &str), usize> = events
                .iter()
                .enumerate()
                .map(|(i, e)| ((e.source.as_str(), e.event_id.as_str()), i + 1))
                .collect();
            for (source, event_id, hash, profile) in looked_up.0 {
                if let Some(&n) = position.get(&(source.as_str(), event_id.as_str())) {
                    let n = i64::try_from(n).unwrap_or(i64::MAX);
                    record_existing(&mut existing, n, hash, profile)?;
                    found.push(n);
                }
            }
        }
        let mut tx = self.pg.begin().await?;
        let col = |f: fn(&NewEvent) -> &str| events.iter().map(f).collect::<Vec<_>>();
        mark_lap(0);
        if let Some(after) = turn.after {
            let _ = after.await;
        }
        // The log lock, held to COMMIT: commits append one at a time, so `seq` order is
        // commit order (the WatchEvents cursors and the aggregate follower rely on it), and the
        // erased profiles it reads cannot change before its append (the erasure takes the same
        // lock).
        sqlx::query("SELECT 1 FROM pg_advisory_xact_lock($1)")
            .bind(LOG_LOCK)
            .execute(&mut *tx)
            .await?;
        if let Some(locked) = turn.locked {
            let _ = locked.send(());
        }
        mark_lap(1);
        if !events.is_empty() {
            // One call (`ingest_append_looked_up`): the erased profiles, orders and refunds,
            // the log rows with their deltas, waiting refunds. It decides which candidate delta
            // each event carries from the orders and refunds already counted.
            let hashes: Vec<&[u8]> = events.iter().map(|e| e.hash.as_slice()).collect();
            let kinds: Vec<i64> = events.iter().map(|e| i64::from(e.kind)).collect();
            let names: Vec<Option<&str>> =
                events.iter().map(|e| e.custom_name.as_deref()).collect();
            let at: Vec<i64> = events.iter().map(|e| e.occurred_at).collect();
            let bodies: Vec<&[u8]> = events.iter().map(|e| e.body.as_slice()).collect();
            let redacted: Vec<String> = events.iter().map(|e| join_ints(&e.redacted)).collect();
            let mut orders: Vec<Option<&str>> = Vec::with_capacity(events.len());
            let mut effects: Vec<i64> = Vec::with_capacity(events.len());
            let mut counted: Vec<Option<Vec<u8>>> = Vec::with_capacity(events.len());
            let mut plain: Vec<Option<Vec<u8>>> = Vec::with_capacity(events.len());
            for e in events {
                let (order, effect, full_count, plain_count) = match &e.effect {
                    Effect::Engagement(_) => (None, 0, 0, None),
                    Effect::Order { order_id, .. } => (Some(order_id.as_str()), 1, 1, None),
                    Effect::Refund { order_id, full, .. } => (
                        Some(order_id.as_str()),
                        if *full { 3 } else { 2 },
                        -1,
                        Some(0),
                    ),
                };
                orders.push(order);
                effects.push(effect);
                counted.push(delta(e, full_count).map(|d| d.encode_to_vec()));
                plain.push(
                    plain_count
                        .and_then(|n| delta(e, n))
                        .map(|d| d.encode_to_vec()),
                );
            }
            let rows = sqlx::query(
                "SELECT o_n, o_hash, o_profile FROM ingest_append_looked_up($1, $2, $3, $4, $5, \
                 $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
            )
            .bind(LOG_LOCK)
            .bind(now)
            .bind(col(|e| &e.source))
            .bind(col(|e| &e.event_id))
            .bind(&hashes)
            .bind(col(|e| &e.profile_id))
            .bind(&kinds)
            .bind(&names)
            .bind(&at)
            .bind(&bodies)
            .bind(&redacted)
            .bind(col(|e| &e.aggregate_key))
            .bind(&orders)
            .bind(&effects)
            .bind(&counted)
            .bind(&plain)
            .bind(&found)
            .fetch_all(&mut *tx)
            .await?;
            for r in rows {
                let n: i64 = r.try_get(0)?;
                if n == 0 {
                    // An erased profile: its accepted events were not stored (reported
                    // accepted, as when the erasure lands just after the commit).
                    continue;
                }
                // A key stored by another commit after the lookup above.
                record_existing(&mut existing, n, r.try_get(1)?, r.try_get(2)?)?;
            }
        }
        mark_lap(2);
        let outcomes = outcomes_from(events, &existing);
        if let Some(mark) = stream {
            let advanced = sqlx::query(
                "WITH advanced AS (INSERT INTO producers (producer_id, last_sequence, updated_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (producer_id) DO UPDATE SET last_sequence = excluded.last_sequence, \
                 updated_at = excluded.updated_at WHERE producers.last_sequence = excluded.last_sequence - 1 \
                 RETURNING producer_id) \
                 INSERT INTO stream_batches (producer_id, sequence, result, created_at) \
                 SELECT producer_id, $2, $4, $3 FROM advanced",
            )
            .bind(mark.producer_id)
            .bind(seq_i64(mark.sequence))
            .bind(now)
            .bind((mark.result)(&outcomes))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if advanced == 0 {
                return Err(StoreError::Sequence {
                    producer_id: mark.producer_id.to_string(),
                    expected: mark.sequence.saturating_sub(1),
                });
            }
        }
        mark_lap(3);
        tx.commit().await?;
        let commit_ms = lap.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(
            events = events.len(),
            lookup_ms = laps[0],
            turn_and_lock_ms = laps[1],
            append_ms = laps[2],
            mark_ms = laps[3],
            commit_ms,
            "commit phases"
        );
        Ok(outcomes)
    }

    fn database(&self) -> &Database {
        &self.db
    }

    async fn look_up_keys(&self, keys: &[(&str, &str)]) -> StoreResult<Option<LookedUpKeys>> {
        let mut known = Vec::new();
        if keys.is_empty() {
            return Ok(Some(LookedUpKeys(known)));
        }
        let sources: Vec<&str> = keys.iter().map(|k| k.0).collect();
        let ids: Vec<&str> = keys.iter().map(|k| k.1).collect();
        let rows: Vec<(i64, Vec<u8>, String)> =
            sqlx::query_as("SELECT o_n, o_hash, o_profile FROM ingest_lookup($1, $2)")
                .bind(&sources)
                .bind(&ids)
                .fetch_all(&self.pg)
                .await?;
        for (n, hash, profile) in rows {
            let (source, id) = usize::try_from(n - 1)
                .ok()
                .and_then(|i| keys.get(i))
                .ok_or_else(|| StoreError::Corrupt(format!("key lookup row {n}")))?;
            known.push((source.to_string(), id.to_string(), hash, profile));
        }
        Ok(Some(LookedUpKeys(known)))
    }

    async fn ensure_positions_above(&self, position: i64) -> StoreResult<bool> {
        let mut tx = self.pg.begin().await?;
        sqlx::query("SELECT 1 FROM pg_advisory_xact_lock($1)")
            .bind(LOG_LOCK)
            .execute(&mut *tx)
            .await?;
        // `setval(.., p)` makes the next value p + 1; only ever forwards.
        let moved: Option<i64> = sqlx::query_scalar(
            "SELECT setval(pg_get_serial_sequence('events', 'seq'), $1) \
             FROM pg_sequences WHERE schemaname = current_schema() \
             AND sequencename = 'events_seq_seq' AND COALESCE(last_value, 0) < $1",
        )
        .bind(position)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(moved.is_some())
    }

    async fn log_deltas_after_cursor(
        &self,
        feed: &str,
        limit: i64,
    ) -> StoreResult<(i64, Vec<LogDelta>)> {
        // One statement, one snapshot: the cursor, then the page after it (a row with a NULL
        // `seq` when the log has nothing after the cursor).
        let rows: Vec<(i64, Option<i64>, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT c.position, e.seq, e.delta \
             FROM (SELECT COALESCE((SELECT position FROM feed_cursors WHERE feed = $1), 0) AS position) c \
             LEFT JOIN LATERAL (SELECT seq, delta FROM events WHERE seq > c.position ORDER BY seq LIMIT $2) e ON true",
        )
        .bind(feed)
        .bind(limit)
        .fetch_all(&self.pg)
        .await?;
        let at = rows.first().map_or(0, |r| r.0);
        Ok((
            at,
            rows.into_iter()
                .filter_map(|(_, seq, delta)| seq.map(|seq| LogDelta { seq, delta }))
                .collect(),
        ))
    }

    async fn apply_profile_changes(
        &self,
        feed: &str,
        expected: i64,
        position: i64,
        changes: &[ProfileChange],
        now: i64,
    ) -> StoreResult<ErasureOutcome> {
        let mut tx = self.db.pool.begin().await?;
        let out =
            apply_profile_changes_in(&mut tx, true, feed, expected, position, changes, now).await?;
        tx.commit().await?;
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// SQLite
// ---------------------------------------------------------------------------------------------

/// Records the stored key found for the event at 1-based position `n`.
fn record_existing(
    existing: &mut [Option<(Vec<u8>, String)>],
    n: i64,
    hash: Vec<u8>,
    profile_id: String,
) -> StoreResult<()> {
    let slot = usize::try_from(n - 1)
        .ok()
        .and_then(|i| existing.get_mut(i))
        .ok_or_else(|| StoreError::Corrupt(format!("key lookup row {n}")))?;
    *slot = Some((hash, profile_id));
    Ok(())
}

/// The embedded SQLite store: one writer at a time ([`Database::begin_write`]), one
/// transaction per batch.
#[derive(Debug, Clone)]
pub struct SqliteEventStore {
    db: Database,
}

impl SqliteEventStore {
    /// A store over an opened, migrated SQLite database.
    pub fn new(db: Database) -> Self {
        Self { db }
    }
}

#[async_trait::async_trait]
impl EventStore for SqliteEventStore {
    async fn commit(
        &self,
        events: &[NewEvent],
        stream: Option<StreamMark<'_>>,
        now: i64,
    ) -> StoreResult<Vec<Outcome>> {
        let mut write = self.db.begin_write().await?;
        let tx: &mut sqlx::AnyConnection = &mut write.tx;
        let mut existing: Vec<Option<(Vec<u8>, String)>> = Vec::with_capacity(events.len());
        let mut erased: HashSet<String> = HashSet::new();
        let mut checked: HashSet<&str> = HashSet::new();
        for e in events {
            let r = sqlx::query(
                "SELECT payload_hash, profile_id FROM events \
                 WHERE source = $1 AND event_id = $2 AND payload_hash IS NOT NULL",
            )
            .bind(&e.source)
            .bind(&e.event_id)
            .fetch_optional(&mut *tx)
            .await?;
            existing.push(match r {
                Some(r) => Some((r.try_get(0)?, r.try_get(1)?)),
                None => None,
            });
            if checked.insert(e.profile_id.as_str())
                && sqlx::query("SELECT 1 FROM erased_profiles WHERE profile_id = $1")
                    .bind(&e.profile_id)
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_some()
            {
                erased.insert(e.profile_id.clone());
            }
        }
        let outcomes = outcomes_from(events, &existing);
        let stored: Vec<&NewEvent> = events
            .iter()
            .zip(&outcomes)
            .filter(|(e, o)| **o == Outcome::Accepted && !erased.contains(&e.profile_id))
            .map(|(e, _)| e)
            .collect();
        let mut won: HashMap<String, String> = HashMap::new();
        let mut first_full = HashSet::new();
        for e in &stored {
            if let Effect::Order { order_id, .. } = &e.effect {
                let n = sqlx::query(
                    "INSERT INTO orders (order_id, event_key, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                )
                .bind(order_id)
                .bind(&e.aggregate_key)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n == 1 {
                    won.insert(order_id.clone(), e.aggregate_key.clone());
                }
            }
        }
        let mut known = HashSet::new();
        for e in &stored {
            if let Effect::Refund { order_id, full, .. } = &e.effect {
                if *full {
                    let n = sqlx::query(
                        "INSERT INTO full_refunds (order_id, event_key) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    )
                    .bind(order_id)
                    .bind(&e.aggregate_key)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if n == 1 {
                        first_full.insert(e.aggregate_key.clone());
                    }
                }
                let found = sqlx::query("SELECT 1 FROM orders WHERE order_id = $1")
                    .bind(order_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                if found.is_some() {
                    known.insert(order_id.clone());
                }
            }
        }
        let routes = plan(&stored, &won, &first_full, &known);
        for (e, route) in stored.iter().zip(&routes) {
            sqlx::query(
                "INSERT INTO events (source, event_id, payload_hash, profile_id, kind, custom_name, occurred_at, ingested_at, body, redacted, delta) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(&e.source)
            .bind(&e.event_id)
            .bind(e.hash.clone())
            .bind(&e.profile_id)
            .bind(i64::from(e.kind))
            .bind(e.custom_name.clone())
            .bind(e.occurred_at)
            .bind(now)
            .bind(e.body.clone())
            .bind(join_ints(&e.redacted))
            .bind(route.log_delta().map(<[u8]>::to_vec))
            .execute(&mut *tx)
            .await?;
            if let Route::Wait(w) = route {
                sqlx::query(
                    "INSERT INTO outbox (idempotency_key, delta, ready, order_id, created_at) VALUES ($1, $2, 0, $3, $4)",
                )
                .bind(&w.key)
                .bind(w.delta.clone())
                .bind(&w.order_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
        }
        for order_id in won.keys() {
            sqlx::query("UPDATE outbox SET ready = 1 WHERE ready = 0 AND order_id = $1")
                .bind(order_id)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(mark) = stream {
            let advanced = sqlx::query(ADVANCE_PRODUCER)
                .bind(mark.producer_id)
                .bind(seq_i64(mark.sequence))
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if advanced == 0 {
                return Err(StoreError::Sequence {
                    producer_id: mark.producer_id.to_string(),
                    expected: mark.sequence.saturating_sub(1),
                });
            }
            sqlx::query(
                "INSERT INTO stream_batches (producer_id, sequence, result, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(mark.producer_id)
            .bind(seq_i64(mark.sequence))
            .bind((mark.result)(&outcomes))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        write.tx.commit().await?;
        Ok(outcomes)
    }

    async fn ensure_positions_above(&self, position: i64) -> StoreResult<bool> {
        // AUTOINCREMENT hands out MAX(sqlite_sequence.seq, MAX(seq)) + 1.
        let mut write = self.db.begin_write().await?;
        let tx: &mut sqlx::AnyConnection = &mut write.tx;
        let current: i64 = sqlx::query_scalar(
            "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0), \
             COALESCE((SELECT MAX(seq) FROM events), 0))",
        )
        .fetch_one(&mut *tx)
        .await?;
        if current >= position {
            return Ok(false);
        }
        let updated = sqlx::query("UPDATE sqlite_sequence SET seq = $1 WHERE name = 'events'")
            .bind(position)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if updated == 0 {
            sqlx::query("INSERT INTO sqlite_sequence (name, seq) VALUES ('events', $1)")
                .bind(position)
                .execute(&mut *tx)
                .await?;
        }
        write.tx.commit().await?;
        Ok(true)
    }

    fn database(&self) -> &Database {
        &self.db
    }

    async fn apply_profile_changes(
        &self,
        feed: &str,
        expected: i64,
        position: i64,
        changes: &[ProfileChange],
        now: i64,
    ) -> StoreResult<ErasureOutcome> {
        let mut write = self.db.begin_write().await?;
        let out =
            apply_profile_changes_in(&mut write.tx, false, feed, expected, position, changes, now)
                .await?;
        write.tx.commit().await?;
        Ok(out)
    }
}
