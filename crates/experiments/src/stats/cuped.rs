//! CUPED (Deng, Xu, Kohavi & Walker, WSDM 2013): variance reduction with a
//! pre-experiment covariate.
//!
//! With `y` the in-experiment metric and `x` the same metric (or a correlated
//! one) measured before assignment, each unit's metric is replaced by
//!
//! `y' = y - θ (x - x̄)`,  `θ = cov(y, x) / var(x)`,
//!
//! where `θ` and `x̄` are computed over **all units of all variants pooled**.
//! Because `x` predates assignment, its mean is the same in every variant in
//! expectation, so `y'` has the same expected difference between variants as
//! `y` but a variance reduced by the factor `1 - ρ²(x, y)`. Pooling (rather
//! than fitting θ per variant) keeps the adjustment identical across
//! variants, so it cannot absorb part of the treatment effect.
//!
//! The adjusted per-variant mean and variance follow from sufficient
//! statistics, `ȳ'_i = ȳ_i - θ (x̄_i - x̄)` and
//! `s²_{y',i} = s²_{y,i} + θ² s²_{x,i} - 2 θ s_{xy,i}`, so Welch's test runs on
//! the adjusted values without loading units. (Estimating θ from the same
//! data adds an `O(1/n)` effect that is negligible at experiment sizes.)
//!
//! Units without pre-period data should get `x = 0` (new customers), which
//! keeps them in the analysis; they simply benefit less.

use serde::{Deserialize, Serialize};

use super::means::{MeanComparison, welch_t_test};
use super::multiple::{TreatmentResult, adjust_treatments};
use super::summary::{MetricMoments, SampleSummary, as_f64};
use super::{StatsError, check_finite, group_name};

/// Sufficient statistics of a metric `y` and its pre-period covariate `x`
/// for one variant: `COUNT(*)`, `SUM(y)`, `SUM(y*y)`, `SUM(x)`, `SUM(x*x)`,
/// `SUM(x*y)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CovariateMoments {
    /// Number of units.
    pub units: u64,
    /// `Σ y`.
    pub sum_y: f64,
    /// `Σ y²`.
    pub sum_y_squares: f64,
    /// `Σ x`.
    pub sum_x: f64,
    /// `Σ x²`.
    pub sum_x_squares: f64,
    /// `Σ x y`.
    pub sum_xy: f64,
}

impl CovariateMoments {
    /// Moments of paired per-unit values (for tests and small inputs).
    /// Extra elements of the longer slice are ignored.
    #[must_use]
    pub fn from_values(y: &[f64], x: &[f64]) -> Self {
        let mut m = Self {
            units: 0,
            sum_y: 0.0,
            sum_y_squares: 0.0,
            sum_x: 0.0,
            sum_x_squares: 0.0,
            sum_xy: 0.0,
        };
        for (&y, &x) in y.iter().zip(x) {
            m.units += 1;
            m.sum_y += y;
            m.sum_y_squares += y * y;
            m.sum_x += x;
            m.sum_x_squares += x * x;
            m.sum_xy += x * y;
        }
        m
    }

    /// The metric alone, for the unadjusted analysis.
    #[must_use]
    pub fn metric(&self) -> MetricMoments {
        MetricMoments {
            units: self.units,
            sum: self.sum_y,
            sum_squares: self.sum_y_squares,
        }
    }

    fn check(&self, group: &str) -> Result<(), StatsError> {
        check_finite("sum_y", self.sum_y)?;
        check_finite("sum_y_squares", self.sum_y_squares)?;
        check_finite("sum_x", self.sum_x)?;
        check_finite("sum_x_squares", self.sum_x_squares)?;
        check_finite("sum_xy", self.sum_xy)?;
        if self.units < 2 {
            return Err(StatsError::TooFewUnits {
                group: group.to_owned(),
                units: self.units,
                required: 2,
            });
        }
        Ok(())
    }

    /// Centred sums `(S_yy, S_xx, S_xy)`, e.g. `S_yy = Σ y² - (Σ y)² / n`.
    fn centred(&self) -> (f64, f64, f64) {
        let n = as_f64(self.units);
        (
            self.sum_y_squares - self.sum_y * self.sum_y / n,
            self.sum_x_squares - self.sum_x * self.sum_x / n,
            self.sum_xy - self.sum_x * self.sum_y / n,
        )
    }

    fn add(&self, other: &Self) -> Self {
        Self {
            units: self.units + other.units,
            sum_y: self.sum_y + other.sum_y,
            sum_y_squares: self.sum_y_squares + other.sum_y_squares,
            sum_x: self.sum_x + other.sum_x,
            sum_x_squares: self.sum_x_squares + other.sum_x_squares,
            sum_xy: self.sum_xy + other.sum_xy,
        }
    }
}

/// The fitted CUPED adjustment `y' = y - theta (x - covariate_mean)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CupedAdjustment {
    /// `cov(y, x) / var(x)` over all units of all variants.
    pub theta: f64,
    /// `x̄` over all units of all variants.
    pub covariate_mean: f64,
}

impl CupedAdjustment {
    /// Fits θ and `x̄` on all units of `variants` pooled.
    ///
    /// # Errors
    /// [`StatsError::TooFewUnits`] below two units in total (or per
    /// variant), [`StatsError::NonFinite`],
    /// [`StatsError::ZeroCovariateVariance`] when `x` is constant.
    pub fn fit(variants: &[CovariateMoments]) -> Result<Self, StatsError> {
        for (i, v) in variants.iter().enumerate() {
            v.check(&group_name(i))?;
        }
        let total = variants
            .iter()
            .fold(CovariateMoments::from_values(&[], &[]), |acc, v| acc.add(v));
        if total.units < 2 {
            return Err(StatsError::TooFewUnits {
                group: "all variants".to_owned(),
                units: total.units,
                required: 2,
            });
        }
        let (_, sxx, sxy) = total.centred();
        if sxx <= 0.0 {
            return Err(StatsError::ZeroCovariateVariance);
        }
        Ok(Self {
            theta: sxy / sxx,
            covariate_mean: total.sum_x / as_f64(total.units),
        })
    }

    /// Mean and variance of the adjusted metric `y'` in one variant.
    ///
    /// # Errors
    /// [`StatsError::TooFewUnits`] below two units, [`StatsError::NonFinite`].
    pub fn adjust(
        &self,
        variant: &CovariateMoments,
        group: &str,
    ) -> Result<SampleSummary, StatsError> {
        variant.check(group)?;
        let n = as_f64(variant.units);
        let (syy, sxx, sxy) = variant.centred();
        let t = self.theta;
        let mean = variant.sum_y / n - t * (variant.sum_x / n - self.covariate_mean);
        let variance = ((syy + t * t * sxx - 2.0 * t * sxy) / (n - 1.0)).max(0.0);
        Ok(SampleSummary {
            units: variant.units,
            mean,
            variance,
        })
    }
}

/// CUPED-adjusted comparison of a treatment with control.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CupedComparison {
    /// The adjustment used.
    pub adjustment: CupedAdjustment,
    /// Welch's test on the adjusted metric: the result to report.
    pub adjusted: MeanComparison,
    /// Welch's test on the raw metric, for reference.
    pub unadjusted: MeanComparison,
    /// `1 - Var_adjusted(diff) / Var_raw(diff)`: the fraction of the
    /// variance of the estimated difference removed by CUPED (≈ ρ²). A value
    /// of 0.5 means the same precision with half the units.
    pub variance_reduction: f64,
}

fn cuped_compare(
    adjustment: CupedAdjustment,
    control: &CovariateMoments,
    treatment: &CovariateMoments,
    treatment_name: &str,
    alpha: f64,
) -> Result<CupedComparison, StatsError> {
    let adj_c = adjustment.adjust(control, "control")?;
    let adj_t = adjustment.adjust(treatment, treatment_name)?;
    let raw_c = control.metric().summary("control")?;
    let raw_t = treatment.metric().summary(treatment_name)?;
    let adjusted = welch_t_test(&adj_c, &adj_t, alpha)?;
    let unadjusted = welch_t_test(&raw_c, &raw_t, alpha)?;
    let var_adj = adj_c.variance_of_mean() + adj_t.variance_of_mean();
    let var_raw = raw_c.variance_of_mean() + raw_t.variance_of_mean();
    Ok(CupedComparison {
        adjustment,
        adjusted,
        unadjusted,
        variance_reduction: 1.0 - var_adj / var_raw,
    })
}

/// CUPED-adjusted Welch test of `treatment` against `control`, θ pooled over
/// both groups, CI at level `1 - alpha`.
///
/// # Errors
/// As [`CupedAdjustment::fit`] and [`welch_t_test`].
pub fn compare_means_cuped(
    control: &CovariateMoments,
    treatment: &CovariateMoments,
    alpha: f64,
) -> Result<CupedComparison, StatsError> {
    let adjustment = CupedAdjustment::fit(&[*control, *treatment])?;
    cuped_compare(adjustment, control, treatment, "treatment", alpha)
}

/// CUPED-adjusted Welch tests of each treatment against control, θ pooled
/// over all variants, p-values Holm–Bonferroni adjusted. Treatment `i` in
/// the slice is variant `i + 1`.
///
/// # Errors
/// As [`compare_means_cuped`].
pub fn compare_means_cuped_to_control(
    control: &CovariateMoments,
    treatments: &[CovariateMoments],
    alpha: f64,
) -> Result<Vec<TreatmentResult<CupedComparison>>, StatsError> {
    let all: Vec<CovariateMoments> = std::iter::once(*control)
        .chain(treatments.iter().copied())
        .collect();
    let adjustment = CupedAdjustment::fit(&all)?;
    let comparisons = treatments
        .iter()
        .enumerate()
        .map(|(i, t)| cuped_compare(adjustment, control, t, &group_name(i + 1), alpha))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(adjust_treatments(
        comparisons,
        |c| c.adjusted.p_value,
        alpha,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::stats::test_support::assert_close;

    // y = 0.8 x + noise, generated in tests/reference. Reference: numpy θ over
    // pooled units, scipy.stats.ttest_ind(equal_var=False) on y - θ(x - x̄).
    const CONTROL: CovariateMoments = CovariateMoments {
        units: 1_200,
        sum_y: 59_174.733_719_934_79,
        sum_y_squares: 3_068_941.289_069_127_3,
        sum_x: 58_946.356_907_169_36,
        sum_x_squares: 3_052_729.699_209_111_7,
        sum_xy: 3_035_804.930_106_390_3,
    };
    const TREATMENT: CovariateMoments = CovariateMoments {
        units: 1_100,
        sum_y: 56_098.960_012_732_31,
        sum_y_squares: 3_000_039.635_323_897,
        sum_x: 55_238.506_205_375_816,
        sum_x_squares: 2_929_058.379_502_858_5,
        sum_xy: 2_941_307.049_261_662,
    };

    #[test]
    fn cuped_matches_scipy_on_adjusted_values() {
        let r = compare_means_cuped(&CONTROL, &TREATMENT, 0.05).unwrap();
        assert_close(r.adjustment.theta, 0.812_366_374_974_270_6, 1e-9);
        assert_close(r.adjusted.control_mean, 49.737_656_341_825_186, 1e-10);
        assert_close(r.adjusted.treatment_mean, 50.535_005_565_888_06, 1e-10);
        assert_close(r.adjusted.t_statistic, 3.150_042_795_025_550_7, 1e-7);
        assert_close(r.adjusted.degrees_of_freedom, 2_287.573_261_064_557_8, 1e-7);
        assert_close(r.adjusted.p_value, 0.001_653_553_465_988_200_2, 1e-6);
        assert_close(
            r.adjusted.absolute_lift.value,
            0.797_349_224_062_877_2,
            1e-8,
        );
        assert_close(
            r.adjusted.absolute_lift.ci.lower,
            0.300_974_042_670_300_3,
            1e-7,
        );
        assert_close(
            r.adjusted.absolute_lift.ci.upper,
            1.293_724_405_455_454_2,
            1e-7,
        );
        assert_close(r.unadjusted.p_value, 0.000_328_686_993_921_511_3, 1e-6);
        assert_close(r.variance_reduction, 0.708_630_847_469_238_9, 1e-8);
    }

    #[test]
    fn uncorrelated_covariate_barely_changes_variance() {
        let y = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let x = [1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0];
        let c = CovariateMoments::from_values(&y[..4], &x[..4]);
        let t = CovariateMoments::from_values(&y[4..], &x[4..]);
        let r = compare_means_cuped(&c, &t, 0.05).unwrap();
        assert_close(r.adjustment.theta, 0.0, 1e-12);
        assert_close(r.variance_reduction, 0.0, 1e-12);
    }

    #[test]
    fn constant_covariate_is_rejected() {
        let c = CovariateMoments::from_values(&[1.0, 2.0, 3.0], &[5.0, 5.0, 5.0]);
        assert_eq!(
            compare_means_cuped(&c, &c, 0.05),
            Err(StatsError::ZeroCovariateVariance)
        );
    }

    #[test]
    fn multi_arm_cuped_pools_theta_over_all_variants() {
        let results =
            compare_means_cuped_to_control(&CONTROL, &[TREATMENT, CONTROL], 0.05).unwrap();
        let pooled = CupedAdjustment::fit(&[CONTROL, TREATMENT, CONTROL]).unwrap();
        assert_eq!(results[0].comparison.adjustment, pooled);
        assert_eq!(results[1].variant, 2);
        assert!(results[1].adjusted_p_value >= results[1].comparison.adjusted.p_value);
    }
}
