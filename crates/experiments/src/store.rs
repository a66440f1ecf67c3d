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

use crate::model::{
    AggregateQuery, ConversionRecord, ExperimentRecord, ExposureOutcome, ExposureRecord, Lifecycle,
    MetricDef, VariantAggregates,
};

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
    async fn aggregate(&self, query: &AggregateQuery) -> StoreResult<Vec<VariantAggregates>>;
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
        // Per unit: whether it converted within its window and the sum of its values; then
        // per variant the sums the statistics need. Every sum is cast to a type sqlx::Any
        // decodes on both engines (PostgreSQL's SUM(bigint) is NUMERIC, which it cannot).
        // Parameters appear in order ($1..$5) for SQLite's positional binding.
        let sql = "WITH per_unit AS ( \
               SELECT e.variant_index AS v, \
                      CAST(e.pre_period_value AS DOUBLE PRECISION) AS x, \
                      CASE WHEN u.n IS NULL THEN 0 ELSE 1 END AS c, \
                      CAST(COALESCE(u.total, 0) AS DOUBLE PRECISION) AS y \
               FROM exposures e LEFT JOIN ( \
                   SELECT e2.unit_id AS unit_id, COUNT(*) AS n, SUM(cv.value_minor) AS total \
                   FROM exposures e2 \
                   JOIN conversion_units cu ON cu.unit_id = e2.unit_id \
                   JOIN conversions cv ON cv.idempotency_key = cu.idempotency_key \
                   WHERE e2.experiment_key = $1 AND cu.attribute = $2 AND cv.metric_key = $3 \
                     AND cv.occurred_at >= e2.exposed_at \
                     AND cv.occurred_at <= e2.exposed_at + CAST($4 AS BIGINT) \
                     AND ($5 = '' OR cv.currency = $5) \
                   GROUP BY e2.unit_id \
               ) u ON u.unit_id = e.unit_id \
               WHERE e.experiment_key = $1 \
             ) \
             SELECT v, COUNT(*) AS units, CAST(SUM(c) AS BIGINT) AS converted, \
                    CAST(SUM(y) AS DOUBLE PRECISION) AS sum_y, \
                    CAST(SUM(y * y) AS DOUBLE PRECISION) AS sum_yy, \
                    CAST(SUM(x) AS DOUBLE PRECISION) AS sum_x, \
                    CAST(SUM(x * x) AS DOUBLE PRECISION) AS sum_xx, \
                    CAST(SUM(x * y) AS DOUBLE PRECISION) AS sum_xy, \
                    CAST(SUM(x * c) AS DOUBLE PRECISION) AS sum_xc \
             FROM per_unit GROUP BY v ORDER BY v";
        let rows = sqlx::query(sql)
            .bind(&query.experiment_key)
            .bind(&query.hash_attribute)
            .bind(&query.metric_key)
            .bind(query.window_micros)
            .bind(query.currency.clone().unwrap_or_default())
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
}
