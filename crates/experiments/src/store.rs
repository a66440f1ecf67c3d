//! Experiment persistence behind one trait, [`ExperimentStore`], with one SQL implementation
//! that runs on PostgreSQL and on SQLite through `sqlx::Any`.
//!
//! Exactly-once writes rest on primary keys, not on reads before writes: a first exposure is
//! `INSERT … ON CONFLICT DO NOTHING` on `(experiment_key, unit_id)` followed by reading the
//! stored row in the same transaction, so concurrent LogExposure calls for one unit record
//! one exposure and all report the same variant and time; conversions do the same on their
//! idempotency key. Lifecycle changes are compare-and-swap on `version`. Starting an
//! experiment additionally serialises on one PostgreSQL advisory lock so two overlapping
//! experiments of one namespace cannot start at once. On SQLite a process-wide mutex
//! serialises write transactions.

use std::collections::HashMap;

use async_trait::async_trait;
use clientele_proto::v1 as pb;
use clientele_runtime::db::{Database, WriteTx};
use prost::Message;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::events::{EventFact, ORDER_COMPLETED};
use crate::model::{
    AggregateQuery, ConversionRecord, ExperimentRecord, ExposureOutcome, ExposureRecord, Lifecycle,
    MetricDef, ProfileChange, VariantAggregates,
};

/// The conversion-unit attribute of event-derived conversions and of profile-keyed units.
const PROFILE_ATTRIBUTE: &str = "profile_id";

/// Advisory lock key serialising experiment starts (namespace exclusivity), PostgreSQL.
const START_LOCK: i64 = 0x636c_6e74_6578_7073;
/// Parameters per statement when looking up many rows at once.
const LOOKUP_CHUNK: usize = 300;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No experiment has this key.
    #[error("experiment `{0}` not found")]
    NotFound(String),
    /// An experiment with this key exists with a different definition.
    #[error("experiment `{0}` already exists with a different definition")]
    ExperimentExists(String),
    /// The experiment changed since it was read (compare-and-swap lost).
    #[error("experiment `{key}` changed concurrently (now at version {actual})")]
    VersionConflict {
        /// The experiment.
        key: String,
        /// Its current version.
        actual: i64,
    },
    /// Starting would overlap a running experiment in the same namespace.
    #[error(
        "namespace `{namespace}` range overlaps running experiment `{other}`; namespaces keep experiments mutually exclusive only with disjoint ranges"
    )]
    NamespaceOverlap {
        /// The namespace id.
        namespace: String,
        /// The running experiment it overlaps.
        other: String,
    },
    /// A metric key is already defined differently by another experiment.
    #[error(
        "{field}: metric `{key}` is already defined by experiment `{defined_by}` as {existing}"
    )]
    MetricConflict {
        /// The request field responsible.
        field: String,
        /// The metric key.
        key: String,
        /// Who defined it first.
        defined_by: String,
        /// The existing definition, in words.
        existing: String,
    },
    /// The idempotency key was used before with a different request.
    #[error("idempotency key `{0}` was already used with a different request")]
    IdempotencyConflict(String),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// Stored data could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// A feed's stored cursor is no longer the one the batch was read after (another
    /// consumer applied it first); nothing was written and the batch is re-read.
    #[error("feed `{0}` moved on concurrently")]
    CursorMoved(String),
}

/// Result type of the store.
pub type StoreResult<T> = Result<T, StoreError>;

/// Everything ExperimentService persists. Each call is atomic: on error nothing it would have
/// written is visible.
#[async_trait]
pub trait ExperimentStore: Send + Sync + std::fmt::Debug {
    /// Creates a DRAFT experiment (version 1) and registers its metrics. With an existing key
    /// and an equal definition returns the stored record and `false`; with a different one,
    /// [`StoreError::ExperimentExists`]. A metric key defined differently elsewhere is
    /// [`StoreError::MetricConflict`] naming the request field paired with the metric.
    async fn create(
        &self,
        record: &ExperimentRecord,
        metrics: &[(MetricDef, String)],
    ) -> StoreResult<(ExperimentRecord, bool)>;
    /// The experiment `key`, or [`StoreError::NotFound`].
    async fn get(&self, key: &str) -> StoreResult<ExperimentRecord>;
    /// The experiments among `keys` that exist (any order).
    async fn get_many(&self, keys: &[String]) -> StoreResult<Vec<ExperimentRecord>>;
    /// Up to `limit` experiments with key above `after`, by key, whose stored status is one
    /// of `statuses` (all when empty).
    async fn list(
        &self,
        statuses: &[Lifecycle],
        after: &str,
        limit: i64,
    ) -> StoreResult<Vec<ExperimentRecord>>;
    /// Replaces the definition if the stored version is still `based_on` (else
    /// [`StoreError::VersionConflict`]), bumping the version and registering new metrics.
    async fn update(
        &self,
        key: &str,
        based_on: i64,
        definition: &pb::Experiment,
        metrics: &[(MetricDef, String)],
        now: i64,
    ) -> StoreResult<ExperimentRecord>;
    /// DRAFT → RUNNING at `now` if the version is still `based_on`, refusing a namespace range
    /// overlapping a running experiment ([`StoreError::NamespaceOverlap`]).
    async fn start(&self, key: &str, based_on: i64, now: i64) -> StoreResult<ExperimentRecord>;
    /// RUNNING → STOPPED at `now` if the version is still `based_on`.
    async fn stop(
        &self,
        key: &str,
        based_on: i64,
        released_variant: Option<i32>,
        reason: &str,
        now: i64,
    ) -> StoreResult<ExperimentRecord>;
    /// Records the first exposure of `exposure.unit_id` exactly once; later calls return the
    /// stored one with `first = false`.
    async fn log_exposure(&self, exposure: &ExposureRecord) -> StoreResult<ExposureOutcome>;
    /// Stored first exposures of the given `(experiment_key, unit_id)` pairs.
    async fn exposures(
        &self,
        pairs: &[(String, String)],
    ) -> StoreResult<HashMap<(String, String), ExposureRecord>>;
    /// The definition of metric `key`, if any experiment defined it.
    async fn metric_def(&self, key: &str) -> StoreResult<Option<MetricDef>>;
    /// Records a conversion exactly once per idempotency key. Returns `true` when the key
    /// was seen before with the same request (a replay: nothing written);
    /// [`StoreError::IdempotencyConflict`] when seen with a different request.
    ///
    /// **Ingest seam**: the consumer of ingested events calls this for event-derived metrics
    /// (see [`ConversionRecord`]); RecordConversion calls it for recorded ones.
    async fn record_conversion(&self, conversion: &ConversionRecord) -> StoreResult<bool>;
    /// Per-variant sufficient statistics of one metric, one row per variant with units.
    ///
    /// A unit is a *person*: exposures under profile ids later merged into one survivor
    /// (see [`ExperimentStore::apply_profile_changes`]) count once, as the earliest of them
    /// (by exposure time, then id), and conversions recorded under any of the person's ids
    /// count for it.
    async fn aggregate(&self, query: &AggregateQuery) -> StoreResult<Vec<VariantAggregates>>;
    /// The stored cursor of `feed`, `None` before its first batch.
    async fn feed_cursor(&self, feed: &str) -> StoreResult<Option<String>>;
    /// Applies a batch of the ingest feed read after `expected`, together with the new
    /// `cursor`, in one transaction ([`StoreError::CursorMoved`] and nothing written when the
    /// stored cursor is no longer `expected`). Each fact is written exactly once (by its
    /// idempotency key and, for orders, its order id); facts of erased profiles are dropped.
    /// Returns the number of conversions written.
    async fn apply_events(
        &self,
        feed: &str,
        expected: Option<&str>,
        cursor: &str,
        facts: &[EventFact],
    ) -> StoreResult<u64>;
    /// Applies a batch of profile changes read after `expected` with the new `cursor`, in one
    /// transaction. Merges record aliases (kept flat). Erasure anonymises the person's
    /// experiment data: every id of the person (the profile and the ids merged into it) is
    /// replaced by one random pseudonym in exposures, conversions and orders, exposures folded
    /// away by a merge are deleted, aliases are deleted and the ids remembered as erased, so
    /// results keep their figures while nothing links them to the person any more.
    /// Idempotent: a replayed erasure finds nothing left to rewrite.
    async fn apply_profile_changes(
        &self,
        feed: &str,
        expected: Option<&str>,
        cursor: &str,
        changes: &[ProfileChange],
        now: i64,
    ) -> StoreResult<()>;
}

/// The SQL implementation of [`ExperimentStore`] for PostgreSQL and SQLite.
#[derive(Debug, Clone)]
pub struct SqlExperimentStore {
    db: Database,
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

const EXPERIMENT_COLUMNS: &str = "key, definition, status, version, created_at, updated_at, \
     start_time, stop_time, released_variant, stop_reason";

fn encode_definition(definition: &pb::Experiment) -> String {
    hex::encode(definition.encode_to_vec())
}

fn experiment_from_row(row: &AnyRow) -> StoreResult<ExperimentRecord> {
    let hex_definition: String = row.try_get("definition")?;
    let bytes = hex::decode(hex_definition).map_err(corrupt)?;
    let definition = pb::Experiment::decode(bytes.as_slice()).map_err(corrupt)?;
    let status: i64 = row.try_get("status")?;
    let released: Option<i64> = row.try_get("released_variant")?;
    Ok(ExperimentRecord {
        key: row.try_get("key")?,
        definition,
        status: Lifecycle::from_code(status)
            .ok_or_else(|| corrupt(format!("unknown status {status}")))?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        start_time: row.try_get("start_time")?,
        stop_time: row.try_get("stop_time")?,
        released_variant: released.map(i32::try_from).transpose().map_err(corrupt)?,
        stop_reason: row.try_get("stop_reason")?,
    })
}

fn exposure_from_row(row: &AnyRow) -> StoreResult<ExposureRecord> {
    let variant: i64 = row.try_get("variant_index")?;
    Ok(ExposureRecord {
        experiment_key: row.try_get("experiment_key")?,
        unit_id: row.try_get("unit_id")?,
        variant_index: i32::try_from(variant).map_err(corrupt)?,
        exposed_at: row.try_get("exposed_at")?,
        profile_id: row.try_get("profile_id")?,
        pre_period_value: row.try_get("pre_period_value")?,
    })
}

fn metric_def_from_row(row: &AnyRow) -> StoreResult<MetricDef> {
    let metric_type: i64 = row.try_get("metric_type")?;
    let event_derived: i64 = row.try_get("event_derived")?;
    Ok(MetricDef {
        key: row.try_get("metric_key")?,
        metric_type: i32::try_from(metric_type).map_err(corrupt)?,
        currency: row.try_get("currency")?,
        event_derived: event_derived != 0,
        defined_by: row.try_get("defined_by")?,
    })
}

fn describe_metric(m: &MetricDef) -> String {
    let kind = match pb::MetricType::try_from(m.metric_type) {
        Ok(pb::MetricType::Binary) => "BINARY".to_owned(),
        Ok(pb::MetricType::Continuous) => format!("CONTINUOUS in {}", m.currency),
        _ => format!("type {}", m.metric_type),
    };
    let source = if m.event_derived {
        "event-derived"
    } else {
        "recorded"
    };
    format!("{kind}, {source}")
}

/// Whether two namespace slices of the same namespace overlap.
fn ranges_overlap(a: &pb::Namespace, b: &pb::Namespace) -> bool {
    a.id == b.id && a.range_start < b.range_end && b.range_start < a.range_end
}

impl SqlExperimentStore {
    /// A store over `db` (already migrated).
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    async fn begin_write(&self) -> StoreResult<WriteTx<'_>> {
        Ok(self.db.begin_write().await?)
    }

    async fn get_in(conn: &mut AnyConnection, key: &str) -> StoreResult<ExperimentRecord> {
        let sql = format!("SELECT {EXPERIMENT_COLUMNS} FROM experiments WHERE key = $1");
        let row = sqlx::query(&sql)
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| StoreError::NotFound(key.to_owned()))?;
        experiment_from_row(&row)
    }

    /// Inserts metric definitions that are new and checks the others match.
    async fn register_metrics(
        conn: &mut AnyConnection,
        experiment_key: &str,
        metrics: &[(MetricDef, String)],
    ) -> StoreResult<()> {
        for (m, field) in metrics {
            sqlx::query(
                "INSERT INTO metric_defs (metric_key, metric_type, currency, event_derived, defined_by) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .bind(&m.key)
            .bind(i64::from(m.metric_type))
            .bind(&m.currency)
            .bind(i64::from(m.event_derived))
            .bind(experiment_key)
            .execute(&mut *conn)
            .await?;
            let row = sqlx::query(
                "SELECT metric_key, metric_type, currency, event_derived, defined_by \
                 FROM metric_defs WHERE metric_key = $1",
            )
            .bind(&m.key)
            .fetch_one(&mut *conn)
            .await?;
            let stored = metric_def_from_row(&row)?;
            if stored.metric_type != m.metric_type
                || stored.currency != m.currency
                || stored.event_derived != m.event_derived
            {
                return Err(StoreError::MetricConflict {
                    field: field.clone(),
                    key: m.key.clone(),
                    existing: describe_metric(&stored),
                    defined_by: stored.defined_by,
                });
            }
        }
        Ok(())
    }

    /// Moves `feed` from `expected` to `cursor`, or [`StoreError::CursorMoved`]. Runs first in
    /// a batch's transaction, so on PostgreSQL the cursor row lock serialises replicas.
    async fn advance_cursor(
        conn: &mut AnyConnection,
        feed: &str,
        expected: Option<&str>,
        cursor: &str,
    ) -> StoreResult<()> {
        let changed = match expected {
            None => sqlx::query(
                "INSERT INTO feed_cursors (feed, feed_cursor) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(feed)
            .bind(cursor)
            .execute(&mut *conn)
            .await?
            .rows_affected(),
            Some(old) => sqlx::query(
                "UPDATE feed_cursors SET feed_cursor = $1 WHERE feed = $2 AND feed_cursor = $3",
            )
            .bind(cursor)
            .bind(feed)
            .bind(old)
            .execute(&mut *conn)
            .await?
            .rows_affected(),
        };
        if changed == 1 {
            Ok(())
        } else {
            Err(StoreError::CursorMoved(feed.to_owned()))
        }
    }

    /// Inserts one profile-keyed conversion unless its key exists; true when written.
    #[allow(clippy::too_many_arguments)]
    async fn insert_event_conversion(
        conn: &mut AnyConnection,
        idempotency_key: &str,
        source_key: &str,
        profile_id: &str,
        occurred_at: i64,
        value_minor: i64,
        currency: &str,
    ) -> StoreResult<bool> {
        let record = ConversionRecord {
            idempotency_key: idempotency_key.to_owned(),
            metric_key: source_key.to_owned(),
            unit_ids: std::iter::once((PROFILE_ATTRIBUTE.to_owned(), profile_id.to_owned()))
                .collect(),
            occurred_at,
            value_minor,
            currency: currency.to_owned(),
        };
        let inserted = sqlx::query(
            "INSERT INTO conversions (idempotency_key, metric_key, occurred_at, value_minor, currency, fingerprint, recorded_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .bind(idempotency_key)
        .bind(source_key)
        .bind(occurred_at)
        .bind(value_minor)
        .bind(currency)
        .bind(record.fingerprint())
        .bind(clientele_runtime::time::now_micros())
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO conversion_units (idempotency_key, attribute, unit_id) VALUES ($1, $2, $3)",
        )
        .bind(idempotency_key)
        .bind(PROFILE_ATTRIBUTE)
        .bind(profile_id)
        .execute(&mut *conn)
        .await?;
        Ok(true)
    }

    async fn is_erased(conn: &mut AnyConnection, profile_id: &str) -> StoreResult<bool> {
        Ok(
            sqlx::query("SELECT profile_id FROM erased_profiles WHERE profile_id = $1")
                .bind(profile_id)
                .fetch_optional(&mut *conn)
                .await?
                .is_some(),
        )
    }

    /// Writes one fact; returns the conversions written.
    async fn apply_fact(conn: &mut AnyConnection, fact: &EventFact) -> StoreResult<u64> {
        if let Some(p) = fact.profile_id()
            && Self::is_erased(conn, p).await?
        {
            return Ok(0);
        }
        let mut written = 0;
        match fact {
            EventFact::Order {
                idempotency_key,
                order_id,
                profile_id,
                occurred_at,
                value_minor,
                currency,
            } => {
                let first = sqlx::query(
                    "INSERT INTO event_orders (order_id, profile_id, occurred_at, currency) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                )
                .bind(order_id)
                .bind(profile_id)
                .bind(*occurred_at)
                .bind(currency)
                .execute(&mut *conn)
                .await?
                .rows_affected()
                    == 1;
                if !first {
                    // A redelivery, or another ORDER_COMPLETED for a known order: first wins.
                    return Ok(0);
                }
                written += u64::from(
                    Self::insert_event_conversion(
                        conn,
                        idempotency_key,
                        ORDER_COMPLETED,
                        profile_id,
                        *occurred_at,
                        *value_minor,
                        currency,
                    )
                    .await?,
                );
                let pending = sqlx::query(
                    "SELECT idempotency_key, amount_minor, currency FROM pending_refunds \
                     WHERE order_id = $1 ORDER BY idempotency_key",
                )
                .bind(order_id)
                .fetch_all(&mut *conn)
                .await?;
                for row in pending {
                    let key: String = row.try_get("idempotency_key")?;
                    let amount: i64 = row.try_get("amount_minor")?;
                    let refund_currency: String = row.try_get("currency")?;
                    if &refund_currency == currency {
                        written += u64::from(
                            Self::insert_event_conversion(
                                conn,
                                &key,
                                ORDER_COMPLETED,
                                profile_id,
                                *occurred_at,
                                -amount,
                                currency,
                            )
                            .await?,
                        );
                    } else {
                        tracing::info!(order = %order_id, "refund in another currency than its order ignored");
                    }
                }
                sqlx::query("DELETE FROM pending_refunds WHERE order_id = $1")
                    .bind(order_id)
                    .execute(&mut *conn)
                    .await?;
            }
            EventFact::Refund {
                idempotency_key,
                order_id,
                amount_minor,
                currency,
                own,
            } => {
                if let Some(own) = own {
                    written += Box::pin(Self::apply_fact(conn, own)).await?;
                }
                let order = sqlx::query(
                    "SELECT profile_id, occurred_at, currency FROM event_orders WHERE order_id = $1",
                )
                .bind(order_id)
                .fetch_optional(&mut *conn)
                .await?;
                match order {
                    Some(row) => {
                        let profile_id: String = row.try_get("profile_id")?;
                        let at: i64 = row.try_get("occurred_at")?;
                        let order_currency: String = row.try_get("currency")?;
                        if &order_currency == currency {
                            written += u64::from(
                                Self::insert_event_conversion(
                                    conn,
                                    idempotency_key,
                                    ORDER_COMPLETED,
                                    &profile_id,
                                    at,
                                    -amount_minor,
                                    currency,
                                )
                                .await?,
                            );
                        } else {
                            tracing::info!(order = %order_id, "refund in another currency than its order ignored");
                        }
                    }
                    None => {
                        sqlx::query(
                            "INSERT INTO pending_refunds (idempotency_key, order_id, amount_minor, currency) \
                             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                        )
                        .bind(idempotency_key)
                        .bind(order_id)
                        .bind(*amount_minor)
                        .bind(currency)
                        .execute(&mut *conn)
                        .await?;
                    }
                }
            }
            EventFact::Other {
                idempotency_key,
                source_key,
                profile_id,
                occurred_at,
            } => {
                written += u64::from(
                    Self::insert_event_conversion(
                        conn,
                        idempotency_key,
                        source_key,
                        profile_id,
                        *occurred_at,
                        0,
                        "",
                    )
                    .await?,
                );
            }
        }
        Ok(written)
    }

    /// Records that `merged` now belong to `survivor`, keeping aliases flat.
    async fn apply_merge(
        conn: &mut AnyConnection,
        survivor: &str,
        merged: &[String],
    ) -> StoreResult<()> {
        for m in merged.iter().filter(|m| m.as_str() != survivor) {
            sqlx::query("UPDATE unit_aliases SET survivor_id = $1 WHERE survivor_id = $2")
                .bind(survivor)
                .bind(m)
                .execute(&mut *conn)
                .await?;
            sqlx::query(
                "INSERT INTO unit_aliases (alias_id, survivor_id) VALUES ($1, $2) \
                 ON CONFLICT (alias_id) DO UPDATE SET survivor_id = excluded.survivor_id",
            )
            .bind(m)
            .bind(survivor)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    /// Anonymises everything of the person `profile_id` (see
    /// [`ExperimentStore::apply_profile_changes`]).
    async fn apply_erasure(
        conn: &mut AnyConnection,
        profile_id: &str,
        now: i64,
    ) -> StoreResult<()> {
        let mut ids = vec![profile_id.to_owned()];
        for row in sqlx::query("SELECT alias_id FROM unit_aliases WHERE survivor_id = $1")
            .bind(profile_id)
            .fetch_all(&mut *conn)
            .await?
        {
            ids.push(row.try_get("alias_id")?);
        }
        let pseudonym = format!("erased:{}", uuid::Uuid::new_v4().simple());
        // Profile-keyed exposures: per experiment the earliest is the unit results count
        // (later ones were folded into it by the merge); it is kept under the pseudonym, the
        // folded ones are deleted.
        let mut by_experiment: HashMap<String, Vec<(i64, String)>> = HashMap::new();
        for id in &ids {
            for row in
                sqlx::query("SELECT experiment_key, exposed_at FROM exposures WHERE unit_id = $1")
                    .bind(id)
                    .fetch_all(&mut *conn)
                    .await?
            {
                by_experiment
                    .entry(row.try_get("experiment_key")?)
                    .or_default()
                    .push((row.try_get("exposed_at")?, id.clone()));
            }
        }
        for (experiment, mut rows) in by_experiment {
            rows.sort();
            for (i, (_, unit)) in rows.iter().enumerate() {
                if i == 0 {
                    sqlx::query(
                        "UPDATE exposures SET unit_id = $1, profile_id = $2 \
                         WHERE experiment_key = $3 AND unit_id = $4",
                    )
                    .bind(&pseudonym)
                    .bind(&pseudonym)
                    .bind(&experiment)
                    .bind(unit)
                    .execute(&mut *conn)
                    .await?;
                } else {
                    sqlx::query("DELETE FROM exposures WHERE experiment_key = $1 AND unit_id = $2")
                        .bind(&experiment)
                        .bind(unit)
                        .execute(&mut *conn)
                        .await?;
                }
            }
        }
        for id in &ids {
            // Exposures under another attribute (an anonymous id) that name the profile: the
            // unit id gets a pseudonym of its own, the profile the person's.
            let units: Vec<String> =
                sqlx::query("SELECT DISTINCT unit_id FROM exposures WHERE profile_id = $1")
                    .bind(id)
                    .fetch_all(&mut *conn)
                    .await?
                    .iter()
                    .map(|r| r.try_get("unit_id"))
                    .collect::<Result<_, _>>()?;
            for unit in units {
                let unit_pseudonym = format!("erased:{}", uuid::Uuid::new_v4().simple());
                sqlx::query(
                    "UPDATE exposures SET unit_id = $1, profile_id = $2 \
                     WHERE unit_id = $3 AND profile_id = $4",
                )
                .bind(&unit_pseudonym)
                .bind(&pseudonym)
                .bind(&unit)
                .bind(id)
                .execute(&mut *conn)
                .await?;
                let still_used = sqlx::query("SELECT unit_id FROM exposures WHERE unit_id = $1")
                    .bind(&unit)
                    .fetch_optional(&mut *conn)
                    .await?
                    .is_some();
                if !still_used {
                    sqlx::query(
                        "UPDATE conversion_units SET unit_id = $1 WHERE unit_id = $2 AND attribute <> $3",
                    )
                    .bind(&unit_pseudonym)
                    .bind(&unit)
                    .bind(PROFILE_ATTRIBUTE)
                    .execute(&mut *conn)
                    .await?;
                }
            }
            sqlx::query(
                "UPDATE conversion_units SET unit_id = $1 WHERE unit_id = $2 AND attribute = $3",
            )
            .bind(&pseudonym)
            .bind(id)
            .bind(PROFILE_ATTRIBUTE)
            .execute(&mut *conn)
            .await?;
            sqlx::query("UPDATE event_orders SET profile_id = $1 WHERE profile_id = $2")
                .bind(&pseudonym)
                .bind(id)
                .execute(&mut *conn)
                .await?;
            sqlx::query("DELETE FROM unit_aliases WHERE alias_id = $1 OR survivor_id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?;
            sqlx::query(
                "INSERT INTO erased_profiles (profile_id, erased_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(now)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    /// Fails with [`StoreError::VersionConflict`] unless `record` is at `based_on`.
    fn check_version(record: &ExperimentRecord, based_on: i64) -> StoreResult<()> {
        if record.version == based_on {
            Ok(())
        } else {
            Err(StoreError::VersionConflict {
                key: record.key.clone(),
                actual: record.version,
            })
        }
    }
}

#[async_trait]
impl ExperimentStore for SqlExperimentStore {
    async fn create(
        &self,
        record: &ExperimentRecord,
        metrics: &[(MetricDef, String)],
    ) -> StoreResult<(ExperimentRecord, bool)> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        let definition = encode_definition(&record.definition);
        let inserted = sqlx::query(
            "INSERT INTO experiments (key, definition, status, version, created_at, updated_at, stop_reason) \
             VALUES ($1, $2, $3, 1, $4, $5, '') ON CONFLICT DO NOTHING",
        )
        .bind(&record.key)
        .bind(&definition)
        .bind(Lifecycle::Draft.code())
        .bind(record.created_at)
        .bind(record.created_at)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        let stored = Self::get_in(conn, &record.key).await?;
        if inserted == 0 {
            return if encode_definition(&stored.definition) == definition {
                Ok((stored, false))
            } else {
                Err(StoreError::ExperimentExists(record.key.clone()))
            };
        }
        Self::register_metrics(conn, &record.key, metrics).await?;
        w.tx.commit().await?;
        Ok((stored, true))
    }

    async fn get(&self, key: &str) -> StoreResult<ExperimentRecord> {
        let mut conn = self.db.pool.acquire().await?;
        Self::get_in(&mut conn, key).await
    }

    async fn get_many(&self, keys: &[String]) -> StoreResult<Vec<ExperimentRecord>> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(LOOKUP_CHUNK) {
            let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT {EXPERIMENT_COLUMNS} FROM experiments WHERE key IN ({})",
                placeholders.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for k in chunk {
                q = q.bind(k.clone());
            }
            for row in q.fetch_all(&self.db.pool).await? {
                out.push(experiment_from_row(&row)?);
            }
        }
        Ok(out)
    }

    async fn list(
        &self,
        statuses: &[Lifecycle],
        after: &str,
        limit: i64,
    ) -> StoreResult<Vec<ExperimentRecord>> {
        let mut sql = format!("SELECT {EXPERIMENT_COLUMNS} FROM experiments WHERE key > $1");
        if !statuses.is_empty() {
            let placeholders: Vec<String> =
                (0..statuses.len()).map(|i| format!("${}", i + 2)).collect();
            sql.push_str(&format!(" AND status IN ({})", placeholders.join(", ")));
        }
        sql.push_str(&format!(
            " ORDER BY key LIMIT CAST(${} AS BIGINT)",
            statuses.len() + 2
        ));
        let mut q = sqlx::query(&sql).bind(after);
        for s in statuses {
            q = q.bind(s.code());
        }
        q = q.bind(limit);
        q.fetch_all(&self.db.pool)
            .await?
            .iter()
            .map(experiment_from_row)
            .collect()
    }

    async fn update(
        &self,
        key: &str,
        based_on: i64,
        definition: &pb::Experiment,
        metrics: &[(MetricDef, String)],
        now: i64,
    ) -> StoreResult<ExperimentRecord> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        let changed = sqlx::query(
            "UPDATE experiments SET definition = $1, version = version + 1, updated_at = $2 \
             WHERE key = $3 AND version = $4",
        )
        .bind(encode_definition(definition))
        .bind(now)
        .bind(key)
        .bind(based_on)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        let stored = Self::get_in(conn, key).await?;
        if changed == 0 {
            Self::check_version(&stored, based_on)?;
        }
        Self::register_metrics(conn, key, metrics).await?;
        w.tx.commit().await?;
        Ok(stored)
    }

    async fn start(&self, key: &str, based_on: i64, now: i64) -> StoreResult<ExperimentRecord> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        self.db.lock_id(conn, START_LOCK).await?;
        let current = Self::get_in(conn, key).await?;
        Self::check_version(&current, based_on)?;
        if let Some(ns) = &current.definition.namespace {
            let sql = format!(
                "SELECT {EXPERIMENT_COLUMNS} FROM experiments WHERE status = $1 AND key <> $2"
            );
            let rows = sqlx::query(&sql)
                .bind(Lifecycle::Running.code())
                .bind(key)
                .fetch_all(&mut *conn)
                .await?;
            for row in rows {
                let other = experiment_from_row(&row)?;
                if other.effective_status(now).0 != Lifecycle::Running {
                    continue;
                }
                if let Some(other_ns) = &other.definition.namespace
                    && ranges_overlap(ns, other_ns)
                {
                    return Err(StoreError::NamespaceOverlap {
                        namespace: ns.id.clone(),
                        other: other.key,
                    });
                }
            }
        }
        sqlx::query(
            "UPDATE experiments SET status = $1, start_time = $2, updated_at = $3, version = version + 1 \
             WHERE key = $4 AND version = $5",
        )
        .bind(Lifecycle::Running.code())
        .bind(now)
        .bind(now)
        .bind(key)
        .bind(based_on)
        .execute(&mut *conn)
        .await?;
        let stored = Self::get_in(conn, key).await?;
        w.tx.commit().await?;
        Ok(stored)
    }

    async fn stop(
        &self,
        key: &str,
        based_on: i64,
        released_variant: Option<i32>,
        reason: &str,
        now: i64,
    ) -> StoreResult<ExperimentRecord> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        let changed = sqlx::query(
            "UPDATE experiments SET status = $1, stop_time = $2, updated_at = $3, released_variant = $4, \
             stop_reason = $5, version = version + 1 WHERE key = $6 AND version = $7",
        )
        .bind(Lifecycle::Stopped.code())
        .bind(now)
        .bind(now)
        .bind(released_variant.map(i64::from))
        .bind(reason)
        .bind(key)
        .bind(based_on)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        let stored = Self::get_in(conn, key).await?;
        if changed == 0 {
            Self::check_version(&stored, based_on)?;
        }
        w.tx.commit().await?;
        Ok(stored)
    }

    async fn log_exposure(&self, exposure: &ExposureRecord) -> StoreResult<ExposureOutcome> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        let inserted = sqlx::query(
            "INSERT INTO exposures (experiment_key, unit_id, variant_index, exposed_at, profile_id, pre_period_value) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(&exposure.experiment_key)
        .bind(&exposure.unit_id)
        .bind(i64::from(exposure.variant_index))
        .bind(exposure.exposed_at)
        .bind(&exposure.profile_id)
        .bind(exposure.pre_period_value)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        let row = sqlx::query(
            "SELECT experiment_key, unit_id, variant_index, exposed_at, profile_id, pre_period_value \
             FROM exposures WHERE experiment_key = $1 AND unit_id = $2",
        )
        .bind(&exposure.experiment_key)
        .bind(&exposure.unit_id)
        .fetch_one(&mut *conn)
        .await?;
        let stored = exposure_from_row(&row)?;
        w.tx.commit().await?;
        Ok(ExposureOutcome {
            first: inserted == 1,
            exposure: stored,
        })
    }

    async fn exposures(
        &self,
        pairs: &[(String, String)],
    ) -> StoreResult<HashMap<(String, String), ExposureRecord>> {
        let mut out = HashMap::new();
        for chunk in pairs.chunks(LOOKUP_CHUNK / 2) {
            let mut sql = String::from(
                "SELECT experiment_key, unit_id, variant_index, exposed_at, profile_id, pre_period_value \
                 FROM exposures WHERE ",
            );
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push_str(" OR ");
                }
                sql.push_str(&format!(
                    "(experiment_key = ${} AND unit_id = ${})",
                    2 * i + 1,
                    2 * i + 2
                ));
            }
            let mut q = sqlx::query(&sql);
            for (experiment, unit) in chunk {
                q = q.bind(experiment.clone()).bind(unit.clone());
            }
            for row in q.fetch_all(&self.db.pool).await? {
                let e = exposure_from_row(&row)?;
                out.insert((e.experiment_key.clone(), e.unit_id.clone()), e);
            }
        }
        Ok(out)
    }

    async fn metric_def(&self, key: &str) -> StoreResult<Option<MetricDef>> {
        sqlx::query(
            "SELECT metric_key, metric_type, currency, event_derived, defined_by \
             FROM metric_defs WHERE metric_key = $1",
        )
        .bind(key)
        .fetch_optional(&self.db.pool)
        .await?
        .as_ref()
        .map(metric_def_from_row)
        .transpose()
    }

    async fn record_conversion(&self, conversion: &ConversionRecord) -> StoreResult<bool> {
        let fingerprint = conversion.fingerprint();
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        let inserted = sqlx::query(
            "INSERT INTO conversions (idempotency_key, metric_key, occurred_at, value_minor, currency, fingerprint, recorded_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .bind(&conversion.idempotency_key)
        .bind(&conversion.metric_key)
        .bind(conversion.occurred_at)
        .bind(conversion.value_minor)
        .bind(&conversion.currency)
        .bind(&fingerprint)
        .bind(clientele_runtime::time::now_micros())
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if inserted == 0 {
            let stored: String =
                sqlx::query("SELECT fingerprint FROM conversions WHERE idempotency_key = $1")
                    .bind(&conversion.idempotency_key)
                    .fetch_one(&mut *conn)
                    .await?
                    .try_get(0)?;
            return if stored == fingerprint {
                Ok(true)
            } else {
                Err(StoreError::IdempotencyConflict(
                    conversion.idempotency_key.clone(),
                ))
            };
        }
        for (attribute, unit_id) in &conversion.unit_ids {
            sqlx::query(
                "INSERT INTO conversion_units (idempotency_key, attribute, unit_id) VALUES ($1, $2, $3)",
            )
            .bind(&conversion.idempotency_key)
            .bind(attribute)
            .bind(unit_id)
            .execute(&mut *conn)
            .await?;
        }
        w.tx.commit().await?;
        Ok(false)
    }

    async fn aggregate(&self, query: &AggregateQuery) -> StoreResult<Vec<VariantAggregates>> {
        // `ex`: every exposure with its person (the surviving profile id when the hash
        // attribute is `profile_id`, else the unit id) and the id its conversions are keyed
        // by (`match_raw`). `units`: one exposure per person, the earliest. `conv`: the
        // metric's conversions with their person. Then per unit whether it converted within
        // its window and the sum of its values, and per variant the sums the statistics need.
        // Every sum is cast to a type sqlx::Any decodes on both engines (PostgreSQL's
        // SUM(bigint) is NUMERIC, which it cannot).
        let sql = "WITH ex AS ( \
               SELECT e.unit_id AS unit_id, e.variant_index AS v, e.exposed_at AS exposed_at, \
                      e.pre_period_value AS x, \
                      CASE WHEN $6 = 'profile_id' THEN COALESCE(ua.survivor_id, e.unit_id) \
                           ELSE e.unit_id END AS person, \
                      CASE WHEN $7 = 0 THEN e.unit_id \
                           WHEN e.profile_id <> '' THEN e.profile_id \
                           WHEN $6 = 'profile_id' THEN e.unit_id \
                           ELSE '' END AS match_raw \
               FROM exposures e LEFT JOIN unit_aliases ua ON ua.alias_id = e.unit_id \
               WHERE e.experiment_key = $1 \
             ), ranked AS ( \
               SELECT ex.*, ROW_NUMBER() OVER (PARTITION BY person ORDER BY exposed_at, unit_id) AS rn \
               FROM ex \
             ), units AS ( \
               SELECT r.person AS person, r.v AS v, r.x AS x, r.exposed_at AS exposed_at, \
                      CASE WHEN $2 = 'profile_id' THEN COALESCE(ma.survivor_id, r.match_raw) \
                           ELSE r.match_raw END AS m \
               FROM ranked r LEFT JOIN unit_aliases ma ON ma.alias_id = r.match_raw \
               WHERE r.rn = 1 \
             ), conv AS ( \
               SELECT CASE WHEN $2 = 'profile_id' THEN COALESCE(ca.survivor_id, cu.unit_id) \
                           ELSE cu.unit_id END AS m, \
                      cv.occurred_at AS occurred_at, cv.value_minor AS value_minor \
               FROM conversions cv \
               JOIN conversion_units cu ON cu.idempotency_key = cv.idempotency_key \
               LEFT JOIN unit_aliases ca ON ca.alias_id = cu.unit_id \
               WHERE cv.metric_key = $3 AND cu.attribute = $2 AND ($5 = '' OR cv.currency = $5) \
             ), per_unit AS ( \
               SELECT u.v AS v, CAST(u.x AS DOUBLE PRECISION) AS x, \
                      CASE WHEN COUNT(c.m) = 0 THEN 0 ELSE 1 END AS c, \
                      CAST(COALESCE(SUM(c.value_minor), 0) AS DOUBLE PRECISION) AS y \
               FROM units u LEFT JOIN conv c ON c.m = u.m AND u.m <> '' \
                    AND c.occurred_at >= u.exposed_at \
                    AND c.occurred_at <= u.exposed_at + CAST($4 AS BIGINT) \
               GROUP BY u.person, u.v, u.x \
             ) \
             SELECT v, COUNT(*) AS units, CAST(SUM(c) AS BIGINT) AS converted, \
                    CAST(SUM(y) AS DOUBLE PRECISION) AS sum_y, \
                    CAST(SUM(y * y) AS DOUBLE PRECISION) AS sum_yy, \
                    CAST(SUM(x) AS DOUBLE PRECISION) AS sum_x, \
                    CAST(SUM(x * x) AS DOUBLE PRECISION) AS sum_xx, \
                    CAST(SUM(x * y) AS DOUBLE PRECISION) AS sum_xy, \
                    CAST(SUM(x * c) AS DOUBLE PRECISION) AS sum_xc \
             FROM per_unit GROUP BY v ORDER BY v";
        let conversion_attribute = if query.event_derived {
            PROFILE_ATTRIBUTE
        } else {
            query.hash_attribute.as_str()
        };
        let rows = sqlx::query(sql)
            .bind(&query.experiment_key)
            .bind(conversion_attribute)
            .bind(&query.metric_key)
            .bind(query.window_micros)
            .bind(query.currency.clone().unwrap_or_default())
            .bind(&query.hash_attribute)
            .bind(i64::from(query.event_derived))
            .fetch_all(&self.db.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let variant: i64 = row.try_get("v")?;
                let units: i64 = row.try_get("units")?;
                let converted: i64 = row.try_get("converted")?;
                Ok(VariantAggregates {
                    variant: i32::try_from(variant).map_err(corrupt)?,
                    units: u64::try_from(units).map_err(corrupt)?,
                    converted: u64::try_from(converted).map_err(corrupt)?,
                    sum_value: row.try_get("sum_y")?,
                    sum_value_squares: row.try_get("sum_yy")?,
                    sum_x: row.try_get("sum_x")?,
                    sum_x_squares: row.try_get("sum_xx")?,
                    sum_x_value: row.try_get("sum_xy")?,
                    sum_x_converted: row.try_get("sum_xc")?,
                })
            })
            .collect()
    }

    async fn feed_cursor(&self, feed: &str) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query("SELECT feed_cursor FROM feed_cursors WHERE feed = $1")
                .bind(feed)
                .fetch_optional(&self.db.pool)
                .await?
                .map(|r| r.try_get("feed_cursor"))
                .transpose()?,
        )
    }

    async fn apply_events(
        &self,
        feed: &str,
        expected: Option<&str>,
        cursor: &str,
        facts: &[EventFact],
    ) -> StoreResult<u64> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        Self::advance_cursor(conn, feed, expected, cursor).await?;
        let mut written = 0;
        for fact in facts {
            written += Self::apply_fact(conn, fact).await?;
        }
        w.tx.commit().await?;
        Ok(written)
    }

    async fn apply_profile_changes(
        &self,
        feed: &str,
        expected: Option<&str>,
        cursor: &str,
        changes: &[ProfileChange],
        now: i64,
    ) -> StoreResult<()> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        Self::advance_cursor(conn, feed, expected, cursor).await?;
        for change in changes {
            match change {
                ProfileChange::Merged { survivor, merged } => {
                    Self::apply_merge(conn, survivor, merged).await?;
                }
                ProfileChange::Erased(profile_id) => {
                    Self::apply_erasure(conn, profile_id, now).await?;
                }
            }
        }
        w.tx.commit().await?;
        Ok(())
    }
}
