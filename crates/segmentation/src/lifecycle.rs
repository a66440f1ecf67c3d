//! Customer lifecycle states (new, active, at risk, lapsed, churned) from order timing.
//!
//! Rules, evaluated in this order with `L` = days since the last order, `F` = days since the
//! first order, `n` = number of orders and `μ` = the customer's mean inter-purchase interval
//! in days. `μ` is *known* when `n ≥ min_orders_for_cadence` and `μ > 0`. All comparisons
//! are "strictly after": exactly on a threshold keeps the earlier (healthier) state.
//!
//! 1. `n = 0` → no lifecycle state (`None`): the profile has never purchased.
//! 2. `L > churned_after_days` → **Churned** (absolute: a long silence is churn whatever the
//!    cadence).
//! 3. `L > T_lapsed` → **Lapsed**, where `T_lapsed = clamp(lapsed_multiplier·μ,
//!    min_lapsed_days, lapsed_after_days)` when μ is known, else `lapsed_after_days`.
//! 4. `F ≤ new_window_days` → **New** (first purchase is recent; checked after churn/lapse so
//!    a mis-configured window cannot hide a lapse).
//! 5. `L > T_at_risk` → **At risk**, where `T_at_risk = clamp(at_risk_multiplier·μ,
//!    min_at_risk_days, T_lapsed)` when μ is known, else `min(at_risk_after_days, T_lapsed)`.
//! 6. otherwise → **Active**.
//!
//! Using the customer's own cadence means a weekly shopper is at risk after two silent weeks
//! while a twice-a-year shopper is not flagged until the absolute lapse threshold; the floors
//! (`min_at_risk_days`, `min_lapsed_days`) stop daily shoppers from flapping between states.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::features::ProfileFeatures;

/// Lifecycle state of a customer with at least one order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LifecycleState {
    /// First order within the new-customer window.
    New,
    /// Buying at their usual pace.
    Active,
    /// Silent for longer than usual, not yet lapsed.
    AtRisk,
    /// Silent well beyond their usual pace.
    Lapsed,
    /// Silent beyond the absolute churn threshold.
    Churned,
}

/// Thresholds of [`LifecycleClassifier`]; all durations in days. See the module doc for how
/// each is used.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LifecycleThresholds {
    /// A customer whose first order is at most this many days old is New (default 30).
    pub new_window_days: f64,
    /// Absolute at-risk threshold on days since last order, used when the cadence is unknown
    /// (default 90).
    pub at_risk_after_days: f64,
    /// Absolute lapse threshold, used when the cadence is unknown and as the cap of the
    /// personal one (default 180).
    pub lapsed_after_days: f64,
    /// Churn threshold on days since last order, always absolute (default 365).
    pub churned_after_days: f64,
    /// Personal at-risk threshold as a multiple of the mean inter-purchase interval
    /// (default 2.0).
    pub at_risk_multiplier: f64,
    /// Personal lapse threshold as a multiple of the mean inter-purchase interval
    /// (default 4.0).
    pub lapsed_multiplier: f64,
    /// Floor of the personal at-risk threshold (default 14).
    pub min_at_risk_days: f64,
    /// Floor of the personal lapse threshold (default 60).
    pub min_lapsed_days: f64,
    /// Orders needed before the personal cadence is trusted (default 3, i.e. two intervals).
    pub min_orders_for_cadence: u32,
}

impl Default for LifecycleThresholds {
    fn default() -> Self {
        Self {
            new_window_days: 30.0,
            at_risk_after_days: 90.0,
            lapsed_after_days: 180.0,
            churned_after_days: 365.0,
            at_risk_multiplier: 2.0,
            lapsed_multiplier: 4.0,
            min_at_risk_days: 14.0,
            min_lapsed_days: 60.0,
            min_orders_for_cadence: 3,
        }
    }
}

/// Invalid [`LifecycleThresholds`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LifecycleError {
    /// A threshold is negative or not finite, or a multiplier is not positive.
    #[error("lifecycle threshold {0} must be finite and non-negative (multipliers positive)")]
    InvalidValue(&'static str),
    /// The thresholds are not ordered as required.
    #[error("lifecycle thresholds must satisfy {0}")]
    Misordered(&'static str),
}

/// What the classifier needs to know about a customer; usually built with
/// [`LifecycleInput::from_features`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LifecycleInput {
    /// Number of orders.
    pub order_count: u32,
    /// Days since the first order (`None` without orders).
    pub days_since_first_order: Option<f64>,
    /// Days since the last order (`None` without orders).
    pub days_since_last_order: Option<f64>,
    /// Mean days between consecutive orders (`None` with fewer than two orders).
    pub mean_interpurchase_days: Option<f64>,
}

impl LifecycleInput {
    /// Takes the relevant fields of computed features.
    #[must_use]
    pub fn from_features(features: &ProfileFeatures) -> Self {
        Self {
            order_count: features.frequency,
            days_since_first_order: features.days_since_first_order,
            days_since_last_order: features.recency_days,
            mean_interpurchase_days: features.mean_interpurchase_days,
        }
    }
}

/// Classifies customers into [`LifecycleState`]s with validated thresholds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LifecycleClassifier {
    thresholds: LifecycleThresholds,
}

impl LifecycleClassifier {
    /// Validates the thresholds: all finite and non-negative, multipliers positive,
    /// `min_at_risk_days ≤ min_lapsed_days ≤ lapsed_after_days`,
    /// `at_risk_after_days ≤ lapsed_after_days ≤ churned_after_days` and
    /// `at_risk_multiplier ≤ lapsed_multiplier`.
    ///
    /// # Errors
    /// [`LifecycleError`] naming the violated condition.
    pub fn new(thresholds: LifecycleThresholds) -> Result<Self, LifecycleError> {
        let t = &thresholds;
        for (name, value) in [
            ("new_window_days", t.new_window_days),
            ("at_risk_after_days", t.at_risk_after_days),
            ("lapsed_after_days", t.lapsed_after_days),
            ("churned_after_days", t.churned_after_days),
            ("min_at_risk_days", t.min_at_risk_days),
            ("min_lapsed_days", t.min_lapsed_days),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(LifecycleError::InvalidValue(name));
            }
        }
        for (name, value) in [
            ("at_risk_multiplier", t.at_risk_multiplier),
            ("lapsed_multiplier", t.lapsed_multiplier),
        ] {
            if !value.is_finite() || value <= 0.0 {
                return Err(LifecycleError::InvalidValue(name));
            }
        }
        if !(t.at_risk_after_days <= t.lapsed_after_days
            && t.lapsed_after_days <= t.churned_after_days)
        {
            return Err(LifecycleError::Misordered(
                "at_risk_after_days <= lapsed_after_days <= churned_after_days",
            ));
        }
        if !(t.min_at_risk_days <= t.min_lapsed_days && t.min_lapsed_days <= t.lapsed_after_days) {
            return Err(LifecycleError::Misordered(
                "min_at_risk_days <= min_lapsed_days <= lapsed_after_days",
            ));
        }
        if t.at_risk_multiplier > t.lapsed_multiplier {
            return Err(LifecycleError::Misordered(
                "at_risk_multiplier <= lapsed_multiplier",
            ));
        }
        Ok(Self { thresholds })
    }

    /// The thresholds in use.
    #[must_use]
    pub fn thresholds(&self) -> &LifecycleThresholds {
        &self.thresholds
    }

    fn cadence(&self, input: &LifecycleInput) -> Option<f64> {
        input.mean_interpurchase_days.filter(|&mu| {
            input.order_count >= self.thresholds.min_orders_for_cadence
                && mu.is_finite()
                && mu > 0.0
        })
    }

    /// Days of silence after which `input` counts as lapsed (see the module doc).
    #[must_use]
    pub fn lapsed_threshold_days(&self, input: &LifecycleInput) -> f64 {
        let t = &self.thresholds;
        match self.cadence(input) {
            Some(mu) => (t.lapsed_multiplier * mu).clamp(t.min_lapsed_days, t.lapsed_after_days),
            None => t.lapsed_after_days,
        }
    }

    /// Days of silence after which `input` counts as at risk (see the module doc).
    #[must_use]
    pub fn at_risk_threshold_days(&self, input: &LifecycleInput) -> f64 {
        let t = &self.thresholds;
        let lapsed = self.lapsed_threshold_days(input);
        match self.cadence(input) {
            Some(mu) => (t.at_risk_multiplier * mu).clamp(t.min_at_risk_days, lapsed),
            None => t.at_risk_after_days.min(lapsed),
        }
    }

    /// The lifecycle state of `input`, or `None` for a customer without orders (or with
    /// missing order dates). Pure and deterministic.
    #[must_use]
    pub fn classify(&self, input: &LifecycleInput) -> Option<LifecycleState> {
        if input.order_count == 0 {
            return None;
        }
        let since_last = input.days_since_last_order?;
        let since_first = input.days_since_first_order?;
        let t = &self.thresholds;
        if since_last > t.churned_after_days {
            return Some(LifecycleState::Churned);
        }
        if since_last > self.lapsed_threshold_days(input) {
            return Some(LifecycleState::Lapsed);
        }
        if since_first <= t.new_window_days {
            return Some(LifecycleState::New);
        }
        if since_last > self.at_risk_threshold_days(input) {
            return Some(LifecycleState::AtRisk);
        }
        Some(LifecycleState::Active)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Next representable value above `x`, to test "just past the threshold".
    fn above(x: f64) -> f64 {
        f64::from_bits(x.to_bits() + 1)
    }

    fn one_time(first: f64, last: f64, n: u32) -> LifecycleInput {
        LifecycleInput {
            order_count: n,
            days_since_first_order: Some(first),
            days_since_last_order: Some(last),
            mean_interpurchase_days: None,
        }
    }

    fn with_cadence(mu: f64, last: f64, n: u32) -> LifecycleInput {
        LifecycleInput {
            order_count: n,
            days_since_first_order: Some(last + mu * f64::from(n - 1)),
            days_since_last_order: Some(last),
            mean_interpurchase_days: Some(mu),
        }
    }

    fn classify(input: &LifecycleInput) -> Option<LifecycleState> {
        LifecycleClassifier::default().classify(input)
    }

    #[test]
    fn customer_without_orders_has_no_state() {
        let input = LifecycleInput {
            order_count: 0,
            days_since_first_order: None,
            days_since_last_order: None,
            mean_interpurchase_days: None,
        };
        assert_eq!(classify(&input), None);
    }

    #[test]
    fn first_order_on_new_window_boundary_is_new_and_just_after_is_active() {
        assert_eq!(
            classify(&one_time(30.0, 30.0, 1)),
            Some(LifecycleState::New)
        );
        assert_eq!(
            classify(&one_time(above(30.0), above(30.0), 1)),
            Some(LifecycleState::Active)
        );
    }

    #[test]
    fn absolute_at_risk_boundary_without_cadence() {
        assert_eq!(
            classify(&one_time(200.0, 90.0, 2)),
            Some(LifecycleState::Active)
        );
        assert_eq!(
            classify(&one_time(200.0, above(90.0), 2)),
            Some(LifecycleState::AtRisk)
        );
    }

    #[test]
    fn absolute_lapsed_boundary_without_cadence() {
        assert_eq!(
            classify(&one_time(200.0, 180.0, 1)),
            Some(LifecycleState::AtRisk)
        );
        assert_eq!(
            classify(&one_time(200.0, above(180.0), 1)),
            Some(LifecycleState::Lapsed)
        );
    }

    #[test]
    fn churned_boundary_is_absolute() {
        assert_eq!(
            classify(&one_time(400.0, 365.0, 1)),
            Some(LifecycleState::Lapsed)
        );
        assert_eq!(
            classify(&one_time(400.0, above(365.0), 1)),
            Some(LifecycleState::Churned)
        );
        // a very slow cadence does not postpone churn
        assert_eq!(
            classify(&with_cadence(300.0, above(365.0), 3)),
            Some(LifecycleState::Churned)
        );
    }

    #[test]
    fn personal_cadence_sets_at_risk_and_lapsed_boundaries() {
        // weekly shopper: at risk after 2×7 = 14 days, lapsed after max(4×7, 60) = 60 days
        assert_eq!(
            classify(&with_cadence(7.0, 14.0, 5)),
            Some(LifecycleState::Active)
        );
        assert_eq!(
            classify(&with_cadence(7.0, above(14.0), 5)),
            Some(LifecycleState::AtRisk)
        );
        assert_eq!(
            classify(&with_cadence(7.0, 60.0, 5)),
            Some(LifecycleState::AtRisk)
        );
        assert_eq!(
            classify(&with_cadence(7.0, above(60.0), 5)),
            Some(LifecycleState::Lapsed)
        );
        // monthly shopper: at risk after 60, lapsed after 120
        assert_eq!(
            classify(&with_cadence(30.0, 60.0, 4)),
            Some(LifecycleState::Active)
        );
        assert_eq!(
            classify(&with_cadence(30.0, above(60.0), 4)),
            Some(LifecycleState::AtRisk)
        );
        assert_eq!(
            classify(&with_cadence(30.0, 120.0, 4)),
            Some(LifecycleState::AtRisk)
        );
        assert_eq!(
            classify(&with_cadence(30.0, above(120.0), 4)),
            Some(LifecycleState::Lapsed)
        );
    }

    #[test]
    fn daily_shopper_is_protected_by_floors() {
        // 2×1 day would be 2 days; floor keeps at-risk at 14 days
        assert_eq!(
            classify(&with_cadence(1.0, 14.0, 40)),
            Some(LifecycleState::Active)
        );
        assert_eq!(
            classify(&with_cadence(1.0, above(14.0), 40)),
            Some(LifecycleState::AtRisk)
        );
    }

    #[test]
    fn slow_cadence_is_capped_by_absolute_lapse_threshold() {
        // 4×100 = 400 is capped at 180; 2×100 = 200 is capped at the lapsed threshold 180
        let input = with_cadence(100.0, 180.0, 3);
        let classifier = LifecycleClassifier::default();
        assert!((classifier.lapsed_threshold_days(&input) - 180.0).abs() < 1e-12);
        assert!((classifier.at_risk_threshold_days(&input) - 180.0).abs() < 1e-12);
        assert_eq!(classify(&input), Some(LifecycleState::Active));
        assert_eq!(
            classify(&with_cadence(100.0, above(180.0), 3)),
            Some(LifecycleState::Lapsed)
        );
    }

    #[test]
    fn cadence_is_ignored_below_minimum_order_count() {
        // two orders 7 days apart: cadence not trusted, absolute 90-day threshold applies
        let input = LifecycleInput {
            order_count: 2,
            days_since_first_order: Some(57.0),
            days_since_last_order: Some(50.0),
            mean_interpurchase_days: Some(7.0),
        };
        assert_eq!(classify(&input), Some(LifecycleState::Active));
    }

    #[test]
    fn recent_first_order_with_fast_cadence_is_still_new() {
        assert_eq!(
            classify(&with_cadence(5.0, 15.0, 3)),
            Some(LifecycleState::New)
        );
    }

    #[test]
    fn input_is_built_from_features() {
        use crate::features::{FeatureConfig, Order, ProfileHistory, compute_features};
        let day = 86_400;
        let as_of = 1_000 * day;
        let history = ProfileHistory {
            orders: (0..3)
                .map(|i| Order {
                    placed_at: as_of - (100 + 10 * i) * day,
                    amount_minor: 100,
                    refunded_minor: 0,
                    lines: vec![],
                })
                .collect(),
            ..ProfileHistory::default()
        };
        let input = LifecycleInput::from_features(&compute_features(
            &history,
            as_of,
            &FeatureConfig::default(),
        ));
        assert_eq!(input.order_count, 3);
        assert_eq!(input.days_since_last_order, Some(100.0));
        assert_eq!(input.mean_interpurchase_days, Some(10.0));
        // personal thresholds: at risk after 20, lapsed after max(40, 60) = 60 → lapsed
        assert_eq!(classify(&input), Some(LifecycleState::Lapsed));
    }

    #[test]
    fn misordered_thresholds_are_rejected() {
        let bad = LifecycleThresholds {
            lapsed_after_days: 400.0,
            ..LifecycleThresholds::default()
        };
        assert!(matches!(
            LifecycleClassifier::new(bad),
            Err(LifecycleError::Misordered(_))
        ));
        let bad = LifecycleThresholds {
            at_risk_multiplier: 5.0,
            ..LifecycleThresholds::default()
        };
        assert!(matches!(
            LifecycleClassifier::new(bad),
            Err(LifecycleError::Misordered(_))
        ));
        let bad = LifecycleThresholds {
            new_window_days: f64::NAN,
            ..LifecycleThresholds::default()
        };
        assert_eq!(
            LifecycleClassifier::new(bad),
            Err(LifecycleError::InvalidValue("new_window_days"))
        );
        assert!(LifecycleClassifier::new(LifecycleThresholds::default()).is_ok());
    }
}
