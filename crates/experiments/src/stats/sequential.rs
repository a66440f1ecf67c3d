//! Always-valid inference for continuous monitoring: the normal-mixture
//! sequential probability ratio test (mSPRT).
//!
//! A fixed-horizon p-value is only valid at the sample size planned up front;
//! a team that looks every day and stops at the first `p < 0.05` has a false
//! positive rate several times 5 %. The mSPRT (Johari, Koomen, Pekelis &
//! Walsh, "Peeking at A/B Tests", KDD 2017; "Always Valid Inference", 2015)
//! gives p-values and confidence intervals that stay valid under any
//! stopping rule.
//!
//! With `θ̂` the estimated difference (treatment − control), `V` its
//! variance and a normal mixing distribution `θ ~ N(0, τ²)` over alternatives,
//! the mixture likelihood ratio against H0 `θ = 0` is
//!
//! `Λ = sqrt(V / (V + τ²)) · exp(τ² θ̂² / (2 V (V + τ²)))`,
//!
//! the always-valid p-value is the running minimum of `min(1, 1/Λ)` over
//! looks, and inverting `Λ < 1/α` gives the confidence sequence
//!
//! `θ̂ ± sqrt( (2 V (V + τ²) / τ²) · (ln(1/α) + ½ ln((V + τ²) / V)) )`.
//!
//! (Closed forms checked against numerical integration of the mixture with
//! scipy; see `tests/reference/README.md`.)
//!
//! **Choosing τ².** τ² is the variance of the mixing distribution, in squared
//! units of the difference being tested (e.g. squared percentage points for
//! conversion rates). The test has most power against effects of about
//! `|θ| ≈ τ`, so set `τ = ` the smallest effect worth detecting
//! ([`MixtureSequentialTest::for_minimum_effect`]); e.g. for a 10 % baseline
//! conversion rate and a 1 point minimum effect, `τ² = 0.01² = 1e-4`. There
//! is deliberately no global default: the right scale depends on the metric.
//! The price of always-validity is wider intervals than a fixed-horizon test
//! at the same sample size.

use serde::{Deserialize, Serialize};

use super::summary::{ConversionCounts, MetricMoments};
use super::{Interval, StatsError, check_alpha};

/// Configuration of the mSPRT: mixing variance and significance level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MixtureSequentialTest {
    tau_squared: f64,
    alpha: f64,
}

/// One look of the mSPRT.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SequentialResult {
    /// Estimated difference `θ̂` (treatment − control).
    pub estimate: f64,
    /// Variance `V` of the estimate.
    pub variance: f64,
    /// `ln Λ` (kept in log space: `Λ` overflows for decisive data).
    pub log_likelihood_ratio: f64,
    /// Always-valid p-value: `min(previous, 1/Λ)`, in `[0, 1]`.
    pub always_valid_p_value: f64,
    /// Always-valid `1 - alpha` confidence interval for this look. To get
    /// the running intersection over looks, intersect with earlier ones.
    pub confidence_sequence: Interval,
    /// Whether the always-valid p-value is below `alpha`; safe to stop.
    pub reject_null: bool,
}

impl MixtureSequentialTest {
    /// A test with mixing variance `tau_squared` (squared units of the
    /// difference) at level `alpha`.
    ///
    /// # Errors
    /// [`StatsError::InvalidTauSquared`], [`StatsError::InvalidAlpha`].
    pub fn new(tau_squared: f64, alpha: f64) -> Result<Self, StatsError> {
        if !(tau_squared > 0.0 && tau_squared.is_finite()) {
            return Err(StatsError::InvalidTauSquared(tau_squared));
        }
        check_alpha(alpha)?;
        Ok(Self { tau_squared, alpha })
    }

    /// A test tuned for effects of size `minimum_effect` (absolute, in the
    /// units of the difference): `τ² = minimum_effect²`.
    ///
    /// # Errors
    /// As [`MixtureSequentialTest::new`].
    pub fn for_minimum_effect(minimum_effect: f64, alpha: f64) -> Result<Self, StatsError> {
        Self::new(minimum_effect * minimum_effect, alpha)
    }

    /// Mixing variance τ².
    #[must_use]
    pub fn tau_squared(&self) -> f64 {
        self.tau_squared
    }

    /// Significance level.
    #[must_use]
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// Evaluates one look given the estimate, its variance, and the
    /// always-valid p-value of the previous look (`None` at the first look).
    ///
    /// # Errors
    /// [`StatsError::NonFinite`] for a non-finite estimate,
    /// [`StatsError::InvalidVariance`], [`StatsError::InvalidPreviousPValue`].
    pub fn evaluate(
        &self,
        estimate: f64,
        variance: f64,
        previous_p_value: Option<f64>,
    ) -> Result<SequentialResult, StatsError> {
        super::check_finite("estimate", estimate)?;
        if !(variance > 0.0 && variance.is_finite()) {
            return Err(StatsError::InvalidVariance(variance));
        }
        let previous = previous_p_value.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&previous) {
            return Err(StatsError::InvalidPreviousPValue(previous));
        }
        let v = variance;
        let t2 = self.tau_squared;
        let log_lr = 0.5 * (v / (v + t2)).ln() + t2 * estimate * estimate / (2.0 * v * (v + t2));
        let p = (-log_lr).exp().min(1.0).min(previous);
        let half_width = ((2.0 * v * (v + t2) / t2)
            * ((1.0 / self.alpha).ln() + 0.5 * ((v + t2) / v).ln()))
        .sqrt();
        Ok(SequentialResult {
            estimate,
            variance,
            log_likelihood_ratio: log_lr,
            always_valid_p_value: p,
            confidence_sequence: Interval::around(estimate, half_width),
            reject_null: p < self.alpha,
        })
    }

    /// One look at a conversion-rate difference, with the unpooled variance
    /// `p_c (1 - p_c) / n_c + p_t (1 - p_t) / n_t`.
    ///
    /// # Errors
    /// As [`MixtureSequentialTest::evaluate`]; [`StatsError::TooFewUnits`]
    /// for an empty group; [`StatsError::ConversionsExceedUnits`].
    pub fn evaluate_conversions(
        &self,
        control: ConversionCounts,
        treatment: ConversionCounts,
        previous_p_value: Option<f64>,
    ) -> Result<SequentialResult, StatsError> {
        control.check("control")?;
        treatment.check("treatment")?;
        let rate = |c: ConversionCounts, group: &str| {
            c.rate().ok_or_else(|| StatsError::TooFewUnits {
                group: group.to_owned(),
                units: 0,
                required: 1,
            })
        };
        let pc = rate(control, "control")?;
        let pt = rate(treatment, "treatment")?;
        let variance = pc * (1.0 - pc) / super::summary::as_f64(control.units)
            + pt * (1.0 - pt) / super::summary::as_f64(treatment.units);
        self.evaluate(pt - pc, variance, previous_p_value)
    }

    /// One look at a difference of means, with variance
    /// `s_c² / n_c + s_t² / n_t`.
    ///
    /// # Errors
    /// As [`MixtureSequentialTest::evaluate`]; [`StatsError::TooFewUnits`]
    /// below two units per group.
    pub fn evaluate_means(
        &self,
        control: &MetricMoments,
        treatment: &MetricMoments,
        previous_p_value: Option<f64>,
    ) -> Result<SequentialResult, StatsError> {
        let c = control.summary("control")?;
        let t = treatment.summary("treatment")?;
        self.evaluate(
            t.mean - c.mean,
            c.variance_of_mean() + t.variance_of_mean(),
            previous_p_value,
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::stats::test_support::assert_close;
    use crate::stats::{ConversionCounts, MetricMoments, compare_conversions};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    // Reference: closed form evaluated with numpy and cross-checked against
    // scipy.integrate.quad of the mixture likelihood ratio.
    #[test]
    fn decisive_data_matches_reference_and_rejects() {
        let test = MixtureSequentialTest::new(0.25, 0.05).unwrap();
        let r = test.evaluate(0.5, 0.01, None).unwrap();
        assert_close(r.log_likelihood_ratio.exp(), 32_538.604_696_721_23, 1e-9);
        assert_close(r.always_valid_p_value, 3.073_272_530_646_544_4e-5, 1e-9);
        assert_close(r.confidence_sequence.lower, 0.189_846_110_317_238_75, 1e-9);
        assert_close(r.confidence_sequence.upper, 0.810_153_889_682_761_3, 1e-9);
        assert!(r.reject_null);
    }

    #[test]
    fn conversion_look_matches_reference() {
        let test = MixtureSequentialTest::for_minimum_effect(0.01, 0.05).unwrap();
        let r = test
            .evaluate_conversions(
                ConversionCounts::new(10_000, 1_000),
                ConversionCounts::new(10_050, 1_080),
                None,
            )
            .unwrap();
        assert_close(r.variance, 1.854_372_712_068_971_4e-5, 1e-10);
        assert_close(r.log_likelihood_ratio.exp(), 1.403_763_736_483_366_6, 1e-9);
        assert_close(r.always_valid_p_value, 0.712_370_589_159_929_6, 1e-9);
        assert_close(
            r.confidence_sequence.lower,
            -0.005_670_767_857_629_528,
            1e-8,
        );
        assert_close(r.confidence_sequence.upper, 0.020_596_140_991_957_876, 1e-8);
        assert!(!r.reject_null);
        // The fixed-horizon p-value (0.083) is smaller: always-validity costs power.
        let fixed = compare_conversions(
            ConversionCounts::new(10_000, 1_000),
            ConversionCounts::new(10_050, 1_080),
            0.05,
        )
        .unwrap();
        assert!(fixed.p_value < r.always_valid_p_value);
    }

    #[test]
    fn means_look_matches_reference() {
        let test = MixtureSequentialTest::new(4.0, 0.05).unwrap();
        let r = test
            .evaluate_means(
                &MetricMoments {
                    units: 800,
                    sum: 23_901.871_912_198_912,
                    sum_squares: 1_105_666.482_358_39,
                },
                &MetricMoments {
                    units: 650,
                    sum: 21_525.541_141_034_802,
                    sum_squares: 1_037_820.799_861_459_1,
                },
                None,
            )
            .unwrap();
        assert_close(r.variance, 1.382_910_124_167_426_9, 1e-9);
        assert_close(r.log_likelihood_ratio.exp(), 8.490_217_242_064_992, 1e-8);
        assert_close(r.always_valid_p_value, 0.117_782_616_332_297_75, 1e-8);
        assert_close(r.confidence_sequence.lower, -0.459_694_897_221_718_5, 1e-8);
        assert_close(r.confidence_sequence.upper, 6.937_449_396_831_52, 1e-8);
    }

    #[test]
    fn p_value_never_increases_across_looks() {
        let test = MixtureSequentialTest::new(0.25, 0.05).unwrap();
        let first = test.evaluate(0.5, 0.01, None).unwrap();
        let second = test
            .evaluate(0.0, 0.005, Some(first.always_valid_p_value))
            .unwrap();
        assert_eq!(second.always_valid_p_value, first.always_valid_p_value);
    }

    #[test]
    fn invalid_configuration_is_rejected() {
        assert_eq!(
            MixtureSequentialTest::new(0.0, 0.05),
            Err(StatsError::InvalidTauSquared(0.0))
        );
        assert_eq!(
            MixtureSequentialTest::new(1.0, 1.0),
            Err(StatsError::InvalidAlpha(1.0))
        );
        let test = MixtureSequentialTest::new(1.0, 0.05).unwrap();
        assert_eq!(
            test.evaluate(0.1, 0.0, None),
            Err(StatsError::InvalidVariance(0.0))
        );
    }

    fn standard_normal(rng: &mut StdRng) -> f64 {
        // Box–Muller; 1 - u keeps the logarithm's argument in (0, 1].
        let u1: f64 = 1.0 - rng.r#gen::<f64>();
        let u2: f64 = rng.r#gen::<f64>();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A/A experiments checked daily: stopping at the first fixed-horizon
    /// `p < 0.05` inflates false positives far beyond 5 %, stopping at the
    /// first always-valid `p < 0.05` does not.
    #[test]
    fn daily_peeking_keeps_false_positives_below_alpha() {
        let mut rng = StdRng::seed_from_u64(20_170_813);
        let test = MixtureSequentialTest::new(0.01, 0.05).unwrap();
        let (simulations, days, per_day) = (400, 30, 100);
        let (mut naive_false_positives, mut msprt_false_positives) = (0, 0);
        for _ in 0..simulations {
            let mut groups = [MetricMoments::from_values(&[]); 2];
            let (mut naive_hit, mut msprt_hit) = (false, false);
            let mut previous = None;
            for _ in 0..days {
                for g in &mut groups {
                    for _ in 0..per_day {
                        let y = standard_normal(&mut rng);
                        g.units += 1;
                        g.sum += y;
                        g.sum_squares += y * y;
                    }
                }
                let look = test
                    .evaluate_means(&groups[0], &groups[1], previous)
                    .unwrap();
                previous = Some(look.always_valid_p_value);
                msprt_hit |= look.reject_null;
                let fixed = crate::stats::compare_means(&groups[0], &groups[1], 0.05).unwrap();
                naive_hit |= fixed.p_value < 0.05;
            }
            naive_false_positives += usize::from(naive_hit);
            msprt_false_positives += usize::from(msprt_hit);
        }
        let rate = |n: usize| n as f64 / f64::from(simulations);
        assert!(
            rate(naive_false_positives) > 0.15,
            "naive {}",
            rate(naive_false_positives)
        );
        assert!(
            rate(msprt_false_positives) <= 0.05,
            "msprt {}",
            rate(msprt_false_positives)
        );
    }
}
