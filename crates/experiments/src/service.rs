//! The tonic implementation of `clientele.v1.ExperimentService`: validates every request (bad
//! input is INVALID_ARGUMENT naming the field, and nothing is written), assigns with the
//! GrowthBook-compatible [`crate::assignment`], records first exposures (sticky) and
//! conversions exactly once through the [`ExperimentStore`], and analyses results from SQL
//! aggregates with [`crate::stats`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clientele_proto::v1 as pb;
use clientele_proto::v1::experiment_service_server::{ExperimentService, ExperimentServiceServer};
use clientele_runtime::server::Mount;
use clientele_runtime::status::{invalid_field, not_found};
use clientele_runtime::time::{micros, now_micros, timestamp};
use tonic::{Request, Response, Status};

use crate::assignment::{Assignment, Exclusion, assign_variant, in_namespace};
use crate::cache::DefinitionCache;
use crate::definition::{self, FieldError, TargetingFacts};
use crate::holdout::HoldoutConfig;
use crate::model::{AggregateQuery, ConversionRecord, ExperimentRecord, ExposureRecord, Lifecycle};
use crate::results;
use crate::store::{ExperimentStore, StoreError};

/// Most experiments one BatchAssign evaluates.
pub const MAX_BATCH_EXPERIMENTS: usize = 200;
/// Most unit ids (by attribute) in one BatchAssign or RecordConversion.
pub const MAX_UNIT_IDS: usize = 8;
/// Longest unit id, bytes.
pub const MAX_UNIT_ID_BYTES: usize = 256;
/// Most targeting attributes per request.
pub const MAX_ATTRIBUTES: usize = 64;
/// How far in the future a client clock may be, µs.
pub const MAX_CLOCK_SKEW_MICROS: i64 = 5 * 60 * 1_000_000;
/// Default and largest ListExperiments page.
const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 500;
/// Compare-and-swap retries of a lifecycle change before giving up with ABORTED.
const CAS_RETRIES: usize = 5;

/// Maps store failures to precise statuses; database details are logged, not returned.
impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(key) => not_found("experiment", &key),
            StoreError::ExperimentExists(_) | StoreError::IdempotencyConflict(_) => {
                Status::already_exists(e.to_string())
            }
            StoreError::VersionConflict { .. } => Status::aborted(e.to_string()),
            StoreError::NamespaceOverlap { .. } => Status::failed_precondition(e.to_string()),
            StoreError::MetricConflict { ref field, .. } => {
                invalid_field(&field.clone(), e.to_string())
            }
            StoreError::Db(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) => {
                tracing::error!(error = %e, "database unavailable");
                Status::unavailable("database unavailable; retry")
            }
            other => {
                tracing::error!(error = %other, "experiment store failure");
                Status::internal("internal error")
            }
        }
    }
}

impl From<FieldError> for Status {
    fn from(e: FieldError) -> Self {
        invalid_field(&e.field, e.message)
    }
}

/// The ExperimentService.
#[derive(Debug, Clone)]
pub struct ExperimentServiceImpl {
    store: Arc<dyn ExperimentStore>,
    holdout: HoldoutConfig,
    /// Definitions Assign and BatchAssign read; `None` reads the database every time.
    definitions: Option<Arc<DefinitionCache>>,
}

fn required_key(field: &str, key: &str) -> Result<(), Status> {
    if definition::is_key(key) {
        Ok(())
    } else if key.is_empty() {
        Err(invalid_field(field, "required"))
    } else {
        Err(invalid_field(field, "must match [a-z0-9][a-z0-9_.-]{0,63}"))
    }
}

fn check_unit_id(field: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > MAX_UNIT_ID_BYTES {
        return Err(invalid_field(
            field,
            format!("must be 1 to {MAX_UNIT_ID_BYTES} bytes"),
        ));
    }
    Ok(())
}

fn check_profile_id(field: &str, id: &str) -> Result<String, Status> {
    if id.is_empty() {
        return Ok(String::new());
    }
    uuid::Uuid::parse_str(id)
        .map(|u| u.to_string())
        .map_err(|_| invalid_field(field, format!("`{id}` is not a UUID")))
}

fn check_unit_ids(field: &str, ids: &HashMap<String, String>) -> Result<(), Status> {
    if ids.is_empty() || ids.len() > MAX_UNIT_IDS {
        return Err(invalid_field(
            field,
            format!("1 to {MAX_UNIT_IDS} unit ids are required"),
        ));
    }
    for (attribute, id) in ids {
        let f = format!("{field}[\"{attribute}\"]");
        if !definition::is_attribute_name(attribute) {
            return Err(invalid_field(
                &f,
                "attribute must match [a-z][a-z0-9_]{0,63}",
            ));
        }
        check_unit_id(&f, id)?;
    }
    Ok(())
}

fn check_time(
    field: &str,
    ts: Option<&prost_types::Timestamp>,
    now: i64,
) -> Result<Option<i64>, Status> {
    let Some(ts) = ts else { return Ok(None) };
    let t = micros(ts).ok_or_else(|| invalid_field(field, "timestamp out of range"))?;
    if t > now + MAX_CLOCK_SKEW_MICROS {
        return Err(invalid_field(field, "more than 5 minutes in the future"));
    }
    Ok(Some(t))
}

fn attribute_value(field: &str, v: &pb::Value) -> Result<clientele_rules::Value, Status> {
    use clientele_rules::Value;
    use pb::value::Kind;
    match &v.kind {
        None => Err(invalid_field(field, "value has no kind set")),
        Some(Kind::StringValue(s)) if s.len() > 1024 => {
            Err(invalid_field(field, "string longer than 1024 bytes"))
        }
        Some(Kind::StringValue(s)) => Ok(Value::String(s.clone())),
        #[allow(clippy::cast_precision_loss)]
        Some(Kind::IntValue(i)) => Ok(Value::Number(*i as f64)),
        Some(Kind::DoubleValue(d)) if !d.is_finite() => {
            Err(invalid_field(field, "double must be finite"))
        }
        Some(Kind::DoubleValue(d)) => Ok(Value::Number(*d)),
        Some(Kind::BoolValue(b)) => Ok(Value::Bool(*b)),
        // Rules compare numbers: a timestamp is read as seconds since the epoch.
        #[allow(clippy::cast_precision_loss)]
        Some(Kind::TimestampValue(t)) => micros(t)
            .map(|m| Value::Number(m as f64 / 1e6))
            .ok_or_else(|| invalid_field(field, "timestamp out of range")),
    }
}

/// Validates attributes and context into the facts targeting reads.
fn targeting_facts(
    attributes: &HashMap<String, pb::Value>,
    context: Option<&pb::TargetingContext>,
) -> Result<TargetingFacts, Status> {
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(invalid_field(
            "attributes",
            format!("at most {MAX_ATTRIBUTES} attributes"),
        ));
    }
    let mut facts = TargetingFacts::default();
    for (k, v) in attributes {
        let f = format!("attributes[\"{k}\"]");
        if k.is_empty()
            || k.len() > 64
            || !k
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
        {
            return Err(invalid_field(&f, "key must match [a-z0-9_.]{1,64}"));
        }
        facts.attributes.insert(k.clone(), attribute_value(&f, v)?);
    }
    if let Some(ctx) = context {
        for (i, s) in ctx.segments.iter().enumerate() {
            if s.segment_id.is_empty() {
                return Err(invalid_field(
                    &format!("context.segments[{i}].segment_id"),
                    "required",
                ));
            }
        }
        facts.segments = Some(ctx.segments.clone());
        facts.tier = (!ctx.tier_id.is_empty()).then(|| ctx.tier_id.clone());
    }
    Ok(facts)
}

fn assignment_with(
    record: &ExperimentRecord,
    unit_id: &str,
    reason: pb::AssignmentReason,
    variant: i32,
    bucket: f64,
) -> pb::Assignment {
    let variant_key = usize::try_from(variant)
        .ok()
        .and_then(|i| record.definition.variants.get(i))
        .map(|v| v.key.clone())
        .unwrap_or_default();
    pb::Assignment {
        experiment_key: record.key.clone(),
        in_experiment: reason == pb::AssignmentReason::Assigned,
        variant_index: variant,
        variant_key,
        reason: reason as i32,
        bucket,
        hash_attribute: record.definition.hash_attribute.clone(),
        unit_id: unit_id.to_owned(),
    }
}

fn variant_i32(i: usize) -> i32 {
    i32::try_from(i).unwrap_or(i32::MAX)
}

/// Converts a stored experiment to its protobuf form as of `now`.
pub fn to_proto(r: &ExperimentRecord, now: i64) -> pb::Experiment {
    let (status, stop_time) = r.effective_status(now);
    pb::Experiment {
        status: status.to_proto() as i32,
        start_time: r.start_time.map(timestamp),
        stop_time: stop_time.map(timestamp),
        released_variant_index: r.released_variant,
        version: r.version,
        create_time: Some(timestamp(r.created_at)),
        update_time: Some(timestamp(r.updated_at)),
        ..r.definition.clone()
    }
}

fn lifecycle_of(field: &str, code: i32) -> Result<Lifecycle, Status> {
    Lifecycle::from_code(i64::from(code)).ok_or_else(|| invalid_field(field, "unknown status"))
}

/// Update-mask paths and whether each may change while RUNNING.
const UPDATABLE: &[(&str, bool)] = &[
    ("display_name", true),
    ("hypothesis", true),
    ("variants", true),
    ("coverage", true),
    ("hash_version", false),
    ("seed", false),
    ("hash_attribute", false),
    ("targeting", false),
    ("namespace", false),
    ("holdout", false),
    ("primary_metric", false),
    ("guardrail_metrics", true),
    ("end_time", true),
];

impl ExperimentServiceImpl {
    /// A service over `store` with the global `holdout`.
    pub fn new(store: Arc<dyn ExperimentStore>, holdout: HoldoutConfig) -> Self {
        Self {
            store,
            holdout,
            definitions: None,
        }
    }

    /// Serves Assign and BatchAssign from an in-process cache of definitions that is at most
    /// `ttl` stale for changes made by other processes and never stale for this process's own
    /// writes (see [`crate::cache`]). A zero `ttl` turns the cache off.
    #[must_use]
    pub fn with_definition_cache(mut self, ttl: Duration) -> Self {
        self.definitions = (!ttl.is_zero()).then(|| Arc::new(DefinitionCache::new(ttl)));
        self
    }

    /// Drops `key` from the definition cache after a write of this process.
    fn invalidate(&self, key: &str) {
        if let Some(cache) = &self.definitions {
            cache.invalidate(key);
        }
    }

    /// The definition of `key` for assignment, from the cache when within its bound.
    async fn definition(&self, key: &str) -> Result<Arc<ExperimentRecord>, StoreError> {
        let Some(cache) = &self.definitions else {
            return self.store.get(key).await.map(Arc::new);
        };
        let started = Instant::now();
        if let Some(record) = cache.lookup(key, started) {
            return Ok(record);
        }
        let epoch = cache.epoch();
        let record = Arc::new(self.store.get(key).await?);
        cache.insert(record.clone(), started, epoch);
        Ok(record)
    }

    /// The definitions among `keys` that exist, for assignment, from the cache when within
    /// their bound.
    async fn definitions(&self, keys: &[String]) -> Result<Vec<ExperimentRecord>, StoreError> {
        let Some(cache) = &self.definitions else {
            return self.store.get_many(keys).await;
        };
        let started = Instant::now();
        let mut found = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        let mut seen = std::collections::HashSet::with_capacity(keys.len());
        for key in keys.iter().filter(|k| seen.insert(k.as_str())) {
            match cache.lookup(key, started) {
                Some(r) => found.push(ExperimentRecord::clone(&r)),
                None => missing.push(key.clone()),
            }
        }
        if !missing.is_empty() {
            let epoch = cache.epoch();
            for r in self.store.get_many(&missing).await? {
                cache.insert(Arc::new(r.clone()), started, epoch);
                found.push(r);
            }
        }
        Ok(found)
    }

    /// The store (shared with the feed consumer).
    pub fn store(&self) -> Arc<dyn ExperimentStore> {
        self.store.clone()
    }

    /// The global holdout configuration in force.
    pub fn holdout(&self) -> &HoldoutConfig {
        &self.holdout
    }

    /// Mounts the service with the scope each method needs.
    pub fn mount(self, mount: &mut Mount) {
        mount.add(
            "clientele.v1.ExperimentService",
            ExperimentServiceServer::new(self),
            &[
                ("CreateExperiment", "experiments:admin"),
                ("UpdateExperiment", "experiments:admin"),
                ("StartExperiment", "experiments:admin"),
                ("StopExperiment", "experiments:admin"),
                ("GetExperiment", "experiments:read"),
                ("ListExperiments", "experiments:read"),
                ("GetResults", "experiments:read"),
                ("GetHoldout", "experiments:read"),
                ("IsInHoldout", "experiments:read"),
                ("Assign", "experiments:write"),
                ("BatchAssign", "experiments:write"),
                ("LogExposure", "experiments:write"),
                ("RecordConversion", "experiments:write"),
            ],
        );
    }

    /// Assigns `unit_id` (empty: no id for the hash attribute) to `record` as of `now`.
    /// `sticky` is the unit's recorded first exposure, if any.
    fn decide(
        &self,
        record: &ExperimentRecord,
        unit_id: &str,
        profile_id: &str,
        facts: &TargetingFacts,
        sticky: Option<&ExposureRecord>,
        now: i64,
    ) -> pb::Assignment {
        use pb::AssignmentReason as R;
        let def = &record.definition;
        match record.effective_status(now).0 {
            Lifecycle::Running => {}
            Lifecycle::Stopped if record.released_variant.is_some() => {
                let v = record.released_variant.unwrap_or(0);
                return assignment_with(record, unit_id, R::Released, v, 0.0);
            }
            Lifecycle::Draft | Lifecycle::Stopped => {
                return assignment_with(record, unit_id, R::NotRunning, 0, 0.0);
            }
        }
        if unit_id.is_empty() {
            return assignment_with(record, unit_id, R::MissingUnitId, 0, 0.0);
        }
        let spec = definition::spec(def);
        let bucket = crate::assignment::bucket(spec.effective_seed(), unit_id, spec.hash_version);
        if let Some(e) = sticky {
            return assignment_with(record, unit_id, R::Assigned, e.variant_index, bucket);
        }
        if def.holdout == pb::HoldoutParticipation::Exclude as i32 {
            let holdout_unit = if profile_id.is_empty() {
                unit_id
            } else {
                profile_id
            };
            if self.holdout.contains(holdout_unit) {
                return assignment_with(record, unit_id, R::GlobalHoldout, 0, bucket);
            }
        }
        if let Some(ns) = &spec.namespace
            && !in_namespace(unit_id, (&ns.id, ns.start, ns.end))
        {
            return assignment_with(record, unit_id, R::NotInNamespace, 0, bucket);
        }
        if !definition::targeting_matches(def.targeting.as_ref(), facts) {
            return assignment_with(record, unit_id, R::TargetingNotMatched, 0, bucket);
        }
        match assign_variant(&spec, unit_id) {
            Assignment::InExperiment { variant, bucket } => {
                assignment_with(record, unit_id, R::Assigned, variant_i32(variant), bucket)
            }
            Assignment::NotInExperiment(Exclusion::OutsideNamespace) => {
                assignment_with(record, unit_id, R::NotInNamespace, 0, bucket)
            }
            Assignment::NotInExperiment(Exclusion::EmptyUnitId) => {
                assignment_with(record, unit_id, R::MissingUnitId, 0, bucket)
            }
            Assignment::NotInExperiment(_) => {
                assignment_with(record, unit_id, R::NotInCoverage, 0, bucket)
            }
        }
    }

    /// Runs `op` on a fresh read of `key` until its compare-and-swap wins. `op` returns the
    /// changed record, or `None` when nothing needs to change. Each attempt drops `key` from
    /// the definition cache, so the next Assign sees the change.
    async fn with_cas<F, Fut>(&self, key: &str, mut op: F) -> Result<ExperimentRecord, Status>
    where
        F: FnMut(ExperimentRecord) -> Fut,
        Fut: std::future::Future<Output = Result<Option<ExperimentRecord>, CasError>>,
    {
        for _ in 0..CAS_RETRIES {
            let current = self.store.get(key).await?;
            let outcome = op(current.clone()).await;
            // Whatever the outcome, the next Assign of this process reads the database.
            self.invalidate(key);
            match outcome {
                Ok(Some(r)) => return Ok(r),
                Ok(None) => return Ok(current),
                Err(CasError::Retry) => {}
                Err(CasError::Fail(status)) => return Err(status),
            }
        }
        Err(Status::aborted(format!(
            "experiment `{key}` kept changing concurrently; retry"
        )))
    }
}

/// How a compare-and-swap step ends when it does not succeed.
#[derive(Debug)]
enum CasError {
    /// The record changed since it was read: read again and retry.
    Retry,
    /// Give up with this status.
    Fail(Status),
}

impl From<StoreError> for CasError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::VersionConflict { .. } => Self::Retry,
            other => Self::Fail(other.into()),
        }
    }
}

impl From<Status> for CasError {
    fn from(s: Status) -> Self {
        Self::Fail(s)
    }
}

fn failed(msg: impl Into<String>) -> CasError {
    CasError::Fail(Status::failed_precondition(msg.into()))
}

#[tonic::async_trait]
impl ExperimentService for ExperimentServiceImpl {
    async fn create_experiment(
        &self,
        request: Request<pb::CreateExperimentRequest>,
    ) -> Result<Response<pb::CreateExperimentResponse>, Status> {
        let now = now_micros();
        let req = request.into_inner();
        let e = req
            .experiment
            .ok_or_else(|| invalid_field("experiment", "required"))?;
        let def = definition::normalise("experiment", &e, now)?;
        let metrics = definition::metric_defs("experiment", &def);
        let record = ExperimentRecord {
            key: def.key.clone(),
            definition: def,
            status: Lifecycle::Draft,
            version: 1,
            created_at: now,
            updated_at: now,
            start_time: None,
            stop_time: None,
            released_variant: None,
            stop_reason: String::new(),
        };
        let (stored, _created) = self.store.create(&record, &metrics).await?;
        self.invalidate(&stored.key);
        Ok(Response::new(pb::CreateExperimentResponse {
            experiment: Some(to_proto(&stored, now)),
        }))
    }

    async fn update_experiment(
        &self,
        request: Request<pb::UpdateExperimentRequest>,
    ) -> Result<Response<pb::UpdateExperimentResponse>, Status> {
        let now = now_micros();
        let req = request.into_inner();
        let patch = req
            .experiment
            .ok_or_else(|| invalid_field("experiment", "required"))?;
        required_key("experiment.key", &patch.key)?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            return Err(invalid_field(
                "update_mask.paths",
                "at least one path is required",
            ));
        }
        for (i, p) in paths.iter().enumerate() {
            if !UPDATABLE.iter().any(|(name, _)| name == p) {
                return Err(invalid_field(
                    &format!("update_mask.paths[{i}]"),
                    format!("`{p}` cannot be updated"),
                ));
            }
        }
        if req.expected_version < 0 {
            return Err(invalid_field("expected_version", "must not be negative"));
        }
        let key = patch.key.clone();
        let updated = self
            .with_cas(&key, |current| {
                let store = self.store.clone();
                let patch = patch.clone();
                let paths = paths.clone();
                async move {
                    if req.expected_version > 0 && current.version != req.expected_version {
                        return Err(CasError::Fail(Status::aborted(format!(
                            "experiment `{}` is at version {}, not {}",
                            current.key, current.version, req.expected_version
                        ))));
                    }
                    let status = current.effective_status(now).0;
                    let mut next = current.definition.clone();
                    for p in &paths {
                        let while_running = UPDATABLE
                            .iter()
                            .any(|(name, ok)| name == p && *ok);
                        match status {
                            Lifecycle::Stopped => {
                                return Err(failed(format!(
                                    "experiment `{}` is stopped; it cannot change",
                                    current.key
                                )));
                            }
                            Lifecycle::Running if !while_running => {
                                return Err(failed(format!(
                                    "`{p}` cannot change once experiment `{}` has started",
                                    current.key
                                )));
                            }
                            _ => {}
                        }
                        match p.as_str() {
                            "display_name" => next.display_name.clone_from(&patch.display_name),
                            "hypothesis" => next.hypothesis.clone_from(&patch.hypothesis),
                            "variants" => {
                                if status == Lifecycle::Running {
                                    let same_arms = patch.variants.len() == next.variants.len()
                                        && patch.variants.iter().zip(&next.variants).all(|(a, b)| {
                                            a.key == b.key && a.name == b.name
                                        });
                                    if !same_arms {
                                        return Err(failed(format!(
                                            "only variant weights can change once experiment `{}` has started",
                                            current.key
                                        )));
                                    }
                                }
                                next.variants.clone_from(&patch.variants);
                            }
                            "coverage" => next.coverage = patch.coverage,
                            "hash_version" => next.hash_version = patch.hash_version,
                            "seed" => next.seed.clone_from(&patch.seed),
                            "hash_attribute" => next.hash_attribute.clone_from(&patch.hash_attribute),
                            "targeting" => next.targeting.clone_from(&patch.targeting),
                            "namespace" => next.namespace.clone_from(&patch.namespace),
                            "holdout" => next.holdout = patch.holdout,
                            "primary_metric" => next.primary_metric.clone_from(&patch.primary_metric),
                            "guardrail_metrics" => {
                                next.guardrail_metrics.clone_from(&patch.guardrail_metrics);
                            }
                            _ => next.end_time = patch.end_time,
                        }
                    }
                    // end_time is only checked to be in the future when it is being set.
                    let check_now = if paths.iter().any(|p| p == "end_time") { now } else { i64::MIN };
                    let next = definition::normalise("experiment", &next, check_now)
                        .map_err(Status::from)?;
                    let metrics = definition::metric_defs("experiment", &next);
                    Ok(Some(
                        store
                            .update(&current.key, current.version, &next, &metrics, now)
                            .await?,
                    ))
                }
            })
            .await?;
        Ok(Response::new(pb::UpdateExperimentResponse {
            experiment: Some(to_proto(&updated, now)),
        }))
    }

    async fn get_experiment(
        &self,
        request: Request<pb::GetExperimentRequest>,
    ) -> Result<Response<pb::GetExperimentResponse>, Status> {
        let key = &request.get_ref().key;
        required_key("key", key)?;
        let record = self.store.get(key).await?;
        Ok(Response::new(pb::GetExperimentResponse {
            experiment: Some(to_proto(&record, now_micros())),
        }))
    }

    async fn list_experiments(
        &self,
        request: Request<pb::ListExperimentsRequest>,
    ) -> Result<Response<pb::ListExperimentsResponse>, Status> {
        let now = now_micros();
        let req = request.into_inner();
        let wanted = req
            .statuses
            .iter()
            .enumerate()
            .map(|(i, s)| lifecycle_of(&format!("statuses[{i}]"), *s))
            .collect::<Result<Vec<_>, _>>()?;
        if req.page_size < 0 {
            return Err(invalid_field("page_size", "must not be negative"));
        }
        let limit = if req.page_size == 0 {
            DEFAULT_PAGE
        } else {
            i64::from(req.page_size).min(MAX_PAGE)
        };
        // A RUNNING experiment past its end_time is reported STOPPED: fetch both and filter
        // on the effective status.
        let mut stored = wanted.clone();
        if wanted.contains(&Lifecycle::Stopped) && !wanted.contains(&Lifecycle::Running) {
            stored.push(Lifecycle::Running);
        }
        let page = self.store.list(&stored, &req.page_token, limit).await?;
        let next_page_token = if i64::try_from(page.len()).unwrap_or(i64::MAX) == limit {
            page.last().map(|r| r.key.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        let experiments = page
            .iter()
            .filter(|r| wanted.is_empty() || wanted.contains(&r.effective_status(now).0))
            .map(|r| to_proto(r, now))
            .collect();
        Ok(Response::new(pb::ListExperimentsResponse {
            experiments,
            next_page_token,
        }))
    }

    async fn start_experiment(
        &self,
        request: Request<pb::StartExperimentRequest>,
    ) -> Result<Response<pb::StartExperimentResponse>, Status> {
        let now = now_micros();
        let key = request.into_inner().key;
        required_key("key", &key)?;
        let record = self
            .with_cas(&key, |current| {
                let store = self.store.clone();
                async move {
                    match current.effective_status(now).0 {
                        Lifecycle::Running => return Ok(None),
                        Lifecycle::Stopped => {
                            return Err(failed(format!(
                                "experiment `{}` is stopped; stopping is final, create a new experiment",
                                current.key
                            )));
                        }
                        Lifecycle::Draft => {}
                    }
                    if current.definition.primary_metric.is_none() {
                        return Err(failed(format!(
                            "experiment `{}` has no primary_metric; set one before starting",
                            current.key
                        )));
                    }
                    if current.end_time().is_some_and(|end| end <= now) {
                        return Err(failed(format!(
                            "experiment `{}` has an end_time in the past",
                            current.key
                        )));
                    }
                    Ok(Some(store.start(&current.key, current.version, now).await?))
                }
            })
            .await?;
        Ok(Response::new(pb::StartExperimentResponse {
            experiment: Some(to_proto(&record, now)),
        }))
    }

    async fn stop_experiment(
        &self,
        request: Request<pb::StopExperimentRequest>,
    ) -> Result<Response<pb::StopExperimentResponse>, Status> {
        let now = now_micros();
        let req = request.into_inner();
        required_key("key", &req.key)?;
        if req.reason.len() > 512 {
            return Err(invalid_field("reason", "at most 512 bytes"));
        }
        let release = req.release_variant_index;
        let reason = req.reason.clone();
        let record = self
            .with_cas(&req.key, |current| {
                let store = self.store.clone();
                let reason = reason.clone();
                async move {
                    let n = current.definition.variants.len();
                    if let Some(v) = release
                        && usize::try_from(v).map_or(true, |v| v >= n)
                    {
                        return Err(CasError::Fail(invalid_field(
                            "release_variant_index",
                            format!("must be a variant index in [0, {n})"),
                        )));
                    }
                    match current.status {
                        Lifecycle::Draft => Err(failed(format!(
                            "experiment `{}` is a draft; it was never started",
                            current.key
                        ))),
                        Lifecycle::Stopped if current.released_variant == release => Ok(None),
                        Lifecycle::Stopped => Err(failed(format!(
                            "experiment `{}` is already stopped with a different release",
                            current.key
                        ))),
                        Lifecycle::Running => {
                            // Past its planned end it stopped then, not now.
                            let at = current.end_time().map_or(now, |end| end.min(now));
                            Ok(Some(
                                store
                                    .stop(&current.key, current.version, release, &reason, at)
                                    .await?,
                            ))
                        }
                    }
                }
            })
            .await?;
        Ok(Response::new(pb::StopExperimentResponse {
            experiment: Some(to_proto(&record, now)),
        }))
    }

    async fn assign(
        &self,
        request: Request<pb::AssignRequest>,
    ) -> Result<Response<pb::AssignResponse>, Status> {
        let now = now_micros();
        let req = request.into_inner();
        required_key("experiment_key", &req.experiment_key)?;
        check_unit_id("unit_id", &req.unit_id)?;
        let profile_id = check_profile_id("profile_id", &req.profile_id)?;
        let facts = targeting_facts(&req.attributes, req.context.as_ref())?;
        let record = self.definition(&req.experiment_key).await?;
        let profile_id = if profile_id.is_empty()
            && record.definition.hash_attribute == definition::DEFAULT_HASH_ATTRIBUTE
        {
            req.unit_id.clone()
        } else {
            profile_id
        };
        let sticky = if record.effective_status(now).0 == Lifecycle::Running {
            let pair = (record.key.clone(), req.unit_id.clone());
            self.store
                .exposures(std::slice::from_ref(&pair))
                .await?
                .remove(&pair)
        } else {
            None
        };
        let assignment = self.decide(
            &record,
            &req.unit_id,
            &profile_id,
            &facts,
            sticky.as_ref(),
            now,
        );
        Ok(Response::new(pb::AssignResponse {
            assignment: Some(assignment),
        }))
    }

    async fn batch_assign(
        &self,
        request: Request<pb::BatchAssignRequest>,
    ) -> Result<Response<pb::BatchAssignResponse>, Status> {
        let now = now_micros();
        let req = request.into_inner();
        check_unit_ids("unit_ids", &req.unit_ids)?;
        let profile_id = check_profile_id("profile_id", &req.profile_id)?;
        let profile_id = if profile_id.is_empty() {
            req.unit_ids
                .get(definition::DEFAULT_HASH_ATTRIBUTE)
                .cloned()
                .unwrap_or_default()
        } else {
            profile_id
        };
        let facts = targeting_facts(&req.attributes, req.context.as_ref())?;
        if req.experiment_keys.len() > MAX_BATCH_EXPERIMENTS {
            return Err(invalid_field(
                "experiment_keys",
                format!("at most {MAX_BATCH_EXPERIMENTS} experiments"),
            ));
        }
        for (i, k) in req.experiment_keys.iter().enumerate() {
            required_key(&format!("experiment_keys[{i}]"), k)?;
        }
        let records: Vec<ExperimentRecord> = if req.experiment_keys.is_empty() {
            let mut all = Vec::new();
            let mut after = String::new();
            loop {
                let page = self
                    .store
                    .list(&[Lifecycle::Running], &after, MAX_PAGE)
                    .await?;
                let done = i64::try_from(page.len()).unwrap_or(0) < MAX_PAGE;
                after = page.last().map(|r| r.key.clone()).unwrap_or_default();
                all.extend(
                    page.into_iter()
                        .filter(|r| r.effective_status(now).0 == Lifecycle::Running),
                );
                if done {
                    break all;
                }
            }
        } else {
            self.definitions(&req.experiment_keys).await?
        };
        let by_key: HashMap<&str, &ExperimentRecord> =
            records.iter().map(|r| (r.key.as_str(), r)).collect();
        let unit_of = |r: &ExperimentRecord| {
            req.unit_ids
                .get(&r.definition.hash_attribute)
                .cloned()
                .unwrap_or_default()
        };
        let pairs: Vec<(String, String)> = records
            .iter()
            .filter(|r| r.effective_status(now).0 == Lifecycle::Running)
            .map(|r| (r.key.clone(), unit_of(r)))
            .filter(|(_, u)| !u.is_empty())
            .collect();
        let sticky = self.store.exposures(&pairs).await?;
        let order: Vec<String> = if req.experiment_keys.is_empty() {
            records.iter().map(|r| r.key.clone()).collect()
        } else {
            req.experiment_keys.clone()
        };
        let assignments = order
            .iter()
            .map(|key| match by_key.get(key.as_str()) {
                None => pb::Assignment {
                    experiment_key: key.clone(),
                    reason: pb::AssignmentReason::ExperimentNotFound as i32,
                    ..pb::Assignment::default()
                },
                Some(r) => {
                    let unit = unit_of(r);
                    let exposure = sticky.get(&(r.key.clone(), unit.clone()));
                    self.decide(r, &unit, &profile_id, &facts, exposure, now)
                }
            })
            .collect();
        Ok(Response::new(pb::BatchAssignResponse { assignments }))
    }

    async fn log_exposure(
        &self,
        request: Request<pb::LogExposureRequest>,
    ) -> Result<Response<pb::LogExposureResponse>, Status> {
        let now = now_micros();
        let req = request.into_inner();
        required_key("experiment_key", &req.experiment_key)?;
        check_unit_id("unit_id", &req.unit_id)?;
        if req.variant_index < 0 {
            return Err(invalid_field("variant_index", "must not be negative"));
        }
        let exposed_at = check_time("exposed_at", req.exposed_at.as_ref(), now)?.unwrap_or(now);
        let profile_id = check_profile_id("profile_id", &req.profile_id)?;
        let pre_period_value = req.pre_period_value.unwrap_or(0.0);
        if !pre_period_value.is_finite() {
            return Err(invalid_field("pre_period_value", "must be finite"));
        }
        let record = self.store.get(&req.experiment_key).await?;
        let n = record.definition.variants.len();
        if usize::try_from(req.variant_index).map_or(true, |v| v >= n) {
            return Err(invalid_field(
                "variant_index",
                format!("must be a variant index in [0, {n})"),
            ));
        }
        let (status, stop_time) = record.effective_status(now);
        if status == Lifecycle::Draft {
            return Err(Status::failed_precondition(format!(
                "experiment `{}` is a draft; start it before logging exposures",
                record.key
            )));
        }
        let ignored = record.start_time.is_some_and(|s| exposed_at < s)
            || (status == Lifecycle::Stopped && stop_time.is_some_and(|s| exposed_at > s));
        if ignored {
            return Ok(Response::new(pb::LogExposureResponse::default()));
        }
        let mismatch = |recorded: i32| {
            Status::failed_precondition(format!(
                "unit `{}` was first exposed to variant {recorded} of experiment `{}`, not {}",
                req.unit_id, record.key, req.variant_index
            ))
        };
        let pair = (record.key.clone(), req.unit_id.clone());
        if let Some(existing) = self
            .store
            .exposures(std::slice::from_ref(&pair))
            .await?
            .remove(&pair)
        {
            if existing.variant_index != req.variant_index {
                return Err(mismatch(existing.variant_index));
            }
            return Ok(Response::new(pb::LogExposureResponse {
                first_exposure: false,
                first_exposed_at: Some(timestamp(existing.exposed_at)),
            }));
        }
        // Targeting cannot be re-checked here (no attributes); the rest of the assignment is.
        let holdout_unit = if !profile_id.is_empty() {
            profile_id.as_str()
        } else if record.definition.hash_attribute == definition::DEFAULT_HASH_ATTRIBUTE {
            req.unit_id.as_str()
        } else {
            ""
        };
        let everyone = TargetingFacts::default();
        let open = ExperimentRecord {
            definition: pb::Experiment {
                targeting: None,
                ..record.definition.clone()
            },
            status: Lifecycle::Running,
            ..record.clone()
        };
        let expected = self.decide(&open, &req.unit_id, holdout_unit, &everyone, None, now);
        if expected.reason != pb::AssignmentReason::Assigned as i32 {
            let reason = pb::AssignmentReason::try_from(expected.reason)
                .map_or("unknown", |r| r.as_str_name());
            return Err(Status::failed_precondition(format!(
                "unit `{}` is not in experiment `{}` ({reason})",
                req.unit_id, record.key
            )));
        }
        if expected.variant_index != req.variant_index {
            return Err(Status::failed_precondition(format!(
                "unit `{}` is assigned variant {} of experiment `{}`, not {}",
                req.unit_id, expected.variant_index, record.key, req.variant_index
            )));
        }
        let outcome = self
            .store
            .log_exposure(&ExposureRecord {
                experiment_key: record.key.clone(),
                unit_id: req.unit_id.clone(),
                variant_index: req.variant_index,
                exposed_at,
                profile_id,
                pre_period_value,
            })
            .await?;
        if outcome.exposure.variant_index != req.variant_index {
            return Err(mismatch(outcome.exposure.variant_index));
        }
        Ok(Response::new(pb::LogExposureResponse {
            first_exposure: outcome.first,
            first_exposed_at: Some(timestamp(outcome.exposure.exposed_at)),
        }))
    }

    async fn record_conversion(
        &self,
        request: Request<pb::RecordConversionRequest>,
    ) -> Result<Response<pb::RecordConversionResponse>, Status> {
        let now = now_micros();
        let req = request.into_inner();
        required_key("metric_key", &req.metric_key)?;
        check_unit_ids("unit_ids", &req.unit_ids)?;
        let occurred_at = check_time("occurred_at", req.occurred_at.as_ref(), now)?
            .ok_or_else(|| invalid_field("occurred_at", "required"))?;
        let key = &req.idempotency_key;
        if key.is_empty() || key.len() > 128 || !key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(invalid_field(
                "idempotency_key",
                "must be 1 to 128 bytes of printable ASCII",
            ));
        }
        if let Some(v) = &req.value
            && !definition::is_currency(&v.currency)
        {
            return Err(invalid_field(
                "value.currency",
                "must be an ISO 4217 code such as USD",
            ));
        }
        let (value_minor, currency) = match self.store.metric_def(&req.metric_key).await? {
            Some(def) if def.event_derived => {
                return Err(invalid_field(
                    "metric_key",
                    format!(
                        "metric `{}` is derived from ingested events; its conversions cannot be recorded directly",
                        def.key
                    ),
                ));
            }
            Some(def) if def.metric_type == pb::MetricType::Binary as i32 => (0, String::new()),
            Some(def) => match &req.value {
                Some(v) if v.currency != def.currency => {
                    return Err(invalid_field(
                        "value.currency",
                        format!(
                            "metric `{}` is measured in {}, got {}",
                            def.key, def.currency, v.currency
                        ),
                    ));
                }
                Some(v) => (v.amount_minor, v.currency.clone()),
                None => (0, def.currency),
            },
            None => req
                .value
                .as_ref()
                .map_or((0, String::new()), |v| (v.amount_minor, v.currency.clone())),
        };
        let replayed = self
            .store
            .record_conversion(&ConversionRecord {
                idempotency_key: req.idempotency_key.clone(),
                metric_key: req.metric_key.clone(),
                unit_ids: req.unit_ids.clone().into_iter().collect::<BTreeMap<_, _>>(),
                occurred_at,
                value_minor,
                currency,
            })
            .await?;
        Ok(Response::new(pb::RecordConversionResponse { replayed }))
    }

    async fn get_results(
        &self,
        request: Request<pb::GetResultsRequest>,
    ) -> Result<Response<pb::GetResultsResponse>, Status> {
        let now = now_micros();
        let req = request.into_inner();
        required_key("experiment_key", &req.experiment_key)?;
        let record = self.store.get(&req.experiment_key).await?;
        if record.effective_status(now).0 == Lifecycle::Draft {
            return Err(Status::failed_precondition(format!(
                "experiment `{}` is a draft; it has no results",
                record.key
            )));
        }
        let def = &record.definition;
        let all: Vec<(&pb::Metric, pb::MetricRole)> = def
            .primary_metric
            .iter()
            .map(|m| (m, pb::MetricRole::Primary))
            .chain(
                def.guardrail_metrics
                    .iter()
                    .map(|m| (m, pb::MetricRole::Guardrail)),
            )
            .collect();
        for (i, k) in req.metric_keys.iter().enumerate() {
            if !all.iter().any(|(m, _)| &m.key == k) {
                return Err(invalid_field(
                    &format!("metric_keys[{i}]"),
                    format!("experiment `{}` has no metric `{k}`", record.key),
                ));
            }
        }
        let mut metrics = Vec::new();
        let mut units: Option<Vec<u64>> = None;
        for (m, role) in all {
            if !req.metric_keys.is_empty() && !req.metric_keys.contains(&m.key) {
                continue;
            }
            let aggregates = self
                .store
                .aggregate(&AggregateQuery {
                    experiment_key: record.key.clone(),
                    hash_attribute: def.hash_attribute.clone(),
                    metric_key: crate::events::conversion_key(m),
                    window_micros: definition::window_micros(m),
                    currency: (m.r#type == pb::MetricType::Continuous as i32)
                        .then(|| m.currency.clone()),
                    event_derived: crate::events::is_event_metric(m),
                })
                .await?;
            if units.is_none() {
                units = Some(
                    results::dense(def.variants.len(), &aggregates)
                        .iter()
                        .map(|a| a.units)
                        .collect(),
                );
            }
            metrics.push(results::metric_result(m, role, &def.variants, &aggregates));
        }
        let units = units.unwrap_or_else(|| vec![0; def.variants.len()]);
        Ok(Response::new(pb::GetResultsResponse {
            experiment_key: record.key.clone(),
            computed_at: Some(timestamp(now)),
            data_through: Some(timestamp(now)),
            total_units: i64::try_from(units.iter().sum::<u64>()).unwrap_or(i64::MAX),
            srm: results::sample_ratio(&def.variants, &units),
            metrics,
        }))
    }

    async fn get_holdout(
        &self,
        _request: Request<pb::GetHoldoutRequest>,
    ) -> Result<Response<pb::GetHoldoutResponse>, Status> {
        let h = &self.holdout;
        Ok(Response::new(pb::GetHoldoutResponse {
            holdout: Some(pb::HoldoutConfig {
                enabled: h.enabled,
                fraction: h.fraction,
                seed: h.seed.clone(),
                hash_version: i32::from(h.hash_version.number()),
                hash_attribute: definition::DEFAULT_HASH_ATTRIBUTE.to_owned(),
                effective_since: Some(timestamp(h.effective_since)),
            }),
        }))
    }

    async fn is_in_holdout(
        &self,
        request: Request<pb::IsInHoldoutRequest>,
    ) -> Result<Response<pb::IsInHoldoutResponse>, Status> {
        let unit_id = &request.get_ref().unit_id;
        check_unit_id("unit_id", unit_id)?;
        Ok(Response::new(pb::IsInHoldoutResponse {
            in_holdout: self.holdout.contains(unit_id),
            bucket: self.holdout.bucket(unit_id),
        }))
    }
}
