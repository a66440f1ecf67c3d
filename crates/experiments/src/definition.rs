//! Validation of experiment definitions and evaluation of their targeting.
//!
//! Every check names the offending field path (`experiment.variants[1].weight`), so a bad
//! request becomes an INVALID_ARGUMENT a client can point at. Targeting rules are compiled
//! with `clientele-rules` at create/update time, so a typo is reported then, with line and
//! column, rather than silently excluding everyone later.

use std::collections::{BTreeMap, HashSet};

use clientele_proto::v1 as pb;
use clientele_rules::{CompiledRule, EvalContext, Schema, Value, ValueType};

use crate::assignment::{ExperimentSpec, HashVersion, NamespaceRange};
use crate::model::MetricDef;

/// Most variants per experiment.
pub const MAX_VARIANTS: usize = 20;
/// Most guardrail metrics per experiment.
pub const MAX_GUARDRAILS: usize = 10;
/// Tolerance on the sum of variant weights.
pub const WEIGHT_SUM_EPSILON: f64 = 1e-6;
/// The default (and offer experiments') hash attribute.
pub const DEFAULT_HASH_ATTRIBUTE: &str = "profile_id";
const HOUR_SECS: i64 = 3_600;
const YEAR_SECS: i64 = 365 * 24 * HOUR_SECS;

/// A validation failure: the field path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the offending field, e.g. `experiment.variants[1].weight`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn err<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError {
        field: field.into(),
        message: message.into(),
    })
}

/// `[a-z0-9][<extra>a-z0-9]{0,63}`: the slug shapes the contract uses for keys.
pub fn is_slug(s: &str, extra: &[char]) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || extra.contains(&c))
}

/// An experiment or metric key: `[a-z0-9][a-z0-9_.-]{0,63}`.
pub fn is_key(s: &str) -> bool {
    is_slug(s, &['_', '.', '-'])
}

/// A hash attribute name: `[a-z][a-z0-9_]{0,63}`.
pub fn is_attribute_name(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_lowercase()) && is_slug(s, &['_'])
}

/// An ISO 4217 alphabetic code shape: three upper-case letters.
pub fn is_currency(s: &str) -> bool {
    s.len() == 3 && s.chars().all(|c| c.is_ascii_uppercase())
}

fn check_name(field: String, s: &str) -> Result<(), FieldError> {
    if s.is_empty() || s.len() > 128 {
        return err(field, "must be 1 to 128 bytes");
    }
    Ok(())
}

/// The schema targeting rules are checked against: the context's tier as the string
/// feature `tier`, any `trait("k")` (from the request's attributes), any `segment("id")`, and
/// no consent purpose (consent needs the stored profile, which assignment does not read).
pub fn targeting_schema() -> Schema {
    Schema::new()
        .with_feature("tier", ValueType::String)
        .with_consent_purposes(Vec::<String>::new())
}

/// Compiles a targeting rule; the error names `field` and gives line:column.
///
/// # Errors
/// A [`FieldError`] for a rule that does not compile.
pub fn compile_rule(field: &str, source: &str) -> Result<CompiledRule, FieldError> {
    if source.len() > clientele_rules::MAX_SOURCE_BYTES {
        return err(
            field,
            format!("at most {} bytes", clientele_rules::MAX_SOURCE_BYTES),
        );
    }
    clientele_rules::compile(source, &targeting_schema()).map_err(|e| FieldError {
        field: field.to_owned(),
        message: e.to_string(),
    })
}

fn duration_secs(d: Option<&prost_types::Duration>) -> Option<i64> {
    d.map(|d| d.seconds + i64::from(d.nanos.signum()))
}

/// Conversion window in µs (validated definitions only).
pub fn window_micros(metric: &pb::Metric) -> i64 {
    metric.conversion_window.as_ref().map_or(0, |d| {
        d.seconds.saturating_mul(1_000_000) + i64::from(d.nanos / 1_000)
    })
}

/// Whether CUPED is enabled for the metric.
pub fn cuped_enabled(metric: &pb::Metric) -> bool {
    duration_secs(metric.cuped_lookback.as_ref()).unwrap_or(0) > 0
}

fn validate_metric(field: &str, m: &pb::Metric) -> Result<(), FieldError> {
    if !is_key(&m.key) {
        return err(
            format!("{field}.key"),
            "must match [a-z0-9][a-z0-9_.-]{0,63}",
        );
    }
    check_name(format!("{field}.name"), &m.name)?;
    let metric_type = pb::MetricType::try_from(m.r#type).unwrap_or(pb::MetricType::Unspecified);
    if metric_type == pb::MetricType::Unspecified {
        return err(format!("{field}.type"), "must be BINARY or CONTINUOUS");
    }
    if matches!(
        pb::MetricGoal::try_from(m.goal),
        Ok(pb::MetricGoal::Unspecified) | Err(_)
    ) {
        return err(format!("{field}.goal"), "must be INCREASE or DECREASE");
    }
    match duration_secs(m.conversion_window.as_ref()) {
        Some(s) if (HOUR_SECS..=YEAR_SECS).contains(&s) => {}
        _ => {
            return err(
                format!("{field}.conversion_window"),
                "must be 1 hour to 365 days",
            );
        }
    }
    match &m.source {
        None => {
            return err(
                format!("{field}.source"),
                "exactly one of recorded or event is required",
            );
        }
        Some(pb::metric::Source::Recorded(_)) => {}
        Some(pb::metric::Source::Event(e)) => {
            let kind = pb::EventKind::try_from(e.kind).unwrap_or(pb::EventKind::Unspecified);
            if kind == pb::EventKind::Unspecified {
                return err(format!("{field}.event.kind"), "must be a known event kind");
            }
            if (kind == pb::EventKind::Custom) == e.custom_event_name.is_empty() {
                return err(
                    format!("{field}.event.custom_event_name"),
                    "required with EVENT_KIND_CUSTOM and only there",
                );
            }
            if metric_type == pb::MetricType::Continuous && kind != pb::EventKind::OrderCompleted {
                return err(
                    format!("{field}.event.kind"),
                    "CONTINUOUS event metrics must use EVENT_KIND_ORDER_COMPLETED",
                );
            }
        }
    }
    match metric_type {
        pb::MetricType::Continuous if !is_currency(&m.currency) => {
            return err(
                format!("{field}.currency"),
                "CONTINUOUS metrics need an ISO 4217 code such as USD",
            );
        }
        pb::MetricType::Binary if !m.currency.is_empty() => {
            return err(
                format!("{field}.currency"),
                "must be empty for BINARY metrics",
            );
        }
        _ => {}
    }
    match duration_secs(m.cuped_lookback.as_ref()) {
        None | Some(0) => {}
        Some(s) if (24 * HOUR_SECS..=YEAR_SECS).contains(&s) => {}
        Some(_) => {
            return err(
                format!("{field}.cuped_lookback"),
                "must be 0 (off) or 1 to 365 days",
            );
        }
    }
    if !(m.minimum_effect.is_finite() && m.minimum_effect >= 0.0) {
        return err(
            format!("{field}.minimum_effect"),
            "must be a finite number >= 0",
        );
    }
    Ok(())
}

/// Validates `e` (at path `prefix`) and returns its configuration with every output-only field
/// cleared and defaults applied (`hash_attribute`). `now` (µs) checks that `end_time` is in
/// the future.
///
/// # Errors
/// The first [`FieldError`] found.
pub fn normalise(prefix: &str, e: &pb::Experiment, now: i64) -> Result<pb::Experiment, FieldError> {
    let f = |name: &str| format!("{prefix}.{name}");
    if !is_key(&e.key) {
        return err(f("key"), "must match [a-z0-9][a-z0-9_.-]{0,63}");
    }
    check_name(f("display_name"), &e.display_name)?;
    if e.hypothesis.len() > 4096 {
        return err(f("hypothesis"), "at most 4096 bytes");
    }
    if !(2..=MAX_VARIANTS).contains(&e.variants.len()) {
        return err(
            f("variants"),
            format!("2 to {MAX_VARIANTS} variants are required"),
        );
    }
    let mut keys = HashSet::new();
    for (i, v) in e.variants.iter().enumerate() {
        let vf = |name: &str| format!("{prefix}.variants[{i}].{name}");
        if !is_slug(&v.key, &['_', '-']) {
            return err(vf("key"), "must match [a-z0-9][a-z0-9_-]{0,63}");
        }
        if !keys.insert(v.key.as_str()) {
            return err(vf("key"), format!("duplicate variant key `{}`", v.key));
        }
        check_name(vf("name"), &v.name)?;
        if !(v.weight.is_finite() && (0.0..=1.0).contains(&v.weight)) {
            return err(vf("weight"), "must be within [0, 1]");
        }
    }
    let sum: f64 = e.variants.iter().map(|v| v.weight).sum();
    if (sum - 1.0).abs() > WEIGHT_SUM_EPSILON {
        return err(f("variants"), format!("weights must sum to 1, got {sum}"));
    }
    if !(e.coverage.is_finite() && (0.0..=1.0).contains(&e.coverage)) {
        return err(f("coverage"), "must be within [0, 1]");
    }
    if !matches!(e.hash_version, 1 | 2) {
        return err(f("hash_version"), "must be 1 or 2 (2 recommended)");
    }
    if e.seed.len() > 128 {
        return err(f("seed"), "at most 128 bytes");
    }
    let hash_attribute = if e.hash_attribute.is_empty() {
        DEFAULT_HASH_ATTRIBUTE.to_owned()
    } else if is_attribute_name(&e.hash_attribute) {
        e.hash_attribute.clone()
    } else {
        return err(f("hash_attribute"), "must match [a-z][a-z0-9_]{0,63}");
    };
    if let Some(t) = &e.targeting {
        for (i, s) in t.segments.iter().enumerate() {
            if !is_slug(&s.segment_id, &['_', '-']) {
                return err(
                    format!("{prefix}.targeting.segments[{i}].segment_id"),
                    "must match [a-z0-9][a-z0-9_-]{0,63}",
                );
            }
            if s.cluster_index.is_some_and(|c| c < 0) {
                return err(
                    format!("{prefix}.targeting.segments[{i}].cluster_index"),
                    "must not be negative",
                );
            }
        }
        for (i, tier) in t.tier_ids.iter().enumerate() {
            if tier.is_empty() || tier.len() > 64 {
                return err(
                    format!("{prefix}.targeting.tier_ids[{i}]"),
                    "must be 1 to 64 bytes",
                );
            }
        }
        if !t.rule_expression.is_empty() {
            compile_rule(&f("targeting.rule_expression"), &t.rule_expression)?;
        }
    }
    if let Some(ns) = &e.namespace {
        if !is_slug(&ns.id, &['_', '-']) {
            return err(f("namespace.id"), "must match [a-z0-9][a-z0-9_-]{0,63}");
        }
        if !(ns.range_start.is_finite()
            && ns.range_end.is_finite()
            && 0.0 <= ns.range_start
            && ns.range_start < ns.range_end
            && ns.range_end <= 1.0)
        {
            return err(
                f("namespace"),
                "range must satisfy 0 <= range_start < range_end <= 1",
            );
        }
    }
    if matches!(
        pb::HoldoutParticipation::try_from(e.holdout),
        Ok(pb::HoldoutParticipation::Unspecified) | Err(_)
    ) {
        return err(f("holdout"), "must be EXCLUDE or INCLUDE");
    }
    let mut metric_keys = HashSet::new();
    if let Some(m) = &e.primary_metric {
        validate_metric(&f("primary_metric"), m)?;
        metric_keys.insert(m.key.as_str());
    }
    if e.guardrail_metrics.len() > MAX_GUARDRAILS {
        return err(
            f("guardrail_metrics"),
            format!("at most {MAX_GUARDRAILS} guardrail metrics"),
        );
    }
    for (i, m) in e.guardrail_metrics.iter().enumerate() {
        let mf = format!("{prefix}.guardrail_metrics[{i}]");
        validate_metric(&mf, m)?;
        if !metric_keys.insert(m.key.as_str()) {
            return err(
                format!("{mf}.key"),
                format!("metric `{}` is already used by this experiment", m.key),
            );
        }
    }
    if let Some(end) = &e.end_time {
        match clientele_runtime::time::micros(end) {
            Some(t) if t > now => {}
            Some(_) => return err(f("end_time"), "must be in the future"),
            None => return err(f("end_time"), "timestamp out of range"),
        }
    }
    Ok(pb::Experiment {
        key: e.key.clone(),
        display_name: e.display_name.clone(),
        hypothesis: e.hypothesis.clone(),
        variants: e.variants.clone(),
        coverage: e.coverage,
        hash_version: e.hash_version,
        seed: e.seed.clone(),
        hash_attribute,
        targeting: e.targeting.clone(),
        namespace: e.namespace.clone(),
        holdout: e.holdout,
        primary_metric: e.primary_metric.clone(),
        guardrail_metrics: e.guardrail_metrics.clone(),
        end_time: e.end_time,
        ..pb::Experiment::default()
    })
}

/// The metrics of a validated definition, each with its field path (for conflict errors).
pub fn metric_defs(prefix: &str, e: &pb::Experiment) -> Vec<(MetricDef, String)> {
    let def = |m: &pb::Metric| MetricDef {
        key: m.key.clone(),
        metric_type: m.r#type,
        currency: m.currency.clone(),
        event_derived: matches!(m.source, Some(pb::metric::Source::Event(_))),
        defined_by: e.key.clone(),
    };
    e.primary_metric
        .iter()
        .map(|m| (def(m), format!("{prefix}.primary_metric")))
        .chain(
            e.guardrail_metrics
                .iter()
                .enumerate()
                .map(|(i, m)| (def(m), format!("{prefix}.guardrail_metrics[{i}]"))),
        )
        .collect()
}

/// The GrowthBook assignment spec of a validated definition.
pub fn spec(e: &pb::Experiment) -> ExperimentSpec {
    ExperimentSpec {
        key: e.key.clone(),
        seed: (!e.seed.is_empty()).then(|| e.seed.clone()),
        hash_version: if e.hash_version == 1 {
            HashVersion::V1
        } else {
            HashVersion::V2
        },
        weights: e.variants.iter().map(|v| v.weight).collect(),
        coverage: e.coverage,
        namespace: e.namespace.as_ref().map(|ns| NamespaceRange {
            id: ns.id.clone(),
            start: ns.range_start,
            end: ns.range_end,
        }),
    }
}

/// What the caller told us about a unit for targeting.
#[derive(Debug, Clone, Default)]
pub struct TargetingFacts {
    /// Request attributes, read as `trait("k")`.
    pub attributes: BTreeMap<String, Value>,
    /// Segment memberships from the request's context; `None` without a context.
    pub segments: Option<Vec<pb::SegmentRef>>,
    /// Tier from the request's context; `None` without one (or an empty tier id).
    pub tier: Option<String>,
}

impl EvalContext for TargetingFacts {
    fn feature(&self, name: &str) -> Option<Value> {
        (name == "tier")
            .then(|| self.tier.clone().map(Value::String))
            .flatten()
    }
    fn category_share(&self, _category: &str) -> Option<f64> {
        None
    }
    fn trait_value(&self, key: &str) -> Option<Value> {
        self.attributes.get(key).cloned()
    }
    fn consent(&self, _purpose: &str) -> bool {
        false
    }
    fn in_segment(&self, segment: &str) -> bool {
        self.segments
            .as_ref()
            .is_some_and(|s| s.iter().any(|r| r.segment_id == segment))
    }
}

/// Whether the unit passes the experiment's targeting. A rule that fails to compile (which
/// validation prevents) does not match.
pub fn targeting_matches(targeting: Option<&pb::Targeting>, facts: &TargetingFacts) -> bool {
    let Some(t) = targeting else {
        return true;
    };
    if !t.segments.is_empty() {
        let Some(member_of) = &facts.segments else {
            return false;
        };
        let hit = t.segments.iter().any(|want| {
            member_of.iter().any(|have| {
                have.segment_id == want.segment_id
                    && (want.cluster_index.is_none() || want.cluster_index == have.cluster_index)
            })
        });
        if !hit {
            return false;
        }
    }
    if !t.tier_ids.is_empty() {
        match &facts.tier {
            Some(tier) if t.tier_ids.contains(tier) => {}
            _ => return false,
        }
    }
    if !t.rule_expression.is_empty() {
        match clientele_rules::compile(&t.rule_expression, &targeting_schema()) {
            Ok(rule) => return rule.matches(facts),
            Err(_) => return false,
        }
    }
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rule_errors_name_the_field_and_position() {
        let e = compile_rule(
            "experiment.targeting.rule_expression",
            "tier == \"gold\" and",
        )
        .unwrap_err();
        assert_eq!(e.field, "experiment.targeting.rule_expression");
        assert!(e.message.contains(" at 1:"), "{}", e.message);
        let e = compile_rule("r", "orders > 3").unwrap_err();
        assert!(e.message.contains("unknown feature"), "{}", e.message);
    }

    #[test]
    fn targeting_reads_attributes_tier_and_segments() {
        let t = pb::Targeting {
            segments: vec![pb::SegmentRef {
                segment_id: "vip".into(),
                cluster_index: None,
            }],
            tier_ids: vec!["gold".into()],
            rule_expression: r#"trait("country") == "KR" and segment("vip")"#.into(),
        };
        let mut facts = TargetingFacts {
            attributes: [("country".to_owned(), Value::from("KR"))].into(),
            segments: Some(vec![pb::SegmentRef {
                segment_id: "vip".into(),
                cluster_index: Some(2),
            }]),
            tier: Some("gold".into()),
        };
        assert!(targeting_matches(Some(&t), &facts));
        facts.tier = Some("silver".into());
        assert!(!targeting_matches(Some(&t), &facts));
        facts.tier = Some("gold".into());
        facts.attributes.clear();
        assert!(!targeting_matches(Some(&t), &facts));
        facts.segments = None;
        assert!(!targeting_matches(Some(&t), &TargetingFacts::default()));
    }
}
