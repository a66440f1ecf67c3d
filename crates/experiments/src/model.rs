//! Records the experiment store reads and writes. Times are µs since the Unix epoch.

use std::collections::BTreeMap;

use clientele_proto::v1 as pb;

/// Lifecycle of an experiment; the codes equal `clientele.v1.ExperimentStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lifecycle {
    /// Being designed; assigns nobody.
    Draft,
    /// Assigning units and collecting data.
    Running,
    /// Finished. Final.
    Stopped,
}

impl Lifecycle {
    /// The stored (and protobuf) code.
    #[must_use]
    pub fn code(self) -> i64 {
        match self {
            Self::Draft => 1,
            Self::Running => 2,
            Self::Stopped => 3,
        }
    }

    /// The lifecycle of a stored code.
    #[must_use]
    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            1 => Some(Self::Draft),
            2 => Some(Self::Running),
            3 => Some(Self::Stopped),
            _ => None,
        }
    }

    /// The protobuf enum value.
    #[must_use]
    pub fn to_proto(self) -> pb::ExperimentStatus {
        match self {
            Self::Draft => pb::ExperimentStatus::Draft,
            Self::Running => pb::ExperimentStatus::Running,
            Self::Stopped => pb::ExperimentStatus::Stopped,
        }
    }
}

/// A stored experiment.
#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentRecord {
    /// The experiment key.
    pub key: String,
    /// The configuration: an `Experiment` with every output-only field cleared.
    pub definition: pb::Experiment,
    /// Stored lifecycle (see [`ExperimentRecord::effective_status`] for the planned end).
    pub status: Lifecycle,
    /// 1 on create, +1 per change (update, start, stop).
    pub version: i64,
    /// When created.
    pub created_at: i64,
    /// When last changed.
    pub updated_at: i64,
    /// When it started running.
    pub start_time: Option<i64>,
    /// When it was stopped.
    pub stop_time: Option<i64>,
    /// The variant released to everyone at stop.
    pub released_variant: Option<i32>,
    /// Why it was stopped, for audit.
    pub stop_reason: String,
}

impl ExperimentRecord {
    /// The planned end (`end_time`), µs.
    #[must_use]
    pub fn end_time(&self) -> Option<i64> {
        self.definition
            .end_time
            .as_ref()
            .and_then(clientele_runtime::time::micros)
    }

    /// Status and stop time as of `now`: a RUNNING experiment past its planned end is
    /// STOPPED at `end_time` (without a released variant), without anyone having to write it.
    #[must_use]
    pub fn effective_status(&self, now: i64) -> (Lifecycle, Option<i64>) {
        match (self.status, self.end_time()) {
            (Lifecycle::Running, Some(end)) if end <= now => (Lifecycle::Stopped, Some(end)),
            (status, _) => (status, self.stop_time),
        }
    }
}

/// A unit's first exposure to an experiment.
#[derive(Debug, Clone, PartialEq)]
pub struct ExposureRecord {
    /// The experiment key.
    pub experiment_key: String,
    /// Value of the experiment's hash attribute.
    pub unit_id: String,
    /// The variant shown, recorded for good (sticky).
    pub variant_index: i32,
    /// When first exposed.
    pub exposed_at: i64,
    /// The unit's profile id, or empty.
    pub profile_id: String,
    /// The CUPED covariate (pre-experiment value), 0 when unknown.
    pub pre_period_value: f64,
}

/// Result of logging an exposure.
#[derive(Debug, Clone, PartialEq)]
pub struct ExposureOutcome {
    /// True if this call recorded the first exposure.
    pub first: bool,
    /// The stored (first) exposure.
    pub exposure: ExposureRecord,
}

/// How a metric is defined, shared by every experiment using its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricDef {
    /// The metric key.
    pub key: String,
    /// `clientele.v1.MetricType` code.
    pub metric_type: i32,
    /// ISO 4217 code for CONTINUOUS metrics, empty for BINARY.
    pub currency: String,
    /// True when conversions come from ingested events rather than RecordConversion.
    pub event_derived: bool,
    /// The experiment that first defined it.
    pub defined_by: String,
}

/// One conversion, exactly once per `idempotency_key`.
///
/// Conversions derived from ingested events are written by
/// [`crate::store::ExperimentStore::apply_events`] under event source keys (see
/// [`crate::events`]); this record is the RecordConversion path.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversionRecord {
    /// Exactly-once key, 1..=128 printable ASCII bytes.
    pub idempotency_key: String,
    /// The metric key.
    pub metric_key: String,
    /// Unit ids by hash attribute (`profile_id`, `anonymous_id`, …).
    pub unit_ids: BTreeMap<String, String>,
    /// When it happened.
    pub occurred_at: i64,
    /// Value in minor units of `currency` (0 for binary metrics).
    pub value_minor: i64,
    /// ISO 4217 code of the value, empty when there is none.
    pub currency: String,
}

impl ConversionRecord {
    /// The canonical request, compared when a key is reused: equal fingerprints are a replay,
    /// different ones a conflict.
    #[must_use]
    pub fn fingerprint(&self) -> String {
        let mut s = format!(
            "v1|{}|{}|{}|{}",
            self.metric_key, self.occurred_at, self.value_minor, self.currency
        );
        for (attribute, id) in &self.unit_ids {
            s.push('|');
            s.push_str(&attribute.len().to_string());
            s.push(':');
            s.push_str(attribute);
            s.push('=');
            s.push_str(id);
        }
        s
    }
}

/// What one metric's per-variant aggregate query needs.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateQuery {
    /// The experiment.
    pub experiment_key: String,
    /// Its hash attribute: conversions match exposures by the unit id under this attribute.
    pub hash_attribute: String,
    /// The metric.
    pub metric_key: String,
    /// Conversions count within `[exposed_at, exposed_at + window]`, µs.
    pub window_micros: i64,
    /// For CONTINUOUS metrics, only values in this currency count; `None` for BINARY.
    pub currency: Option<String>,
    /// True for event-derived metrics: conversions are keyed by profile id (`metric_key` is
    /// then the event source key, see [`crate::events`]) and match each exposure's profile
    /// (its `profile_id`, or its unit id when the hash attribute is `profile_id`), following
    /// merges. False: conversions match the unit id under `hash_attribute`.
    pub event_derived: bool,
}

/// A merge or an erasure from ProfileService's changes feed (shared with the other
/// consumers of that feed).
pub use clientele_runtime::feed::IdentityChange as ProfileChange;

/// Sufficient statistics of one variant for one metric, straight from SQL aggregates.
/// Per unit: `c` = converted at least once (0/1), `v` = sum of conversion values (minor
/// units), `x` = the CUPED covariate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VariantAggregates {
    /// Variant index.
    pub variant: i32,
    /// Exposed units.
    pub units: u64,
    /// `Σ c`.
    pub converted: u64,
    /// `Σ v`.
    pub sum_value: f64,
    /// `Σ v²`.
    pub sum_value_squares: f64,
    /// `Σ x`.
    pub sum_x: f64,
    /// `Σ x²`.
    pub sum_x_squares: f64,
    /// `Σ x v`.
    pub sum_x_value: f64,
    /// `Σ x c`.
    pub sum_x_converted: f64,
}

impl VariantAggregates {
    /// No units.
    #[must_use]
    pub fn empty(variant: i32) -> Self {
        Self {
            variant,
            units: 0,
            converted: 0,
            sum_value: 0.0,
            sum_value_squares: 0.0,
            sum_x: 0.0,
            sum_x_squares: 0.0,
            sum_x_value: 0.0,
            sum_x_converted: 0.0,
        }
    }
}
