//! Profile persistence behind one trait, [`ProfileStore`], with one SQL implementation that
//! runs on PostgreSQL and on SQLite through `sqlx::Any`.
//!
//! Concurrency: on PostgreSQL every write transaction first takes transaction-scoped advisory
//! locks on the identifier keys and profile ids it touches (sorted, so two writers never wait
//! on each other in a cycle), which is what makes concurrent `resolve` calls on the same
//! identifiers produce one profile. Changes-feed rows are inserted under one more advisory
//! lock held until commit, so sequence order is commit order and a feed reader never skips a
//! change. On SQLite a process-wide mutex serialises write transactions. A deadlock or
//! serialisation failure reported by PostgreSQL is retried.
//!
//! The batch calls have a PostgreSQL form: with a native pool
//! ([`SqlProfileStore::with_native_pool`]) `resolve_known` is one array lookup, `resolve_many`
//! one transaction of two calls (`prof_resolve_read`, then `prof_resolve_write` after the sets
//! are planned in memory), `apply_aggregates` one call of `prof_apply_aggregates` (migration
//! 0002) and `apply_feed_aggregates` one of `prof_apply_feed_aggregates` (migration 0003).
//! They take the same advisory locks in the same order as the generic path, so both can run
//! side by side; `prof_merge` mirrors `merge_profiles` and must change with it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use async_trait::async_trait;
use clientele_runtime::db::{Database, WriteTx};
use sqlx::any::AnyRow;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};
use sqlx::{AnyConnection, Row};

use crate::identifiers::{IdentifierHasher, IdentifierKey};
use crate::model::{
    AggregateDelta, ApplyOutcome, ChangeKind, ChangeRecord, ConsentRecord, EraseOutcome,
    IdentifierRecord, ProfileRecord, ResolveOutcome, SpendRecord, TraitRecord, TraitValue,
};
use crate::row_engagement::{self, RowCounters};
use crate::stitching::{self, KnownIdentifier};

/// Most traits one profile may hold.
pub const MAX_TRAITS_PER_PROFILE: i64 = 256;
/// Most hops followed through merged-profile aliases.
const MAX_ALIAS_HOPS: usize = 64;
/// Advisory lock key serialising changes-feed inserts (PostgreSQL).
const CHANGES_LOCK: i64 = 0x636c_6e74_6368_6773;
/// Parameters per statement when looking up many identifiers at once.
const LOOKUP_CHUNK: usize = 300;
/// Identifier sets per transaction in [`ProfileStore::create_new`].
const NEW_SET_CHUNK: usize = 100;

/// Store failures. `NotFound` and `Erased` carry the profile id the caller asked for.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No profile has this id.
    #[error("profile `{0}` not found")]
    NotFound(String),
    /// The profile was erased.
    #[error("profile `{0}` was erased")]
    Erased(String),
    /// A limit on stored data would be exceeded.
    #[error("{field}: {message}")]
    Limit {
        /// The request field responsible.
        field: &'static str,
        /// What limit.
        message: String,
    },
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// Stored data could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

impl StoreError {
    fn is_retryable(&self) -> bool {
        match self {
            StoreError::Db(sqlx::Error::Database(e)) => {
                matches!(e.code().as_deref(), Some("40P01" | "40001"))
            }
            _ => false,
        }
    }
}

/// Result type of the store.
pub type StoreResult<T> = Result<T, StoreError>;

/// Everything ProfileService persists. Implementations must make each call atomic: on error
/// nothing it would have written is visible.
#[async_trait]
pub trait ProfileStore: Send + Sync + std::fmt::Debug {
    /// Resolves one normalised identifier set (deduplicated, 1..=32 keys).
    async fn resolve(&self, keys: &[IdentifierKey], now: i64) -> StoreResult<ResolveOutcome>;
    /// Read-only fast path for batches: for each set, the profile when every identifier is
    /// already known and on one profile (a known identifier is never tombstoned); `None`
    /// otherwise.
    async fn resolve_known(&self, sets: &[Vec<IdentifierKey>]) -> StoreResult<Vec<Option<String>>>;
    /// Bulk path for batches of first-time customers: creates one profile per set whose
    /// identifiers are all unknown and not tombstoned, many sets per transaction. `None` for a
    /// set means it needs [`ProfileStore::resolve`] (an identifier is known, tombstoned, or
    /// shared with an earlier set of the batch). Same locks as `resolve`, so it is race-free
    /// against it.
    async fn create_new(
        &self,
        sets: &[Vec<IdentifierKey>],
        now: i64,
    ) -> StoreResult<Vec<Option<String>>>;
    /// Resolves many identifier sets in one transaction, in order, with the outcome each would
    /// get from [`ProfileStore::resolve`] called one after the other (a later set sees what an
    /// earlier one created, linked or merged). Reads and locks are taken for all sets at once
    /// and multi-row writes are used wherever the order of the sets does not matter; only the
    /// merges run one after the other. Same locks as `resolve`, so it is race-free against it.
    async fn resolve_many(
        &self,
        sets: &[Vec<IdentifierKey>],
        now: i64,
    ) -> StoreResult<Vec<ResolveOutcome>>;
    /// The profile `id` (or the survivor it merged into).
    async fn get(&self, id: &str) -> StoreResult<ProfileRecord>;
    /// Sets and removes traits.
    async fn update_traits(
        &self,
        id: &str,
        set: &[(String, TraitValue)],
        remove: &[String],
        now: i64,
    ) -> StoreResult<ProfileRecord>;
    /// Appends a consent decision.
    async fn record_consent(
        &self,
        id: &str,
        consent: &ConsentRecord,
        now: i64,
    ) -> StoreResult<ProfileRecord>;
    /// Consent decisions, newest first; `purpose` filters when given.
    async fn consent_history(
        &self,
        id: &str,
        purpose: Option<i64>,
    ) -> StoreResult<Vec<ConsentRecord>>;
    /// Applies aggregate deltas, each exactly once per key.
    async fn apply_aggregates(
        &self,
        deltas: &[AggregateDelta],
        now: i64,
    ) -> StoreResult<ApplyOutcome>;
    /// Applies the deltas of ordered feed `feed` (each with `position > 0`): a delta counts
    /// iff its position is above the feed's stored position, which the same transaction
    /// raises to the call's highest, so a redelivered or overlapping page counts only its new
    /// deltas without a key row per delta. Keys are not checked, except on the feed's first
    /// call (stored position 0), which also records and checks them (a page delivered by key
    /// before the sender switched to positions counts once). Concurrent calls for one feed
    /// are serialised on the feed's row, taken before any profile lock.
    async fn apply_feed_aggregates(
        &self,
        feed: &str,
        deltas: &[AggregateDelta],
        now: i64,
    ) -> StoreResult<ApplyOutcome>;
    /// Erases a person and tombstones their identifiers. Idempotent.
    async fn erase(&self, id: &str, reason: &str, now: i64) -> StoreResult<EraseOutcome>;
    /// Everything held about a person, as JSON.
    async fn export(&self, id: &str) -> StoreResult<serde_json::Value>;
    /// For each set: does any identifier belong to an erased person?
    async fn any_erased(&self, sets: &[Vec<IdentifierKey>]) -> StoreResult<Vec<bool>>;
    /// The stored position of feed `feed` (0 if never applied): the highest position
    /// [`ProfileStore::apply_feed_aggregates`] has counted or skipped.
    async fn feed_position(&self, feed: &str) -> StoreResult<i64>;
    /// Up to `limit` changes with sequence above `after`, in order.
    async fn changes_after(&self, after: i64, limit: i64) -> StoreResult<Vec<ChangeRecord>>;
    /// Of the next `limit` changes after `after` (in order), those whose kind is one of
    /// `kinds` (`ChangeKind` codes; empty: every kind), and the sequence of the last of the
    /// `limit` looked at (`None` when there is no change after `after`), so a filtered reader
    /// moves past the others without receiving them.
    async fn changes_of_kinds_after(
        &self,
        after: i64,
        limit: i64,
        kinds: &[i64],
    ) -> StoreResult<(Vec<ChangeRecord>, Option<i64>)>;
}

/// The SQL implementation of [`ProfileStore`] for PostgreSQL and SQLite.
#[derive(Debug, Clone)]
pub struct SqlProfileStore {
    db: Database,
    hasher: IdentifierHasher,
    cap: i64,
    /// A native pool to the same PostgreSQL schema, for the batch calls' server-side
    /// functions (migration 0002); `None` on SQLite or when not opened.
    native: Option<PgPool>,
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl SqlProfileStore {
    /// A store over `db`. `hasher` computes tombstone hashes; `max_profiles_per_identifier`
    /// is the over-merge cap.
    pub fn new(db: Database, hasher: IdentifierHasher, max_profiles_per_identifier: u32) -> Self {
        Self {
            db,
            hasher,
            cap: i64::from(max_profiles_per_identifier.max(1)),
            native: None,
        }
    }

    /// The same store with a native pool of at most `max_connections` connections to
    /// PostgreSQL schema `schema` at `url` (the one `db` was opened and migrated on): the
    /// batch calls (`resolve_known`, `resolve_many`, `apply_aggregates`) then run as one or two
    /// calls of migration 0002's functions with array parameters.
    ///
    /// # Errors
    /// An invalid URL or a server that cannot be reached.
    pub async fn with_native_pool(
        mut self,
        url: &str,
        schema: &str,
        max_connections: u32,
    ) -> StoreResult<Self> {
        use std::str::FromStr as _;
        let opts = PgConnectOptions::from_str(url)?.options([("search_path", schema)]);
        let pool = clientele_runtime::db::pg_pool_options::<sqlx::Postgres>(max_connections)
            .min_connections(0)
            .connect_with(opts)
            .await?;
        self.native = Some(pool);
        Ok(self)
    }

    /// Whether the database is PostgreSQL (some reads have a faster PostgreSQL form).
    fn pg(&self) -> bool {
        self.db.backend == clientele_runtime::db::Backend::Postgres
    }

    async fn begin_write(&self) -> StoreResult<WriteTx<'_>> {
        Ok(self.db.begin_write().await?)
    }

    async fn lock(
        &self,
        conn: &mut AnyConnection,
        keys: impl IntoIterator<Item = String>,
    ) -> StoreResult<()> {
        Ok(self.db.lock_keys(conn, keys).await?)
    }

    async fn record_change(
        &self,
        conn: &mut AnyConnection,
        profile_id: &str,
        kind: ChangeKind,
        merged: &[String],
        now: i64,
    ) -> StoreResult<()> {
        self.db.lock_id(conn, CHANGES_LOCK).await?;
        sqlx::query(
            "INSERT INTO changes (profile_id, kind, merged_ids, changed_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(profile_id)
        .bind(kind as i64)
        .bind(merged.join(","))
        .bind(now)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    async fn bump(&self, conn: &mut AnyConnection, id: &str, now: i64) -> StoreResult<i64> {
        let row = sqlx::query(
            "UPDATE profiles SET version = version + 1, updated_at = $1 WHERE id = $2 RETURNING version",
        )
        .bind(now)
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
        Ok(row.try_get(0)?)
    }

    async fn retry<T, F, Fut>(&self, mut f: F) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = StoreResult<T>>,
    {
        let mut attempt = 0;
        loop {
            match f().await {
                Err(e) if e.is_retryable() && attempt < 5 => {
                    attempt += 1;
                    tracing::debug!(attempt, error = %e, "retrying after lock conflict");
                }
                r => return r,
            }
        }
    }

    async fn resolve_once(&self, keys: &[IdentifierKey], now: i64) -> StoreResult<ResolveOutcome> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        self.lock(conn, keys.iter().map(IdentifierKey::lock_key))
            .await?;
        if self.tombstoned(conn, keys).await? {
            return Ok(ResolveOutcome {
                erased: true,
                ..ResolveOutcome::default()
            });
        }
        let found = lookup_identifiers(conn, self.pg(), keys).await?;
        // Follow aliases and lock the profiles involved until the picture is stable.
        let mut locked: BTreeSet<String> = BTreeSet::new();
        let known = loop {
            let mut known: Vec<Option<KnownIdentifier>> = Vec::with_capacity(keys.len());
            let mut wanted = BTreeSet::new();
            for key in keys {
                match found.get(key) {
                    Some((pid, links)) => match survivor(conn, pid).await? {
                        Some(s) if s.erased_at.is_none() => {
                            wanted.insert(s.id.clone());
                            known.push(Some(KnownIdentifier {
                                profile_id: s.id,
                                profile_created_at: s.created_at,
                                links: *links,
                            }));
                        }
                        _ => known.push(None),
                    },
                    None => known.push(None),
                }
            }
            let new: Vec<String> = wanted.difference(&locked).cloned().collect();
            if new.is_empty() {
                break known;
            }
            self.lock(conn, new.iter().map(|p| format!("p:{p}")))
                .await?;
            locked.extend(new);
        };
        let kinds: Vec<_> = keys.iter().map(|k| k.kind).collect();
        let plan = stitching::plan(&kinds, &known, self.cap);

        let mut out = ResolveOutcome {
            refused: plan.refused.clone(),
            ..ResolveOutcome::default()
        };
        let survivor_id = match &plan.survivor {
            Some(s) => s.clone(),
            None => {
                let id = uuid::Uuid::now_v7().to_string();
                sqlx::query(
                    "INSERT INTO profiles (id, created_at, updated_at, version) VALUES ($1, $2, $3, 0)",
                )
                .bind(&id)
                .bind(now)
                .bind(now)
                .execute(&mut *conn)
                .await?;
                out.created = true;
                id
            }
        };
        for (loser, via) in &plan.merge {
            merge_profiles(conn, self.pg(), loser, &survivor_id, &keys[*via], now).await?;
            out.merged.push(loser.clone());
        }
        for &i in &plan.bump_links {
            let k = &keys[i];
            sqlx::query(
                "UPDATE identifiers SET links = links + 1 WHERE id_type = $1 AND namespace = $2 AND stored_value = $3",
            )
            .bind(k.kind.code())
            .bind(&k.namespace)
            .bind(&k.stored_value)
            .execute(&mut *conn)
            .await?;
        }
        for &i in &plan.attach {
            let k = &keys[i];
            sqlx::query(
                "INSERT INTO identifiers (id_type, namespace, stored_value, profile_id, first_seen_at, links) \
                 VALUES ($1, $2, $3, $4, $5, 1) ON CONFLICT DO NOTHING",
            )
            .bind(k.kind.code())
            .bind(&k.namespace)
            .bind(&k.stored_value)
            .bind(&survivor_id)
            .bind(now)
            .execute(&mut *conn)
            .await?;
        }
        if out.created
            || !plan.attach.is_empty()
            || !plan.merge.is_empty()
            || !plan.bump_links.is_empty()
        {
            out.version = Some(self.bump(conn, &survivor_id, now).await?);
            let kind = if out.created {
                ChangeKind::Created
            } else if !out.merged.is_empty() {
                ChangeKind::Merged
            } else {
                ChangeKind::Updated
            };
            self.record_change(conn, &survivor_id, kind, &out.merged, now)
                .await?;
        }
        w.tx.commit().await?;
        out.profile_id = survivor_id;
        Ok(out)
    }

    /// One attempt of [`ProfileStore::resolve_many`]. The sets are planned one after the other
    /// against an in-memory picture (identifier owners and link counts, merge aliases,
    /// creation times) that starts from the locked database state and takes in each set's
    /// decisions, so the plans are those of sequential `resolve` calls ([`plan_many`]). The
    /// writes then go in an order that gives the same rows: new profiles, the merges in plan
    /// order (each moves everything its loser holds, so it composes), identifiers attached to
    /// the survivor they end on, link counts, version bumps and the changes-feed rows in set
    /// order. On PostgreSQL with the native pool the locked reads are one call of
    /// `prof_resolve_read` and the writes one call of `prof_resolve_write` (migration 0002).
    async fn resolve_many_once(
        &self,
        sets: &[Vec<IdentifierKey>],
        now: i64,
    ) -> StoreResult<Vec<ResolveOutcome>> {
        let all: Vec<IdentifierKey> = sets
            .iter()
            .flatten()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if let Some(pg) = &self.native {
            let mut tx = pg.begin().await?;
            let picture = self.read_picture_pg(&mut tx, &all).await?;
            let mut plan = plan_many(sets, picture, self.cap, now);
            let versions = write_many_pg(&mut tx, &plan, now).await?;
            tx.commit().await?;
            plan.set_versions(&versions);
            return Ok(plan.outcomes);
        }
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        let picture = self.read_picture(conn, &all).await?;
        let mut plan = plan_many(sets, picture, self.cap, now);
        let versions = self.write_many(conn, &plan, now).await?;
        w.tx.commit().await?;
        plan.set_versions(&versions);
        Ok(plan.outcomes)
    }

    /// The locked picture `resolve_many` plans against (generic statements): identifier
    /// locks, tombstones, stored owners, and every live survivor involved locked, re-reading
    /// until no merge slipped in between the read and the lock (the loop of `resolve`).
    async fn read_picture(
        &self,
        conn: &mut AnyConnection,
        all: &[IdentifierKey],
    ) -> StoreResult<Picture> {
        self.lock(conn, all.iter().map(IdentifierKey::lock_key))
            .await?;
        let erased = self.tombstoned_keys(conn, all).await?;
        let owner = lookup_identifiers(conn, self.pg(), all).await?;
        let mut locked: BTreeSet<String> = BTreeSet::new();
        let heads = loop {
            let ids: BTreeSet<&str> = owner.values().map(|(p, _)| p.as_str()).collect();
            let heads = survivor_heads(conn, &ids).await?;
            let live: BTreeSet<String> = heads
                .values()
                .filter(|h| h.erased_at.is_none())
                .map(|h| h.id.clone())
                .collect();
            let new: Vec<String> = live.difference(&locked).cloned().collect();
            if new.is_empty() {
                break heads;
            }
            self.lock(conn, new.iter().map(|p| format!("p:{p}")))
                .await?;
            locked.extend(new);
        };
        Ok(Picture {
            erased,
            owner,
            heads,
        })
    }

    /// [`SqlProfileStore::read_picture`] as one call of `prof_resolve_read` (same locks, same
    /// order: identifiers, then the live survivors until stable).
    async fn read_picture_pg(
        &self,
        conn: &mut PgConnection,
        all: &[IdentifierKey],
    ) -> StoreResult<Picture> {
        type Read = (
            Vec<i64>,
            Vec<i64>,
            Vec<String>,
            Vec<i64>,
            Vec<String>,
            Vec<String>,
            Vec<i64>,
            Vec<Option<i64>>,
        );
        let (tomb, k_ord, k_owner, k_links, h_req, h_head, h_created, h_erased): Read =
            sqlx::query_as("SELECT * FROM prof_resolve_read($1, $2, $3, $4, $5)")
                .bind(all.iter().map(IdentifierKey::lock_key).collect::<Vec<_>>())
                .bind(all.iter().map(|k| k.kind.code()).collect::<Vec<_>>())
                .bind(all.iter().map(|k| k.namespace.as_str()).collect::<Vec<_>>())
                .bind(
                    all.iter()
                        .map(|k| k.stored_value.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    all.iter()
                        .map(|k| self.hasher.tombstone_hash(k))
                        .collect::<Vec<_>>(),
                )
                .fetch_one(&mut *conn)
                .await?;
        let key = |ord: i64| {
            usize::try_from(ord - 1)
                .ok()
                .and_then(|i| all.get(i))
                .cloned()
                .ok_or_else(|| corrupt(format!("key ordinal {ord}")))
        };
        let erased = tomb.into_iter().map(key).collect::<StoreResult<_>>()?;
        let mut owner = HashMap::with_capacity(k_ord.len());
        for ((ord, pid), links) in k_ord.into_iter().zip(k_owner).zip(k_links) {
            owner.insert(key(ord)?, (pid, links));
        }
        let heads = h_req
            .into_iter()
            .zip(h_head)
            .zip(h_created.into_iter().zip(h_erased))
            .map(|((req, id), (created_at, erased_at))| {
                (
                    req,
                    Survivor {
                        id,
                        created_at,
                        erased_at,
                    },
                )
            })
            .collect();
        Ok(Picture {
            erased,
            owner,
            heads,
        })
    }

    /// The writes of a [`ManyPlan`] with generic multi-row statements; returns the new
    /// version of each stepped profile.
    async fn write_many(
        &self,
        conn: &mut AnyConnection,
        plan: &ManyPlan,
        now: i64,
    ) -> StoreResult<HashMap<String, i64>> {
        for chunk in plan.new_profiles.chunks(LOOKUP_CHUNK) {
            let rows = numbered_rows(chunk.len(), "(?, ?, ?, 0)");
            let sql = format!(
                "INSERT INTO profiles (id, created_at, updated_at, version) VALUES {}",
                rows.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id.as_str()).bind(now).bind(now);
            }
            q.execute(&mut *conn).await?;
        }
        for (loser, survivor, via) in &plan.merges {
            merge_profiles(conn, self.pg(), loser, survivor, via, now).await?;
        }
        // Attached before the link counts grow: a set may bridge through an identifier an
        // earlier set of this call attached.
        for chunk in plan.attaches.chunks(LOOKUP_CHUNK) {
            let rows = numbered_rows(chunk.len(), "(?, ?, ?, ?, ?, 1)");
            let sql = format!(
                "INSERT INTO identifiers (id_type, namespace, stored_value, profile_id, first_seen_at, links) \
                 VALUES {} ON CONFLICT DO NOTHING",
                rows.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for (k, end) in chunk {
                q = q
                    .bind(k.kind.code())
                    .bind(k.namespace.clone())
                    .bind(k.stored_value.clone())
                    .bind(end.as_str())
                    .bind(now);
            }
            q.execute(&mut *conn).await?;
        }
        for chunk in plan.bumps.chunks(LOOKUP_CHUNK) {
            let rows = numbered_rows(chunk.len(), "(CAST(? AS BIGINT), ?, ?, CAST(? AS BIGINT))");
            let sql = format!(
                "WITH v (t, n, s, c) AS (VALUES {}) UPDATE identifiers SET links = links + v.c \
                 FROM v WHERE identifiers.id_type = v.t AND identifiers.namespace = v.n \
                 AND identifiers.stored_value = v.s",
                rows.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for (k, c) in chunk {
                q = q
                    .bind(k.kind.code())
                    .bind(k.namespace.as_str())
                    .bind(k.stored_value.as_str())
                    .bind(*c);
            }
            q.execute(&mut *conn).await?;
        }
        let mut versions: HashMap<String, i64> = HashMap::new();
        for chunk in plan.steps.chunks(LOOKUP_CHUNK) {
            let rows = numbered_rows(chunk.len(), "(?, CAST(? AS BIGINT))");
            let sql = format!(
                "WITH v (id, c) AS (VALUES {}) UPDATE profiles SET version = version + v.c, \
                 updated_at = ${} FROM v WHERE profiles.id = v.id \
                 RETURNING profiles.id, profiles.version",
                rows.join(", "),
                chunk.len() * 2 + 1
            );
            let mut q = sqlx::query(&sql);
            for (id, c) in chunk {
                q = q.bind(id.as_str()).bind(*c);
            }
            q = q.bind(now);
            for r in q.fetch_all(&mut *conn).await? {
                versions.insert(r.try_get(0)?, r.try_get(1)?);
            }
        }
        if !plan.written.is_empty() {
            self.db.lock_id(conn, CHANGES_LOCK).await?;
            for chunk in plan.written.chunks(LOOKUP_CHUNK) {
                let rows = numbered_rows(chunk.len(), "(?, ?, ?, ?)");
                let sql = format!(
                    "INSERT INTO changes (profile_id, kind, merged_ids, changed_at) VALUES {}",
                    rows.join(", ")
                );
                let mut q = sqlx::query(&sql);
                for (n, kind) in chunk {
                    let o = &plan.outcomes[*n];
                    q = q
                        .bind(o.profile_id.as_str())
                        .bind(*kind as i64)
                        .bind(o.merged.join(","))
                        .bind(now);
                }
                q.execute(&mut *conn).await?;
            }
        }
        Ok(versions)
    }

    async fn create_new_chunk(
        &self,
        sets: &[Vec<IdentifierKey>],
        now: i64,
    ) -> StoreResult<Vec<Option<String>>> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        let all: Vec<IdentifierKey> = sets.iter().flatten().cloned().collect();
        self.lock(conn, all.iter().map(IdentifierKey::lock_key))
            .await?;
        let known = lookup_identifiers(conn, self.pg(), &all).await?;
        let erased = self.tombstoned_keys(conn, &all).await?;
        let mut claimed: std::collections::HashSet<&IdentifierKey> =
            std::collections::HashSet::new();
        let mut out: Vec<Option<String>> = Vec::with_capacity(sets.len());
        let mut fresh: Vec<(&Vec<IdentifierKey>, String)> = Vec::new();
        for set in sets {
            let new = !set.is_empty()
                && set
                    .iter()
                    .all(|k| !known.contains_key(k) && !claimed.contains(k) && !erased.contains(k));
            if new {
                claimed.extend(set.iter());
                let id = uuid::Uuid::now_v7().to_string();
                fresh.push((set, id.clone()));
                out.push(Some(id));
            } else {
                out.push(None);
            }
        }
        if fresh.is_empty() {
            return Ok(out);
        }
        let rows = numbered_rows(fresh.len(), "(?, ?, ?, 1)");
        let sql = format!(
            "INSERT INTO profiles (id, created_at, updated_at, version) VALUES {}",
            rows.join(", ")
        );
        let mut q = sqlx::query(&sql);
        for (_, id) in &fresh {
            q = q.bind(id.as_str()).bind(now).bind(now);
        }
        q.execute(&mut *conn).await?;
        let ids: Vec<(&IdentifierKey, &str)> = fresh
            .iter()
            .flat_map(|(set, id)| set.iter().map(move |k| (k, id.as_str())))
            .collect();
        for chunk in ids.chunks(LOOKUP_CHUNK) {
            let rows = numbered_rows(chunk.len(), "(?, ?, ?, ?, ?, 1)");
            let sql = format!(
                "INSERT INTO identifiers (id_type, namespace, stored_value, profile_id, first_seen_at, links) VALUES {}",
                rows.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for (k, id) in chunk {
                q = q
                    .bind(k.kind.code())
                    .bind(k.namespace.as_str())
                    .bind(k.stored_value.as_str())
                    .bind(*id)
                    .bind(now);
            }
            q.execute(&mut *conn).await?;
        }
        self.db.lock_id(conn, CHANGES_LOCK).await?;
        let rows = numbered_rows(
            fresh.len(),
            &format!("(?, {}, '', ?)", ChangeKind::Created as i64),
        );
        let sql = format!(
            "INSERT INTO changes (profile_id, kind, merged_ids, changed_at) VALUES {}",
            rows.join(", ")
        );
        let mut q = sqlx::query(&sql);
        for (_, id) in &fresh {
            q = q.bind(id.as_str()).bind(now);
        }
        q.execute(&mut *conn).await?;
        w.tx.commit().await?;
        Ok(out)
    }

    async fn tombstoned(
        &self,
        conn: &mut AnyConnection,
        keys: &[IdentifierKey],
    ) -> StoreResult<bool> {
        Ok(!self.tombstoned_keys(conn, keys).await?.is_empty())
    }

    /// The subset of `keys` that belong to erased people.
    async fn tombstoned_keys(
        &self,
        conn: &mut AnyConnection,
        keys: &[IdentifierKey],
    ) -> StoreResult<std::collections::HashSet<IdentifierKey>> {
        let mut out = std::collections::HashSet::new();
        for chunk in keys.chunks(LOOKUP_CHUNK) {
            let hashes: Vec<String> = chunk
                .iter()
                .map(|k| self.hasher.tombstone_hash(k))
                .collect();
            let mut sql =
                String::from("SELECT id_type, namespace, value_hash FROM tombstones WHERE ");
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push_str(" OR ");
                }
                let b = i * 3;
                sql.push_str(&format!(
                    "(id_type = ${} AND namespace = ${} AND value_hash = ${})",
                    b + 1,
                    b + 2,
                    b + 3
                ));
            }
            let mut q = sqlx::query(&sql);
            for (k, h) in chunk.iter().zip(&hashes) {
                q = q
                    .bind(k.kind.code())
                    .bind(k.namespace.as_str())
                    .bind(h.as_str());
            }
            let found: std::collections::HashSet<(i64, String, String)> = q
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                .collect::<Result<_, sqlx::Error>>()?;
            for (k, h) in chunk.iter().zip(hashes) {
                if found.contains(&(k.kind.code(), k.namespace.clone(), h)) {
                    out.insert(k.clone());
                }
            }
        }
        Ok(out)
    }

    /// Follows aliases to the live profile and locks it; errors when missing or erased.
    async fn lock_live(&self, conn: &mut AnyConnection, id: &str) -> StoreResult<String> {
        let mut current = id.to_string();
        for _ in 0..MAX_ALIAS_HOPS {
            let s = survivor(conn, &current)
                .await?
                .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
            if s.erased_at.is_some() {
                return Err(StoreError::Erased(id.to_string()));
            }
            self.lock(conn, [format!("p:{}", s.id)]).await?;
            // A merge may have committed while we waited for the lock.
            let again = survivor(conn, &s.id)
                .await?
                .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
            if again.id == s.id {
                if again.erased_at.is_some() {
                    return Err(StoreError::Erased(id.to_string()));
                }
                return Ok(s.id);
            }
            current = again.id;
        }
        Err(corrupt(format!("alias chain of {id} too long")))
    }

    async fn load(&self, conn: &mut AnyConnection, requested: &str) -> StoreResult<ProfileRecord> {
        let s = survivor(conn, requested)
            .await?
            .ok_or_else(|| StoreError::NotFound(requested.to_string()))?;
        if s.erased_at.is_some() {
            return Err(StoreError::Erased(requested.to_string()));
        }
        let id = s.id;
        let row = sqlx::query(&format!(
            "SELECT created_at, updated_at, version, first_order_at, last_order_at, last_seen_at, \
             order_count, refund_count, {} FROM profiles WHERE id = $1",
            row_engagement::column_list()
        ))
        .bind(&id)
        .fetch_one(&mut *conn)
        .await?;
        let merged_ids = sqlx::query("SELECT id FROM profiles WHERE merged_into = $1 ORDER BY id")
            .bind(&id)
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<Result<Vec<_>, _>>()?;
        let identifiers = sqlx::query(
            "SELECT id_type, namespace, stored_value, first_seen_at FROM identifiers \
             WHERE profile_id = $1 ORDER BY id_type, namespace, stored_value",
        )
        .bind(&id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| {
            Ok(IdentifierRecord {
                id_type: r.try_get(0)?,
                namespace: r.try_get(1)?,
                stored_value: r.try_get(2)?,
                first_seen_at: r.try_get(3)?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let mut traits = BTreeMap::new();
        for r in sqlx::query("SELECT name, value, updated_at FROM traits WHERE profile_id = $1")
            .bind(&id)
            .fetch_all(&mut *conn)
            .await?
        {
            let name: String = r.try_get(0)?;
            let raw: String = r.try_get(1)?;
            let value: TraitValue = serde_json::from_str(&raw).map_err(corrupt)?;
            traits.insert(
                name,
                TraitRecord {
                    value,
                    updated_at: r.try_get(2)?,
                },
            );
        }
        let history = consent_rows(conn, &id, None).await?;
        let mut consents: Vec<ConsentRecord> = Vec::new();
        for c in history {
            if !consents.iter().any(|x| x.purpose == c.purpose) {
                consents.push(c);
            }
        }
        consents.sort_by_key(|c| c.purpose);
        let spend = sqlx::query(
            "SELECT currency, gross_minor, refunded_minor FROM spend WHERE profile_id = $1 ORDER BY currency",
        )
        .bind(&id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| {
            Ok(SpendRecord {
                currency: r.try_get(0)?,
                gross_minor: r.try_get(1)?,
                refunded_minor: r.try_get(2)?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let mut engagement =
            sqlx::query("SELECT kind, count FROM engagement WHERE profile_id = $1")
                .bind(&id)
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<BTreeMap<String, i64>, sqlx::Error>>()?;
        // The row counters follow the eight columns read above, in ROW_ENGAGEMENT order.
        for (i, (kind, _)) in row_engagement::ROW_ENGAGEMENT.iter().enumerate() {
            let n: i64 = row.try_get(8 + i)?;
            if n != 0 {
                *engagement.entry((*kind).to_string()).or_default() += n;
            }
        }
        Ok(ProfileRecord {
            id,
            merged_ids,
            identifiers,
            traits,
            consents,
            created_at: row.try_get(0)?,
            updated_at: row.try_get(1)?,
            version: row.try_get(2)?,
            first_order_at: row.try_get(3)?,
            last_order_at: row.try_get(4)?,
            last_seen_at: row.try_get(5)?,
            order_count: row.try_get(6)?,
            refund_count: row.try_get(7)?,
            spend,
            engagement,
        })
    }
}

struct Survivor {
    id: String,
    created_at: i64,
    erased_at: Option<i64>,
}

async fn survivor(conn: &mut AnyConnection, id: &str) -> StoreResult<Option<Survivor>> {
    let mut current = id.to_string();
    for _ in 0..MAX_ALIAS_HOPS {
        let Some(row) =
            sqlx::query("SELECT merged_into, created_at, erased_at FROM profiles WHERE id = $1")
                .bind(&current)
                .fetch_optional(&mut *conn)
                .await?
        else {
            return Ok(None);
        };
        let merged_into: Option<String> = row.try_get(0)?;
        match merged_into {
            Some(next) => current = next,
            None => {
                return Ok(Some(Survivor {
                    id: current,
                    created_at: row.try_get(1)?,
                    erased_at: row.try_get(2)?,
                }));
            }
        }
    }
    Err(corrupt(format!("alias chain of {id} too long")))
}

/// The locked state `resolve_many` plans against.
struct Picture {
    /// Keys that belong to erased people.
    erased: std::collections::HashSet<IdentifierKey>,
    /// Identifier -> (owner as stored, links); owners are followed through `heads`.
    owner: HashMap<IdentifierKey, (String, i64)>,
    /// Stored owner id -> its survivor (erased survivors included).
    heads: HashMap<String, Survivor>,
}

/// What one `resolve_many` call writes, and its outcomes (versions filled in after the
/// writes by [`ManyPlan::set_versions`]).
struct ManyPlan {
    outcomes: Vec<ResolveOutcome>,
    new_profiles: Vec<String>,
    /// (loser, survivor, via) in plan order.
    merges: Vec<(String, String, IdentifierKey)>,
    /// Identifiers to attach, each to the profile it ends on after this call's merges.
    attaches: Vec<(IdentifierKey, String)>,
    /// Link-count increments.
    bumps: Vec<(IdentifierKey, i64)>,
    /// Version steps per profile: one per set that wrote, as many calls would have made.
    steps: Vec<(String, i64)>,
    /// Sets that wrote (index into `outcomes`) and their change kind, in set order.
    written: Vec<(usize, ChangeKind)>,
}

impl ManyPlan {
    fn set_versions(&mut self, versions: &HashMap<String, i64>) {
        for (n, _) in &self.written {
            let o = &mut self.outcomes[*n];
            o.version = versions.get(&o.profile_id).copied();
        }
    }
}

/// Plans the sets one after the other against `picture`, taking in each set's decisions, so
/// the plans are those of sequential `resolve` calls.
fn plan_many(sets: &[Vec<IdentifierKey>], picture: Picture, cap: i64, now: i64) -> ManyPlan {
    let Picture {
        erased,
        mut owner,
        heads,
    } = picture;
    // Profile id -> where it points now (merge aliases of this call included).
    let mut alias: HashMap<String, String> = HashMap::new();
    // Live profile id -> creation time; erased survivors are absent (their identifiers
    // count as unknown, as in `resolve`).
    let mut created_at: HashMap<String, i64> = HashMap::new();
    for (id, h) in &heads {
        if h.id != *id {
            alias.insert(id.clone(), h.id.clone());
        }
        if h.erased_at.is_none() {
            created_at.insert(h.id.clone(), h.created_at);
        }
    }
    let head = |alias: &HashMap<String, String>, id: &str| -> String {
        let mut cur = id.to_string();
        while let Some(next) = alias.get(&cur) {
            cur = next.clone();
        }
        cur
    };

    let mut outcomes: Vec<ResolveOutcome> = Vec::with_capacity(sets.len());
    let mut new_profiles: Vec<String> = Vec::new();
    let mut merges: Vec<(String, String, IdentifierKey)> = Vec::new();
    let mut bumps: BTreeMap<IdentifierKey, i64> = BTreeMap::new();
    let mut attaches: Vec<(IdentifierKey, String)> = Vec::new();
    let mut written: Vec<(usize, ChangeKind)> = Vec::new();
    for (n, keys) in sets.iter().enumerate() {
        if keys.iter().any(|k| erased.contains(k)) {
            outcomes.push(ResolveOutcome {
                erased: true,
                ..ResolveOutcome::default()
            });
            continue;
        }
        let known: Vec<Option<KnownIdentifier>> = keys
            .iter()
            .map(|k| {
                let (pid, links) = owner.get(k)?;
                let s = head(&alias, pid);
                let at = *created_at.get(&s)?;
                Some(KnownIdentifier {
                    profile_id: s,
                    profile_created_at: at,
                    links: *links,
                })
            })
            .collect();
        let kinds: Vec<_> = keys.iter().map(|k| k.kind).collect();
        let plan = stitching::plan(&kinds, &known, cap);
        let mut out = ResolveOutcome {
            refused: plan.refused.clone(),
            ..ResolveOutcome::default()
        };
        let survivor_id = match &plan.survivor {
            Some(s) => s.clone(),
            None => {
                let id = uuid::Uuid::now_v7().to_string();
                created_at.insert(id.clone(), now);
                new_profiles.push(id.clone());
                out.created = true;
                id
            }
        };
        for (loser, via) in &plan.merge {
            merges.push((loser.clone(), survivor_id.clone(), keys[*via].clone()));
            alias.insert(loser.clone(), survivor_id.clone());
            created_at.remove(loser);
            out.merged.push(loser.clone());
        }
        for &i in &plan.bump_links {
            *bumps.entry(keys[i].clone()).or_default() += 1;
            if let Some(o) = owner.get_mut(&keys[i]) {
                o.1 += 1;
            }
        }
        for &i in &plan.attach {
            // A stored identifier of an erased person stays as it is (the insert does
            // nothing for it), as in `resolve`.
            if !owner.contains_key(&keys[i]) {
                owner.insert(keys[i].clone(), (survivor_id.clone(), 1));
                attaches.push((keys[i].clone(), survivor_id.clone()));
            }
        }
        if out.created
            || !plan.attach.is_empty()
            || !plan.merge.is_empty()
            || !plan.bump_links.is_empty()
        {
            let kind = if out.created {
                ChangeKind::Created
            } else if !out.merged.is_empty() {
                ChangeKind::Merged
            } else {
                ChangeKind::Updated
            };
            written.push((n, kind));
        }
        out.profile_id = survivor_id;
        outcomes.push(out);
    }
    // Attached where the profile ends up: a later merge of this call would have moved it.
    let attaches = attaches
        .into_iter()
        .map(|(k, pid)| {
            let end = head(&alias, &pid);
            (k, end)
        })
        .collect();
    let mut steps: BTreeMap<String, i64> = BTreeMap::new();
    for (n, _) in &written {
        *steps.entry(outcomes[*n].profile_id.clone()).or_default() += 1;
    }
    ManyPlan {
        outcomes,
        new_profiles,
        merges,
        attaches,
        bumps: bumps.into_iter().collect(),
        steps: steps.into_iter().collect(),
        written,
    }
}

/// The writes of a [`ManyPlan`] as one call of `prof_resolve_write` (PostgreSQL migration
/// 0002), in the order of [`SqlProfileStore::write_many`].
async fn write_many_pg(
    conn: &mut PgConnection,
    plan: &ManyPlan,
    now: i64,
) -> StoreResult<HashMap<String, i64>> {
    let m = &plan.merges;
    let a = &plan.attaches;
    let b = &plan.bumps;
    let changed: Vec<&ResolveOutcome> = plan
        .written
        .iter()
        .map(|(n, _)| &plan.outcomes[*n])
        .collect();
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT * FROM prof_resolve_write($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
         $13, $14, $15, $16, $17, $18, $19, $20, $21)",
    )
    .bind(CHANGES_LOCK)
    .bind(now)
    .bind(&plan.new_profiles)
    .bind(m.iter().map(|x| x.0.as_str()).collect::<Vec<_>>())
    .bind(m.iter().map(|x| x.1.as_str()).collect::<Vec<_>>())
    .bind(m.iter().map(|x| x.2.kind.code()).collect::<Vec<_>>())
    .bind(m.iter().map(|x| x.2.namespace.as_str()).collect::<Vec<_>>())
    .bind(
        m.iter()
            .map(|x| x.2.stored_value.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(a.iter().map(|x| x.0.kind.code()).collect::<Vec<_>>())
    .bind(a.iter().map(|x| x.0.namespace.as_str()).collect::<Vec<_>>())
    .bind(
        a.iter()
            .map(|x| x.0.stored_value.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(a.iter().map(|x| x.1.as_str()).collect::<Vec<_>>())
    .bind(b.iter().map(|x| x.0.kind.code()).collect::<Vec<_>>())
    .bind(b.iter().map(|x| x.0.namespace.as_str()).collect::<Vec<_>>())
    .bind(
        b.iter()
            .map(|x| x.0.stored_value.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(b.iter().map(|x| x.1).collect::<Vec<_>>())
    .bind(plan.steps.iter().map(|x| x.0.as_str()).collect::<Vec<_>>())
    .bind(plan.steps.iter().map(|x| x.1).collect::<Vec<_>>())
    .bind(
        changed
            .iter()
            .map(|o| o.profile_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        plan.written
            .iter()
            .map(|(_, k)| *k as i64)
            .collect::<Vec<_>>(),
    )
    .bind(
        changed
            .iter()
            .map(|o| o.merged.join(","))
            .collect::<Vec<_>>(),
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// `apply_aggregates` as one call of `prof_apply_aggregates` (PostgreSQL migration 0002): the
/// survivor locks, the dedup insert into `applied_deltas`, the folded profile, spend and
/// engagement writes and one changes-feed row per profile counted, in one implicit
/// transaction; `deltas` repeat no key. With `feed`, one call of `prof_apply_feed_aggregates`
/// (migration 0003): the feed row lock and the position filter in place of the key insert.
async fn apply_aggregates_pg(
    pg: &PgPool,
    feed: Option<&str>,
    deltas: &[&AggregateDelta],
    now: i64,
) -> StoreResult<(u32, u32, Vec<(String, i64)>)> {
    let mut eng_delta: Vec<i64> = Vec::new();
    let mut eng_kind: Vec<&str> = Vec::new();
    let mut eng_n: Vec<i64> = Vec::new();
    for (i, d) in deltas.iter().enumerate() {
        for (kind, n) in &d.engagement {
            eng_delta.push(i64::try_from(i + 1).unwrap_or(i64::MAX));
            eng_kind.push(kind.as_str());
            eng_n.push(*n);
        }
    }
    let sql = if feed.is_some() {
        "SELECT * FROM prof_apply_feed_aggregates($1, $2, $3, $16, $17, $4, $5, $6, $7, $8, \
         $9, $10, $11, $12, $13, $14, $15)"
    } else {
        "SELECT * FROM prof_apply_aggregates($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
         $12, $13, $14, $15)"
    };
    let mut q = sqlx::query_as(sql)
        .bind(CHANGES_LOCK)
        .bind(ChangeKind::Updated as i64)
        .bind(now)
        .bind(deltas.iter().map(|d| d.key.as_str()).collect::<Vec<_>>())
        .bind(
            deltas
                .iter()
                .map(|d| d.profile_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(deltas.iter().map(|d| d.occurred_at).collect::<Vec<_>>())
        .bind(deltas.iter().map(|d| d.orders).collect::<Vec<_>>())
        .bind(deltas.iter().map(|d| d.refunds).collect::<Vec<_>>())
        .bind(
            deltas
                .iter()
                .map(|d| d.gross.as_ref().map(|g| g.0.as_str()))
                .collect::<Vec<_>>(),
        )
        .bind(
            deltas
                .iter()
                .map(|d| d.gross.as_ref().map(|g| g.1))
                .collect::<Vec<_>>(),
        )
        .bind(
            deltas
                .iter()
                .map(|d| d.refunded.as_ref().map(|r| r.0.as_str()))
                .collect::<Vec<_>>(),
        )
        .bind(
            deltas
                .iter()
                .map(|d| d.refunded.as_ref().map(|r| r.1))
                .collect::<Vec<_>>(),
        )
        .bind(eng_delta)
        .bind(eng_kind)
        .bind(eng_n);
    if let Some(feed) = feed {
        q = q
            .bind(feed)
            .bind(deltas.iter().map(|d| d.position).collect::<Vec<_>>());
    }
    let (fresh, applied, ids, versions): (i64, i64, Vec<String>, Vec<i64>) =
        q.fetch_one(pg).await?;
    let count = |n: i64| u32::try_from(n).map_err(corrupt);
    Ok((
        count(fresh)?,
        count(applied)?,
        ids.into_iter().zip(versions).collect(),
    ))
}

/// The survivor (id, creation time, erasure) of each of `ids`, following merge aliases a hop
/// at a time for all ids at once; ids that do not exist are absent.
async fn survivor_heads(
    conn: &mut AnyConnection,
    ids: &BTreeSet<&str>,
) -> StoreResult<HashMap<String, Survivor>> {
    let requested: Vec<String> = ids.iter().map(|s| (*s).to_string()).collect();
    let mut current: Vec<Option<String>> = requested.iter().cloned().map(Some).collect();
    let mut done: HashMap<String, Survivor> = HashMap::new();
    for _ in 0..MAX_ALIAS_HOPS {
        let frontier: BTreeSet<&str> = current.iter().flatten().map(String::as_str).collect();
        if frontier.is_empty() {
            return Ok(done);
        }
        // id -> (merged_into, created_at, erased_at)
        let mut rows: HashMap<String, (Option<String>, i64, Option<i64>)> = HashMap::new();
        let frontier: Vec<&str> = frontier.into_iter().collect();
        for chunk in frontier.chunks(LOOKUP_CHUNK) {
            let params: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT id, merged_into, created_at, erased_at FROM profiles WHERE id IN ({})",
                params.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(*id);
            }
            for r in q.fetch_all(&mut *conn).await? {
                rows.insert(r.try_get(0)?, (r.try_get(1)?, r.try_get(2)?, r.try_get(3)?));
            }
        }
        for (i, cur) in current.iter_mut().enumerate() {
            let Some(id) = cur.take() else { continue };
            match rows.get(&id) {
                None => {}
                Some((None, created_at, erased_at)) => {
                    done.insert(
                        requested[i].clone(),
                        Survivor {
                            id,
                            created_at: *created_at,
                            erased_at: *erased_at,
                        },
                    );
                }
                Some((Some(next), _, _)) => *cur = Some(next.clone()),
            }
        }
    }
    if current.iter().any(Option::is_some) {
        return Err(corrupt("alias chain too long"));
    }
    Ok(done)
}

/// Rows per multi-row statement in `apply_aggregates`.
const APPLY_CHUNK: usize = 200;

/// One profile's share of an `apply_aggregates` call, folded in memory. Absent times are
/// `i64::MAX` / `i64::MIN`, which never win the comparisons in the UPDATE (it compares with
/// `i64::MAX` and `i64::MIN + 1` for a NULL column).
struct ProfileFold {
    orders: i64,
    refunds: i64,
    first_order: i64,
    last_order: i64,
    last_seen: i64,
    engagement: RowCounters,
}

impl Default for ProfileFold {
    fn default() -> Self {
        Self {
            orders: 0,
            refunds: 0,
            first_order: i64::MAX,
            last_order: i64::MIN,
            last_seen: i64::MIN,
            engagement: [0; row_engagement::ROW_ENGAGEMENT.len()],
        }
    }
}

impl ProfileFold {
    fn add(&mut self, d: &AggregateDelta) {
        self.orders += d.orders;
        self.refunds += d.refunds;
        if d.orders > 0 {
            self.first_order = self.first_order.min(d.occurred_at);
            self.last_order = self.last_order.max(d.occurred_at);
        }
        self.last_seen = self.last_seen.max(d.occurred_at);
    }
}

/// The live (unmerged, unerased) survivor of each of `ids`, `None` when missing or erased;
/// [`survivor_heads`] with erased heads and missing ids mapped to `None`.
async fn survivors(
    conn: &mut AnyConnection,
    ids: &BTreeSet<&str>,
) -> StoreResult<HashMap<String, Option<String>>> {
    let mut heads = survivor_heads(conn, ids).await?;
    Ok(ids
        .iter()
        .map(|id| {
            let live = heads
                .remove(*id)
                .filter(|h| h.erased_at.is_none())
                .map(|h| h.id);
            ((*id).to_string(), live)
        })
        .collect())
}

/// The stored owner and link count of each of `keys` that exists. On PostgreSQL the keys
/// travel as one JSON parameter joined against the primary key (a long OR chain costs more to
/// plan than to run); on SQLite as chunks of OR-ed conditions.
async fn lookup_identifiers(
    conn: &mut AnyConnection,
    pg: bool,
    keys: &[IdentifierKey],
) -> StoreResult<HashMap<IdentifierKey, (String, i64)>> {
    let mut out = HashMap::new();
    if pg {
        for chunk in keys.chunks(10_000) {
            let json = serde_json::Value::Array(
                chunk
                    .iter()
                    .map(|k| serde_json::json!({"t": k.kind.code(), "n": k.namespace, "v": k.stored_value}))
                    .collect(),
            )
            .to_string();
            let rows = sqlx::query(
                "SELECT i.id_type, i.namespace, i.stored_value, i.profile_id, i.links FROM identifiers i \
                 JOIN json_to_recordset(CAST($1 AS json)) AS k(t bigint, n text, v text) \
                 ON i.id_type = k.t AND i.namespace = k.n AND i.stored_value = k.v",
            )
            .bind(json)
            .fetch_all(&mut *conn)
            .await?;
            for r in rows {
                let code: i64 = r.try_get(0)?;
                let kind = crate::identifiers::IdKind::from_code(code)
                    .ok_or_else(|| corrupt(format!("identifier type {code}")))?;
                let key = IdentifierKey {
                    kind,
                    namespace: r.try_get(1)?,
                    stored_value: r.try_get(2)?,
                };
                out.insert(key, (r.try_get(3)?, r.try_get(4)?));
            }
        }
        return Ok(out);
    }
    for chunk in keys.chunks(LOOKUP_CHUNK) {
        let mut sql = String::from(
            "SELECT id_type, namespace, stored_value, profile_id, links FROM identifiers WHERE ",
        );
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(" OR ");
            }
            let b = i * 3;
            sql.push_str(&format!(
                "(id_type = ${} AND namespace = ${} AND stored_value = ${})",
                b + 1,
                b + 2,
                b + 3
            ));
        }
        let mut q = sqlx::query(&sql);
        for k in chunk {
            q = q
                .bind(k.kind.code())
                .bind(k.namespace.clone())
                .bind(k.stored_value.clone());
        }
        for r in q.fetch_all(&mut *conn).await? {
            let code: i64 = r.try_get(0)?;
            let kind = crate::identifiers::IdKind::from_code(code)
                .ok_or_else(|| corrupt(format!("identifier type {code}")))?;
            let key = IdentifierKey {
                kind,
                namespace: r.try_get(1)?,
                stored_value: r.try_get(2)?,
            };
            out.insert(key, (r.try_get(3)?, r.try_get(4)?));
        }
    }
    Ok(out)
}

/// [`lookup_identifiers`] over the native pool: the keys travel as three arrays.
async fn lookup_identifiers_pg(
    pg: &PgPool,
    keys: &[IdentifierKey],
) -> StoreResult<HashMap<IdentifierKey, (String, i64)>> {
    let rows: Vec<(i64, String, i64)> = sqlx::query_as(
        "SELECT u.ord, i.profile_id, i.links \
         FROM unnest($1::bigint[], $2::text[], $3::text[]) WITH ORDINALITY AS u(t, n, v, ord) \
         CROSS JOIN LATERAL (SELECT i.profile_id, i.links FROM identifiers i \
           WHERE i.id_type = u.t AND i.namespace = u.n AND i.stored_value = u.v OFFSET 0) i",
    )
    .bind(keys.iter().map(|k| k.kind.code()).collect::<Vec<_>>())
    .bind(
        keys.iter()
            .map(|k| k.namespace.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        keys.iter()
            .map(|k| k.stored_value.as_str())
            .collect::<Vec<_>>(),
    )
    .fetch_all(pg)
    .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for (ord, pid, links) in rows {
        let key = usize::try_from(ord - 1)
            .ok()
            .and_then(|i| keys.get(i))
            .ok_or_else(|| corrupt(format!("key ordinal {ord}")))?;
        out.insert(key.clone(), (pid, links));
    }
    Ok(out)
}

async fn consent_rows(
    conn: &mut AnyConnection,
    id: &str,
    purpose: Option<i64>,
) -> StoreResult<Vec<ConsentRecord>> {
    let rows: Vec<AnyRow> =
        match purpose {
            Some(p) => sqlx::query(
                "SELECT purpose, status, decided_at, source FROM consents WHERE profile_id = $1 \
                 AND purpose = $2 ORDER BY decided_at DESC, seq DESC",
            )
            .bind(id)
            .bind(p)
            .fetch_all(&mut *conn)
            .await?,
            None => sqlx::query(
                "SELECT purpose, status, decided_at, source FROM consents WHERE profile_id = $1 \
                 ORDER BY decided_at DESC, seq DESC",
            )
            .bind(id)
            .fetch_all(&mut *conn)
            .await?,
        };
    rows.iter()
        .map(|r| {
            Ok(ConsentRecord {
                purpose: r.try_get(0)?,
                status: r.try_get(1)?,
                decided_at: r.try_get(2)?,
                source: r.try_get(3)?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// Merges `loser` into `survivor`. Per-field rules: identifiers, consent history and merge
/// records move to the survivor; per trait name the most recently set value wins (the
/// survivor's on a tie); counts and spend add up; first order takes the earlier time, last
/// order and last seen the later; engagement counters add up. The loser stays as an alias.
async fn merge_profiles(
    conn: &mut AnyConnection,
    pg: bool,
    loser: &str,
    survivor: &str,
    via: &IdentifierKey,
    now: i64,
) -> StoreResult<()> {
    sqlx::query("UPDATE identifiers SET profile_id = $1 WHERE profile_id = $2")
        .bind(survivor)
        .bind(loser)
        .execute(&mut *conn)
        .await?;
    // Most merged profiles (anonymous visitors, campaign contacts) hold no traits or consent
    // decisions; one read spares the four statements that would move nothing.
    let held = sqlx::query(
        "SELECT (SELECT COUNT(*) FROM traits WHERE profile_id = $1), \
         (SELECT COUNT(*) FROM consents WHERE profile_id = $2)",
    )
    .bind(loser)
    .bind(loser)
    .fetch_one(&mut *conn)
    .await?;
    let (traits, consents): (i64, i64) = (held.try_get(0)?, held.try_get(1)?);
    if traits > 0 {
        sqlx::query(
            "DELETE FROM traits WHERE profile_id = $1 AND EXISTS (SELECT 1 FROM traits t2 \
             WHERE t2.profile_id = $2 AND t2.name = traits.name AND t2.updated_at >= traits.updated_at)",
        )
        .bind(loser)
        .bind(survivor)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "DELETE FROM traits WHERE profile_id = $1 AND EXISTS (SELECT 1 FROM traits t2 \
             WHERE t2.profile_id = $2 AND t2.name = traits.name)",
        )
        .bind(survivor)
        .bind(loser)
        .execute(&mut *conn)
        .await?;
    }
    for (table, n) in [("traits", traits), ("consents", consents)] {
        if n == 0 {
            continue;
        }
        sqlx::query(&format!(
            "UPDATE {table} SET profile_id = $1 WHERE profile_id = $2"
        ))
        .bind(survivor)
        .bind(loser)
        .execute(&mut *conn)
        .await?;
    }
    let moves = [
        (
            "spend (profile_id, currency, gross_minor, refunded_minor)",
            "currency, gross_minor, refunded_minor",
            "spend",
            "ON CONFLICT (profile_id, currency) DO UPDATE SET \
             gross_minor = spend.gross_minor + excluded.gross_minor, \
             refunded_minor = spend.refunded_minor + excluded.refunded_minor",
        ),
        (
            "engagement (profile_id, kind, count)",
            "kind, count",
            "engagement",
            "ON CONFLICT (profile_id, kind) DO UPDATE SET count = engagement.count + excluded.count",
        ),
    ];
    for (into, cols, table, conflict) in moves {
        if pg {
            // One statement: the loser's rows are deleted and added to the survivor's.
            sqlx::query(&format!(
                "WITH moved AS (DELETE FROM {table} WHERE profile_id = $2 RETURNING {cols}) \
                 INSERT INTO {into} SELECT $1, {cols} FROM moved {conflict}"
            ))
            .bind(survivor)
            .bind(loser)
            .execute(&mut *conn)
            .await?;
        } else {
            sqlx::query(&format!(
                "INSERT INTO {into} SELECT $1, {cols} FROM {table} WHERE profile_id = $2 {conflict}"
            ))
            .bind(survivor)
            .bind(loser)
            .execute(&mut *conn)
            .await?;
            sqlx::query(&format!("DELETE FROM {table} WHERE profile_id = $1"))
                .bind(loser)
                .execute(&mut *conn)
                .await?;
        }
    }
    // Counts and row engagement counters add up; first order takes the earlier time, last
    // order and last seen the later (a NULL side yields the other).
    sqlx::query(&format!(
        "UPDATE profiles SET order_count = profiles.order_count + l.order_count, \
         refund_count = profiles.refund_count + l.refund_count, \
         first_order_at = CASE WHEN l.first_order_at IS NULL THEN profiles.first_order_at \
           WHEN profiles.first_order_at IS NULL OR l.first_order_at < profiles.first_order_at \
           THEN l.first_order_at ELSE profiles.first_order_at END, \
         last_order_at = CASE WHEN l.last_order_at IS NULL THEN profiles.last_order_at \
           WHEN profiles.last_order_at IS NULL OR l.last_order_at > profiles.last_order_at \
           THEN l.last_order_at ELSE profiles.last_order_at END, \
         last_seen_at = CASE WHEN l.last_seen_at IS NULL THEN profiles.last_seen_at \
           WHEN profiles.last_seen_at IS NULL OR l.last_seen_at > profiles.last_seen_at \
           THEN l.last_seen_at ELSE profiles.last_seen_at END, {} \
         FROM (SELECT * FROM profiles WHERE id = $1) AS l \
         WHERE profiles.id = $2",
        row_engagement::set_list(|c| format!("profiles.{c} + l.{c}"))
    ))
    .bind(loser)
    .bind(survivor)
    .execute(&mut *conn)
    .await?;
    sqlx::query(&format!(
        "UPDATE profiles SET merged_into = $1, updated_at = $2, version = version + 1, \
         order_count = 0, refund_count = 0, {} WHERE id = $3 OR merged_into = $4",
        row_engagement::set_list(|_| "0".to_string())
    ))
    .bind(survivor)
    .bind(now)
    .bind(loser)
    .bind(loser)
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE merges SET survivor_id = $1 WHERE survivor_id = $2")
        .bind(survivor)
        .bind(loser)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO merges (survivor_id, merged_id, via_type, via_namespace, via_value, merged_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(survivor)
    .bind(loser)
    .bind(via.kind.code())
    .bind(&via.namespace)
    .bind(&via.stored_value)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

impl SqlProfileStore {
    /// Both `apply_aggregates` forms: with `feed`, positioned deltas (see
    /// [`ProfileStore::apply_feed_aggregates`]); without, key idempotency.
    async fn apply(
        &self,
        feed: Option<&str>,
        deltas: &[AggregateDelta],
        now: i64,
    ) -> StoreResult<ApplyOutcome> {
        let total = u32::try_from(deltas.len()).map_err(corrupt)?;
        if let Some(pg) = &self.native {
            let sent: Vec<&AggregateDelta> = match feed {
                // Keys new to this call, first occurrence only; the rest are duplicates.
                None => {
                    let mut seen: std::collections::HashSet<&str> =
                        std::collections::HashSet::new();
                    deltas
                        .iter()
                        .filter(|d| seen.insert(d.key.as_str()))
                        .collect()
                }
                Some(_) => deltas.iter().collect(),
            };
            let (fresh, applied, touched) = self
                .retry(|| apply_aggregates_pg(pg, feed, &sent, now))
                .await?;
            return Ok(ApplyOutcome {
                applied,
                duplicates: total - fresh,
                unknown_profiles: fresh - applied,
                touched,
            });
        }
        // Multi-row statements: a call of n deltas costs a handful of statements per chunk,
        // not several per delta (the ingest forwarder sends up to 500 at a time).
        let write = || async {
            let mut w = self.begin_write().await?;
            let conn: &mut AnyConnection = &mut w.tx;
            // A feed's row is locked before any profile (only feed calls take it, so no
            // cycle); the deltas at or below its position were counted before.
            let stored = match feed {
                Some(feed) => Some(lock_feed(conn, self.pg(), feed, now).await?),
                None => None,
            };
            let candidates: Vec<&AggregateDelta> = match stored {
                Some(at) => deltas.iter().filter(|d| d.position > at).collect(),
                None => deltas.iter().collect(),
            };
            // Resolve survivors first and lock them in order, so batches never deadlock.
            // A merge holds its profiles' locks, so once every survivor read is locked, the
            // picture is stable; a merge that committed between the read and the lock shows
            // up on the re-read (its survivor is then locked too).
            let requested: BTreeSet<&str> =
                candidates.iter().map(|d| d.profile_id.as_str()).collect();
            let mut locked: BTreeSet<String> = BTreeSet::new();
            let live = loop {
                let live = survivors(conn, &requested).await?;
                let ids: BTreeSet<String> = live.values().flatten().cloned().collect();
                let new: Vec<String> = ids.difference(&locked).cloned().collect();
                if new.is_empty() && !locked.is_empty() || ids.is_empty() {
                    break live;
                }
                self.lock(conn, new.iter().map(|p| format!("p:{p}")))
                    .await?;
                locked.extend(new);
            };
            // The deltas to count: by key (first occurrence of a key new to the store, which
            // the insert returns), or by position (also by key on a feed's first call).
            let fresh: Vec<&AggregateDelta> = match stored {
                Some(at) if at > 0 => candidates,
                Some(_) => {
                    let new = insert_keys(conn, &candidates, now).await?;
                    candidates
                        .into_iter()
                        .filter(|d| new.contains(&d.key))
                        .collect()
                }
                None => {
                    let mut seen: std::collections::HashSet<&str> =
                        std::collections::HashSet::new();
                    let firsts: Vec<&AggregateDelta> = candidates
                        .into_iter()
                        .filter(|d| seen.insert(d.key.as_str()))
                        .collect();
                    let new = insert_keys(conn, &firsts, now).await?;
                    firsts
                        .into_iter()
                        .filter(|d| new.contains(&d.key))
                        .collect()
                }
            };
            let mut out = ApplyOutcome {
                duplicates: total - u32::try_from(fresh.len()).map_err(corrupt)?,
                ..ApplyOutcome::default()
            };
            let mut folds: BTreeMap<String, ProfileFold> = BTreeMap::new();
            let mut spend: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
            let mut engagement: BTreeMap<(String, String), i64> = BTreeMap::new();
            for d in fresh {
                let Some(Some(pid)) = live.get(d.profile_id.as_str()) else {
                    out.unknown_profiles += 1;
                    continue;
                };
                let fold = folds.entry(pid.clone()).or_default();
                fold.add(d);
                for (money, gross) in [(&d.gross, true), (&d.refunded, false)] {
                    if let Some((currency, amount)) = money {
                        let e = spend.entry((pid.clone(), currency.clone())).or_default();
                        if gross {
                            e.0 += *amount;
                        } else {
                            e.1 += *amount;
                        }
                    }
                }
                for (kind, n) in &d.engagement {
                    match row_engagement::row_counter(kind) {
                        Some(i) => fold.engagement[i] += *n,
                        None => *engagement.entry((pid.clone(), kind.clone())).or_default() += *n,
                    }
                }
                out.applied += 1;
            }
            let folds: Vec<(String, ProfileFold)> = folds.into_iter().collect();
            let mut versions: BTreeMap<String, i64> = BTreeMap::new();
            for chunk in folds.chunks(APPLY_CHUNK) {
                // Per profile: id, five order columns, then the row engagement counters.
                let params = 6 + row_engagement::ROW_ENGAGEMENT.len();
                let row = format!("(?{})", ", CAST(? AS BIGINT)".repeat(params - 1));
                let rows = numbered_rows(chunk.len(), &row);
                let sql = format!(
                    "WITH v (id, o, r, fo, lo, ls, {cols}) AS (VALUES {}) \
                     UPDATE profiles SET order_count = order_count + v.o, refund_count = refund_count + v.r, \
                     first_order_at = CASE WHEN v.fo < COALESCE(first_order_at, {max}) THEN v.fo ELSE first_order_at END, \
                     last_order_at = CASE WHEN v.lo > COALESCE(last_order_at, {min}) THEN v.lo ELSE last_order_at END, \
                     last_seen_at = CASE WHEN v.ls > COALESCE(last_seen_at, {min}) THEN v.ls ELSE last_seen_at END, \
                     {counters}, version = version + 1, updated_at = ${now} \
                     FROM v WHERE profiles.id = v.id RETURNING profiles.id, profiles.version",
                    rows.join(", "),
                    cols = row_engagement::column_list(),
                    counters = row_engagement::set_list(|c| format!("profiles.{c} + v.{c}")),
                    max = i64::MAX,
                    min = i64::MIN + 1,
                    now = chunk.len() * params + 1,
                );
                let mut q = sqlx::query(&sql);
                for (pid, f) in chunk {
                    q = q
                        .bind(pid.as_str())
                        .bind(f.orders)
                        .bind(f.refunds)
                        .bind(f.first_order)
                        .bind(f.last_order)
                        .bind(f.last_seen);
                    for n in f.engagement {
                        q = q.bind(n);
                    }
                }
                q = q.bind(now);
                for r in q.fetch_all(&mut *conn).await? {
                    versions.insert(r.try_get(0)?, r.try_get(1)?);
                }
            }
            let spend: Vec<_> = spend.into_iter().collect();
            for chunk in spend.chunks(APPLY_CHUNK) {
                let rows = numbered_rows(chunk.len(), "(?, ?, ?, ?)");
                let sql = format!(
                    "INSERT INTO spend (profile_id, currency, gross_minor, refunded_minor) VALUES {} \
                     ON CONFLICT (profile_id, currency) DO UPDATE SET \
                     gross_minor = spend.gross_minor + excluded.gross_minor, \
                     refunded_minor = spend.refunded_minor + excluded.refunded_minor",
                    rows.join(", ")
                );
                let mut q = sqlx::query(&sql);
                for ((pid, currency), (g, r)) in chunk {
                    q = q
                        .bind(pid.as_str())
                        .bind(currency.as_str())
                        .bind(*g)
                        .bind(*r);
                }
                q.execute(&mut *conn).await?;
            }
            let engagement: Vec<_> = engagement.into_iter().collect();
            for chunk in engagement.chunks(APPLY_CHUNK) {
                let rows = numbered_rows(chunk.len(), "(?, ?, ?)");
                let sql = format!(
                    "INSERT INTO engagement (profile_id, kind, count) VALUES {} \
                     ON CONFLICT (profile_id, kind) DO UPDATE SET count = engagement.count + excluded.count",
                    rows.join(", ")
                );
                let mut q = sqlx::query(&sql);
                for ((pid, kind), n) in chunk {
                    q = q.bind(pid.as_str()).bind(kind.as_str()).bind(*n);
                }
                q.execute(&mut *conn).await?;
            }
            if !versions.is_empty() {
                self.db.lock_id(conn, CHANGES_LOCK).await?;
                let touched: Vec<(&String, &i64)> = versions.iter().collect();
                for chunk in touched.chunks(APPLY_CHUNK) {
                    let rows = numbered_rows(
                        chunk.len(),
                        &format!("(?, {}, '', ?)", ChangeKind::Updated as i64),
                    );
                    let sql = format!(
                        "INSERT INTO changes (profile_id, kind, merged_ids, changed_at) VALUES {}",
                        rows.join(", ")
                    );
                    let mut q = sqlx::query(&sql);
                    for (pid, _) in chunk {
                        q = q.bind(pid.as_str()).bind(now);
                    }
                    q.execute(&mut *conn).await?;
                }
            }
            if let (Some(feed), Some(top)) = (feed, deltas.iter().map(|d| d.position).max()) {
                sqlx::query(
                    "UPDATE feed_positions SET position = $1, updated_at = $2 \
                     WHERE feed = $3 AND position < $4",
                )
                .bind(top)
                .bind(now)
                .bind(feed)
                .bind(top)
                .execute(&mut *conn)
                .await?;
            }
            out.touched = versions.into_iter().collect();
            w.tx.commit().await?;
            Ok(out)
        };
        self.retry(write).await
    }
}

/// Locks feed `feed`'s row (created at position 0 when new) and returns its stored position.
/// On SQLite writers are serialised, so the read is enough.
async fn lock_feed(conn: &mut AnyConnection, pg: bool, feed: &str, now: i64) -> StoreResult<i64> {
    let select = if pg {
        "SELECT position FROM feed_positions WHERE feed = $1 FOR UPDATE"
    } else {
        "SELECT position FROM feed_positions WHERE feed = $1"
    };
    if let Some(r) = sqlx::query(select)
        .bind(feed)
        .fetch_optional(&mut *conn)
        .await?
    {
        return Ok(r.try_get(0)?);
    }
    sqlx::query(
        "INSERT INTO feed_positions (feed, position, updated_at) VALUES ($1, 0, $2) \
         ON CONFLICT (feed) DO NOTHING",
    )
    .bind(feed)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    let r = sqlx::query(select).bind(feed).fetch_one(&mut *conn).await?;
    Ok(r.try_get(0)?)
}

/// Records the keys of `deltas` in `applied_deltas`; returns those that were new.
async fn insert_keys(
    conn: &mut AnyConnection,
    deltas: &[&AggregateDelta],
    now: i64,
) -> StoreResult<std::collections::HashSet<String>> {
    let mut fresh = std::collections::HashSet::new();
    for chunk in deltas.chunks(APPLY_CHUNK) {
        let rows = numbered_rows(chunk.len(), "(?, ?, ?)");
        let sql = format!(
            "INSERT INTO applied_deltas (idempotency_key, profile_id, applied_at) VALUES {} \
             ON CONFLICT DO NOTHING RETURNING idempotency_key",
            rows.join(", ")
        );
        let mut q = sqlx::query(&sql);
        for d in chunk {
            q = q.bind(d.key.as_str()).bind(d.profile_id.as_str()).bind(now);
        }
        for r in q.fetch_all(&mut *conn).await? {
            fresh.insert(r.try_get(0)?);
        }
    }
    Ok(fresh)
}

#[async_trait]
impl ProfileStore for SqlProfileStore {
    async fn resolve(&self, keys: &[IdentifierKey], now: i64) -> StoreResult<ResolveOutcome> {
        self.retry(|| self.resolve_once(keys, now)).await
    }

    async fn resolve_known(&self, sets: &[Vec<IdentifierKey>]) -> StoreResult<Vec<Option<String>>> {
        let all: Vec<IdentifierKey> = sets
            .iter()
            .flatten()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let found = match &self.native {
            Some(pg) => lookup_identifiers_pg(pg, &all).await?,
            None => {
                let mut conn = self.db.pool.acquire().await?;
                lookup_identifiers(&mut conn, self.pg(), &all).await?
            }
        };
        let mut out = Vec::with_capacity(sets.len());
        for set in sets {
            let mut profile: Option<&str> = None;
            let mut one = !set.is_empty();
            for k in set {
                match (found.get(k), profile) {
                    (None, _) => one = false,
                    (Some((p, _)), None) => profile = Some(p),
                    (Some((p, _)), Some(q)) if p != q => one = false,
                    _ => {}
                }
            }
            out.push(if one {
                profile.map(str::to_string)
            } else {
                None
            });
        }
        Ok(out)
    }

    async fn create_new(
        &self,
        sets: &[Vec<IdentifierKey>],
        now: i64,
    ) -> StoreResult<Vec<Option<String>>> {
        let mut out = Vec::with_capacity(sets.len());
        for chunk in sets.chunks(NEW_SET_CHUNK) {
            out.extend(self.retry(|| self.create_new_chunk(chunk, now)).await?);
        }
        Ok(out)
    }

    async fn resolve_many(
        &self,
        sets: &[Vec<IdentifierKey>],
        now: i64,
    ) -> StoreResult<Vec<ResolveOutcome>> {
        if sets.is_empty() {
            return Ok(Vec::new());
        }
        self.retry(|| self.resolve_many_once(sets, now)).await
    }

    async fn get(&self, id: &str) -> StoreResult<ProfileRecord> {
        let mut conn = self.db.pool.acquire().await?;
        self.load(&mut conn, id).await
    }

    async fn update_traits(
        &self,
        id: &str,
        set: &[(String, TraitValue)],
        remove: &[String],
        now: i64,
    ) -> StoreResult<ProfileRecord> {
        let write = || async {
            let mut w = self.begin_write().await?;
            let conn: &mut AnyConnection = &mut w.tx;
            let pid = self.lock_live(conn, id).await?;
            for (name, value) in set {
                sqlx::query(
                    "INSERT INTO traits (profile_id, name, value, updated_at) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (profile_id, name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                )
                .bind(&pid)
                .bind(name)
                .bind(serde_json::to_string(value).map_err(corrupt)?)
                .bind(now)
                .execute(&mut *conn)
                .await?;
            }
            for name in remove {
                sqlx::query("DELETE FROM traits WHERE profile_id = $1 AND name = $2")
                    .bind(&pid)
                    .bind(name)
                    .execute(&mut *conn)
                    .await?;
            }
            let n: i64 = sqlx::query("SELECT COUNT(*) FROM traits WHERE profile_id = $1")
                .bind(&pid)
                .fetch_one(&mut *conn)
                .await?
                .try_get(0)?;
            if n > MAX_TRAITS_PER_PROFILE {
                return Err(StoreError::Limit {
                    field: "set",
                    message: format!("a profile holds at most {MAX_TRAITS_PER_PROFILE} traits"),
                });
            }
            self.bump(conn, &pid, now).await?;
            self.record_change(conn, &pid, ChangeKind::Updated, &[], now)
                .await?;
            let record = self.load(conn, &pid).await?;
            w.tx.commit().await?;
            Ok(record)
        };
        self.retry(write).await
    }

    async fn record_consent(
        &self,
        id: &str,
        consent: &ConsentRecord,
        now: i64,
    ) -> StoreResult<ProfileRecord> {
        let write = || async {
            let mut w = self.begin_write().await?;
            let conn: &mut AnyConnection = &mut w.tx;
            let pid = self.lock_live(conn, id).await?;
            sqlx::query(
                "INSERT INTO consents (profile_id, purpose, status, decided_at, source) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&pid)
            .bind(consent.purpose)
            .bind(consent.status)
            .bind(consent.decided_at)
            .bind(&consent.source)
            .execute(&mut *conn)
            .await?;
            self.bump(conn, &pid, now).await?;
            self.record_change(conn, &pid, ChangeKind::Updated, &[], now)
                .await?;
            let record = self.load(conn, &pid).await?;
            w.tx.commit().await?;
            Ok(record)
        };
        self.retry(write).await
    }

    async fn consent_history(
        &self,
        id: &str,
        purpose: Option<i64>,
    ) -> StoreResult<Vec<ConsentRecord>> {
        let mut conn = self.db.pool.acquire().await?;
        let s = survivor(&mut conn, id)
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        if s.erased_at.is_some() {
            return Err(StoreError::Erased(id.to_string()));
        }
        consent_rows(&mut conn, &s.id, purpose).await
    }

    async fn apply_aggregates(
        &self,
        deltas: &[AggregateDelta],
        now: i64,
    ) -> StoreResult<ApplyOutcome> {
        self.apply(None, deltas, now).await
    }

    async fn apply_feed_aggregates(
        &self,
        feed: &str,
        deltas: &[AggregateDelta],
        now: i64,
    ) -> StoreResult<ApplyOutcome> {
        self.apply(Some(feed), deltas, now).await
    }

    async fn erase(&self, id: &str, reason: &str, now: i64) -> StoreResult<EraseOutcome> {
        let write = || async {
            let mut w = self.begin_write().await?;
            let conn: &mut AnyConnection = &mut w.tx;
            let s = survivor(conn, id)
                .await?
                .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
            self.lock(conn, [format!("p:{}", s.id)]).await?;
            let pid = s.id;
            let aliases: Vec<String> =
                sqlx::query("SELECT id FROM profiles WHERE merged_into = $1")
                    .bind(&pid)
                    .fetch_all(&mut *conn)
                    .await?
                    .iter()
                    .map(|r| r.try_get(0))
                    .collect::<Result<_, _>>()?;
            let mut ids = vec![pid.clone()];
            ids.extend(aliases);
            if let Some(at) = s.erased_at {
                return Ok(EraseOutcome {
                    identifiers_tombstoned: 0,
                    erased_at: at,
                    profile_ids: ids,
                });
            }
            let rows = sqlx::query(
                "SELECT id_type, namespace, stored_value FROM identifiers WHERE profile_id = $1",
            )
            .bind(&pid)
            .fetch_all(&mut *conn)
            .await?;
            let mut n = 0u32;
            for r in rows {
                let code: i64 = r.try_get(0)?;
                let kind = crate::identifiers::IdKind::from_code(code)
                    .ok_or_else(|| corrupt(format!("identifier type {code}")))?;
                let key = IdentifierKey {
                    kind,
                    namespace: r.try_get(1)?,
                    stored_value: r.try_get(2)?,
                };
                sqlx::query(
                    "INSERT INTO tombstones (id_type, namespace, value_hash, erased_at, reason) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                )
                .bind(code)
                .bind(&key.namespace)
                .bind(self.hasher.tombstone_hash(&key))
                .bind(now)
                .bind(reason)
                .execute(&mut *conn)
                .await?;
                n += 1;
            }
            for table in ["identifiers", "traits", "consents", "spend", "engagement"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE profile_id = $1"))
                    .bind(&pid)
                    .execute(&mut *conn)
                    .await?;
            }
            sqlx::query("DELETE FROM merges WHERE survivor_id = $1 OR merged_id = $2")
                .bind(&pid)
                .bind(&pid)
                .execute(&mut *conn)
                .await?;
            sqlx::query(&format!(
                "UPDATE profiles SET erased_at = $1, updated_at = $2, version = version + 1, \
                 first_order_at = NULL, last_order_at = NULL, last_seen_at = NULL, \
                 order_count = 0, refund_count = 0, {} WHERE id = $3 OR merged_into = $4",
                row_engagement::set_list(|_| "0".to_string())
            ))
            .bind(now)
            .bind(now)
            .bind(&pid)
            .bind(&pid)
            .execute(&mut *conn)
            .await?;
            self.record_change(conn, &pid, ChangeKind::Erased, &[], now)
                .await?;
            w.tx.commit().await?;
            Ok(EraseOutcome {
                identifiers_tombstoned: n,
                erased_at: now,
                profile_ids: ids,
            })
        };
        self.retry(write).await
    }

    async fn export(&self, id: &str) -> StoreResult<serde_json::Value> {
        let mut conn = self.db.pool.acquire().await?;
        let p = self.load(&mut conn, id).await?;
        let history = consent_rows(&mut conn, &p.id, None).await?;
        let merges = sqlx::query(
            "SELECT merged_id, via_type, via_namespace, via_value, merged_at FROM merges \
             WHERE survivor_id = $1 ORDER BY merged_at",
        )
        .bind(&p.id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| {
            Ok(serde_json::json!({
                "merged_profile_id": r.try_get::<String, _>(0)?,
                "via_identifier_type": r.try_get::<i64, _>(1)?,
                "via_namespace": r.try_get::<String, _>(2)?,
                "via_stored_value": r.try_get::<String, _>(3)?,
                "merged_at_micros": r.try_get::<i64, _>(4)?,
            }))
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(serde_json::json!({
            "format": "clientele.profile-export.v1",
            "profile": p,
            "consent_history": history,
            "merges": merges,
        }))
    }

    async fn any_erased(&self, sets: &[Vec<IdentifierKey>]) -> StoreResult<Vec<bool>> {
        let mut conn = self.db.pool.acquire().await?;
        let mut out = Vec::with_capacity(sets.len());
        for set in sets {
            out.push(self.tombstoned(&mut conn, set).await?);
        }
        Ok(out)
    }

    async fn feed_position(&self, feed: &str) -> StoreResult<i64> {
        let position: Option<i64> =
            sqlx::query_scalar("SELECT position FROM feed_positions WHERE feed = $1")
                .bind(feed)
                .fetch_optional(&self.db.pool)
                .await?;
        Ok(position.unwrap_or(0))
    }

    async fn changes_after(&self, after: i64, limit: i64) -> StoreResult<Vec<ChangeRecord>> {
        let rows = sqlx::query(
            "SELECT seq, profile_id, kind, merged_ids, changed_at FROM changes WHERE seq > $1 \
             ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        change_records(&rows)
    }

    async fn changes_of_kinds_after(
        &self,
        after: i64,
        limit: i64,
        kinds: &[i64],
    ) -> StoreResult<(Vec<ChangeRecord>, Option<i64>)> {
        if kinds.is_empty() {
            let records = self.changes_after(after, limit).await?;
            let reached = records.last().map(|c| c.seq);
            return Ok((records, reached));
        }
        // The page's wanted rows plus its last row (whatever its kind), which marks how far
        // the page reached; kinds are integers, written into the statement.
        let wanted = kinds
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let rows = sqlx::query(&format!(
            "WITH page AS (SELECT seq, profile_id, kind, merged_ids, changed_at FROM changes \
             WHERE seq > $1 ORDER BY seq LIMIT $2) \
             SELECT seq, profile_id, kind, merged_ids, changed_at FROM page \
             WHERE kind IN ({wanted}) OR seq = (SELECT MAX(seq) FROM page) ORDER BY seq"
        ))
        .bind(after)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        let mut records = change_records(&rows)?;
        let reached = records.last().map(|c| c.seq);
        if records.last().is_some_and(|c| !kinds.contains(&c.kind)) {
            records.pop();
        }
        Ok((records, reached))
    }
}

/// Rows of `seq, profile_id, kind, merged_ids, changed_at` from `changes`.
fn change_records(rows: &[sqlx::any::AnyRow]) -> StoreResult<Vec<ChangeRecord>> {
    rows.iter()
        .map(|r| {
            let merged: String = r.try_get(3)?;
            Ok(ChangeRecord {
                seq: r.try_get(0)?,
                profile_id: r.try_get(1)?,
                kind: r.try_get(2)?,
                merged_ids: merged
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
                changed_at: r.try_get(4)?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// `rows` copies of `row` with each `?` replaced by the next numbered bind parameter (`$1`,
/// `$2`, … across all rows), for the multi-row `VALUES` lists the batch writes build: both
/// engines accept `$n` through `sqlx::Any`.
fn numbered_rows(rows: usize, row: &str) -> Vec<String> {
    let mut next = 0;
    (0..rows)
        .map(|_| {
            row.chars()
                .map(|c| {
                    if c == '?' {
                        next += 1;
                        format!("${next}")
                    } else {
                        c.to_string()
                    }
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::numbered_rows;

    #[test]
    fn numbered_rows_number_parameters_across_rows() {
        assert_eq!(
            numbered_rows(2, "(?, CAST(? AS BIGINT), 1)"),
            vec!["($1, CAST($2 AS BIGINT), 1)", "($3, CAST($4 AS BIGINT), 1)"]
        );
        assert!(numbered_rows(0, "(?)").is_empty());
    }
}
