//! Offer eligibility by rule expression (the `clientele-rules` language shared with
//! segmentation and experiments).
//!
//! * **Checking** ([`compile_offer_rule`]): an offer's `eligibility.rule_expression` is
//!   compiled against [`offer_rule_schema`] when the offer is created or updated, so a typo or
//!   type error fails then (with line:column, byte offset and a suggestion) instead of silently
//!   excluding everyone at decision time. `category_share(..)` is refused: the per-category
//!   spend is not part of any contract the OfferService reads.
//! * **Facts** ([`RuleFacts`]): what a rule reads about one profile in one request — the
//!   features published by SegmentationService.GetProfileSegments, the profile's tier and
//!   points from the ledger, ProfileService traits overlaid by the request's `attributes`,
//!   GRANTED consent purposes and current segment memberships.
//! * **Evaluation** ([`CompiledRules`]): implements [`crate::decision::RuleEvaluator`] for
//!   the pure decision. Rules are compiled once per distinct source and cached
//!   ([`RuleCache`]); evaluation is three-valued, and a rule that depends on a missing value is
//!   reported as such (never a match).
//!
//! Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use clientele_rules::{
    CompiledRule, EvalContext, Expr, ExprKind, RuleError, RuleErrorKind, Schema, Span, Truth,
    Value, ValueType,
};

use crate::decision::{RuleEvaluator, RuleOutcome};

/// Features an offer rule may use, with their types. Every one is filled from a contract:
/// RFM, lifecycle and predicted value from SegmentationService.GetProfileSegments, `tier`,
/// `points_available` and `tier_qualifying_value` from the OfferService's own ledger.
pub const OFFER_RULE_FEATURES: &[(&str, ValueType)] = &[
    // Days (fractional) since the last order in the RFM window.
    ("recency_days", ValueType::Number),
    // Orders in the RFM window (full refunds excluded); `frequency` is the same number.
    ("orders", ValueType::Number),
    ("frequency", ValueType::Number),
    // Net revenue in the RFM window, minor units of the reporting currency.
    ("monetary_minor", ValueType::Number),
    // RFM scores 1..=5 and the configured RFM segment name.
    ("r_score", ValueType::Number),
    ("f_score", ValueType::Number),
    ("m_score", ValueType::Number),
    ("rfm_segment", ValueType::String),
    // new, active, at_risk, lapsed, churned.
    ("lifecycle", ValueType::String),
    // Predicted CLV (reporting minor units), P(alive) and expected purchases.
    ("clv_minor", ValueType::Number),
    ("p_alive", ValueType::Number),
    ("expected_purchases", ValueType::Number),
    // The loyalty tier id, spendable points, and the tier's qualifying value.
    ("tier", ValueType::String),
    ("points_available", ValueType::Number),
    ("tier_qualifying_value", ValueType::Number),
];

/// Consent purposes `consent("…")` accepts.
pub const CONSENT_PURPOSES: &[&str] = &["email", "sms", "push", "personalisation", "analytics"];

/// The field every rule error is reported on.
pub const RULE_FIELD: &str = "offer.eligibility.rule_expression";

/// The schema offer rules are checked against. Traits and segment ids are not restricted
/// (traits are typed dynamically; segments belong to SegmentationService).
pub fn offer_rule_schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let mut s = Schema::new().with_consent_purposes(CONSENT_PURPOSES.iter().copied());
        for (name, t) in OFFER_RULE_FEATURES {
            s = s.with_feature(*name, *t);
        }
        s
    })
}

/// Compiles an offer's rule expression, refusing what the OfferService cannot evaluate.
///
/// # Errors
/// Syntax, schema and type errors of the rules crate (positioned in `source`), plus an
/// [`RuleErrorKind::UnknownFunction`] error on any `category_share(..)` call.
pub fn compile_offer_rule(source: &str) -> Result<CompiledRule, RuleError> {
    let rule = clientele_rules::compile(source, offer_rule_schema())?;
    // The source parsed, so parsing again cannot fail; walk it for unsupported calls.
    if let Ok(expr) = clientele_rules::parse(source)
        && let Some(span) = find_call(&expr, "category_share")
    {
        return Err(unsupported_call(source, span));
    }
    Ok(rule)
}

fn unsupported_call(source: &str, span: Span) -> RuleError {
    RuleError {
        kind: RuleErrorKind::UnknownFunction,
        span,
        position: clientele_rules::Position::of_offset(source, span.start),
        message: "category_share(..) is not available to offer rules (per-category spend \
                  is not published to the OfferService); use a segment instead"
            .into(),
        suggestion: None,
    }
}

fn find_call(e: &Expr, name: &str) -> Option<Span> {
    match &e.kind {
        ExprKind::Call {
            name: n,
            name_span,
            arguments,
        } => {
            if n.eq_ignore_ascii_case(name) {
                Some(*name_span)
            } else {
                arguments.iter().find_map(|a| find_call(a, name))
            }
        }
        ExprKind::Compare { left, right, .. } => {
            find_call(left, name).or_else(|| find_call(right, name))
        }
        ExprKind::In { operand, items, .. } => {
            find_call(operand, name).or_else(|| items.iter().find_map(|a| find_call(a, name)))
        }
        ExprKind::Not(inner) => find_call(inner, name),
        ExprKind::And(v) | ExprKind::Or(v) => v.iter().find_map(|a| find_call(a, name)),
        ExprKind::Literal(_) | ExprKind::Identifier(_) => None,
    }
}

/// The message and byte offset of a compile error, as reported on [`RULE_FIELD`].
pub fn describe_error(e: &RuleError) -> String {
    format!("{e} (byte offset {})", e.span.start)
}

/// What a rule can read about one profile in one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleFacts {
    /// Feature values by name (see [`OFFER_RULE_FEATURES`]); a missing feature is unknown.
    pub features: BTreeMap<String, Value>,
    /// Stored traits with the request's attributes laid over them.
    pub traits: BTreeMap<String, Value>,
    /// GRANTED consent purposes by rule name (`"email"`, …).
    pub consents: BTreeSet<String>,
    /// Segment memberships (`id`, and `id#k` for cluster `k`).
    pub segments: BTreeSet<String>,
}

impl EvalContext for RuleFacts {
    fn feature(&self, name: &str) -> Option<Value> {
        self.features.get(name).cloned()
    }

    fn category_share(&self, _category: &str) -> Option<f64> {
        None // refused at compile time; unknown if a stored rule ever has one
    }

    fn trait_value(&self, key: &str) -> Option<Value> {
        self.traits.get(key).cloned()
    }

    fn consent(&self, purpose: &str) -> bool {
        self.consents.contains(purpose)
    }

    fn in_segment(&self, segment: &str) -> bool {
        self.segments.contains(segment)
    }
}

/// Compiled rules by source text, shared by all requests. Bounded: when it holds more than
/// [`RuleCache::CAPACITY`] sources it starts afresh (catalogues hold far fewer rules).
#[derive(Debug, Default)]
pub struct RuleCache {
    compiled: Mutex<HashMap<String, Result<Arc<CompiledRule>, String>>>,
}

impl RuleCache {
    /// Most distinct sources kept.
    pub const CAPACITY: usize = 10_000;

    /// The compiled rule for `source`, or the compile error's description.
    pub fn get(&self, source: &str) -> Result<Arc<CompiledRule>, String> {
        let mut map = match self.compiled.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(r) = map.get(source) {
            return r.clone();
        }
        if map.len() >= Self::CAPACITY {
            map.clear();
        }
        let r = compile_offer_rule(source)
            .map(Arc::new)
            .map_err(|e| describe_error(&e));
        map.insert(source.to_string(), r.clone());
        r
    }
}

/// Evaluates offer rules for one profile: the decision's [`RuleEvaluator`].
#[derive(Debug)]
pub struct CompiledRules<'a> {
    /// Where compiled rules come from.
    pub cache: &'a RuleCache,
    /// The profile's facts.
    pub facts: &'a RuleFacts,
}

impl RuleEvaluator for CompiledRules<'_> {
    fn evaluate(&self, rule: &str) -> RuleOutcome {
        match self.cache.get(rule) {
            Ok(compiled) => match compiled.evaluate(self.facts) {
                Truth::True => RuleOutcome::Held,
                Truth::False => RuleOutcome::NotHeld,
                Truth::Unknown => {
                    let missing: Vec<&str> = compiled
                        .referenced_features()
                        .iter()
                        .filter(|f| !self.facts.features.contains_key(*f))
                        .map(String::as_str)
                        .collect();
                    RuleOutcome::Unknown(if missing.is_empty() {
                        "a trait or value it reads is missing".into()
                    } else {
                        format!("the profile has no value for {}", missing.join(", "))
                    })
                }
            },
            Err(message) => RuleOutcome::Error(message),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn facts() -> RuleFacts {
        RuleFacts {
            features: BTreeMap::from([
                ("orders".into(), Value::Number(4.0)),
                ("tier".into(), Value::String("gold".into())),
                ("lifecycle".into(), Value::String("at_risk".into())),
            ]),
            traits: BTreeMap::from([("cart_value".into(), Value::Number(4599.0))]),
            consents: BTreeSet::from(["email".to_string()]),
            segments: BTreeSet::from(["champions".to_string()]),
        }
    }

    #[test]
    fn a_typo_fails_at_definition_with_position_and_suggestion() {
        let e = compile_offer_rule("orders >= 3 and recncy_days < 30").unwrap_err();
        assert_eq!(e.span.start, 16);
        let text = describe_error(&e);
        assert!(text.contains("1:17"), "{text}");
        assert!(text.contains("recency_days"), "{text}");
        assert!(text.contains("byte offset 16"), "{text}");
    }

    #[test]
    fn category_share_is_refused_at_its_position() {
        let e = compile_offer_rule(r#"orders > 1 and category_share("books") > 0.5"#).unwrap_err();
        assert_eq!(e.span.start, 15);
        assert!(e.to_string().contains("category_share"));
    }

    #[test]
    fn unknown_consent_purpose_is_refused() {
        assert!(compile_offer_rule(r#"consent("fax")"#).is_err());
    }

    #[test]
    fn rules_read_features_traits_consent_and_segments() {
        let cache = RuleCache::default();
        let f = facts();
        let rules = CompiledRules {
            cache: &cache,
            facts: &f,
        };
        let held = r#"orders >= 3 and tier in ["gold", "vip"] and trait("cart_value") > 4000 and consent("email") and segment("champions")"#;
        assert_eq!(rules.evaluate(held), RuleOutcome::Held);
        assert_eq!(rules.evaluate(r#"consent("sms")"#), RuleOutcome::NotHeld);
        assert_eq!(rules.evaluate("orders > 10"), RuleOutcome::NotHeld);
    }

    #[test]
    fn a_missing_feature_is_unknown_and_names_it() {
        let cache = RuleCache::default();
        let f = facts();
        let rules = CompiledRules {
            cache: &cache,
            facts: &f,
        };
        match rules.evaluate("p_alive < 0.3") {
            RuleOutcome::Unknown(why) => assert!(why.contains("p_alive"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Under not, missing still never qualifies.
        assert!(matches!(
            rules.evaluate("not (p_alive < 0.3)"),
            RuleOutcome::Unknown(_)
        ));
    }

    #[test]
    fn a_stored_rule_that_no_longer_compiles_is_an_error_not_a_match() {
        let cache = RuleCache::default();
        let f = facts();
        let rules = CompiledRules {
            cache: &cache,
            facts: &f,
        };
        assert!(matches!(rules.evaluate("orders >="), RuleOutcome::Error(_)));
    }
}
