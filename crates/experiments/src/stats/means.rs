//! Welch's t-test for the difference of two means.
//!
//! With sample variances `s²` and sizes `n`, the variance of each mean is
//! `v = s² / n`, the standard error of the difference is
//! `SE = sqrt(v_c + v_t)`, `t = (m_t - m_c) / SE`, and the degrees of freedom
//! follow Welch–Satterthwaite:
//! `df = (v_c + v_t)² / (v_c² / (n_c - 1) + v_t² / (n_t - 1))`.
//! The p-value and the CI of the absolute difference use Student's t with
//! `df`; unlike Student's pooled test, nothing assumes equal variances or
//! equal group sizes. The relative lift `m_t / m_c - 1` gets a delta-method
//! CI (normal quantile), as for proportions.

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, StudentsT};

use super::multiple::{TreatmentResult, adjust_treatments};
use super::summary::{MetricMoments, SampleSummary, as_f64};
use super::{Estimate, Interval, StatsError, check_alpha, group_name, relative_lift};

/// Result of Welch's test of one treatment against control.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanComparison {
    /// Control mean.
    pub control_mean: f64,
    /// Treatment mean.
    pub treatment_mean: f64,
    /// `treatment_mean - control_mean` with its Welch t CI.
    pub absolute_lift: Estimate,
    /// `treatment_mean / control_mean - 1` with its delta-method CI; `None`
    /// when the control mean is zero.
    pub relative_lift: Option<Estimate>,
    /// Welch t statistic.
    pub t_statistic: f64,
    /// Welch–Satterthwaite degrees of freedom.
    pub degrees_of_freedom: f64,
    /// Two-sided p-value of H0: equal means.
    pub p_value: f64,
}

/// Welch's t-test of `treatment` against `control` from their summaries, CI
/// at level `1 - alpha`.
///
/// # Errors
/// [`StatsError::InvalidAlpha`], [`StatsError::TooFewUnits`] below two units,
/// [`StatsError::ZeroStandardError`] when both variances are zero.
pub fn welch_t_test(
    control: &SampleSummary,
    treatment: &SampleSummary,
    alpha: f64,
) -> Result<MeanComparison, StatsError> {
    check_alpha(alpha)?;
    for (group, s) in [("control", control), ("treatment", treatment)] {
        if s.units < 2 {
            return Err(StatsError::TooFewUnits {
                group: group.to_owned(),
                units: s.units,
                required: 2,
            });
        }
    }
    let vc = control.variance_of_mean();
    let vt = treatment.variance_of_mean();
    let var_diff = vc + vt;
    if var_diff <= 0.0 || !var_diff.is_finite() {
        return Err(StatsError::ZeroStandardError);
    }
    let se = var_diff.sqrt();
    let df = var_diff * var_diff
        / (vc * vc / (as_f64(control.units) - 1.0) + vt * vt / (as_f64(treatment.units) - 1.0));
    let diff = treatment.mean - control.mean;
    let t = diff / se;

    // df is positive and finite here, so the distribution is valid.
    let dist = StudentsT::new(0.0, 1.0, df).map_err(|_| StatsError::ZeroStandardError)?;
    let p_value = (2.0 * dist.sf(t.abs())).min(1.0);
    let q = dist.inverse_cdf(1.0 - alpha / 2.0);

    Ok(MeanComparison {
        control_mean: control.mean,
        treatment_mean: treatment.mean,
        absolute_lift: Estimate {
            value: diff,
            standard_error: se,
            ci: Interval::around(diff, q * se),
        },
        relative_lift: relative_lift(treatment.mean, vt, control.mean, vc, alpha),
        t_statistic: t,
        degrees_of_freedom: df,
        p_value,
    })
}

/// Welch's t-test from SQL aggregates of the metric.
///
/// # Errors
/// As [`welch_t_test`], plus [`StatsError::NonFinite`] for bad sums.
pub fn compare_means(
    control: &MetricMoments,
    treatment: &MetricMoments,
    alpha: f64,
) -> Result<MeanComparison, StatsError> {
    welch_t_test(
        &control.summary("control")?,
        &treatment.summary("treatment")?,
        alpha,
    )
}

/// Welch's test of each treatment against control, p-values adjusted with
/// Holm–Bonferroni at family-wise level `alpha`. Treatment `i` in the slice
/// is variant `i + 1`; CIs are per comparison.
///
/// # Errors
/// As [`compare_means`], for the first failing group.
pub fn compare_means_to_control(
    control: &MetricMoments,
    treatments: &[MetricMoments],
    alpha: f64,
) -> Result<Vec<TreatmentResult<MeanComparison>>, StatsError> {
    let control = control.summary("control")?;
    let comparisons = treatments
        .iter()
        .enumerate()
        .map(|(i, t)| welch_t_test(&control, &t.summary(&group_name(i + 1))?, alpha))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(adjust_treatments(comparisons, |c| c.p_value, alpha))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::stats::test_support::assert_close;

    // Gamma-distributed samples generated in tests/reference; sums below are
    // what SQL would return. Reference: scipy.stats.ttest_ind(equal_var=False)
    // and its confidence_interval(); numpy delta method for relative lift.
    const CONTROL: MetricMoments = MetricMoments {
        units: 800,
        sum: 23_901.871_912_198_912,
        sum_squares: 1_105_666.482_358_39,
    };
    const TREATMENT: MetricMoments = MetricMoments {
        units: 650,
        sum: 21_525.541_141_034_802,
        sum_squares: 1_037_820.799_861_459_1,
    };

    #[test]
    fn welch_test_from_sums_matches_scipy() {
        let r = compare_means(&CONTROL, &TREATMENT, 0.05).unwrap();
        assert_close(r.t_statistic, 2.754_212_918_290_287_7, 1e-9);
        assert_close(r.degrees_of_freedom, 1_381.798_424_908_801_3, 1e-9);
        assert_close(r.p_value, 0.005_960_494_038_050_87, 1e-7);
        assert_close(r.absolute_lift.value, 3.238_877_249_804_900_8, 1e-10);
        assert_close(r.absolute_lift.ci.lower, 0.931_993_852_197_303_2, 1e-7);
        assert_close(r.absolute_lift.ci.upper, 5.545_760_647_412_498, 1e-7);
        let rel = r.relative_lift.unwrap();
        assert_close(rel.value, 0.108_405_810_614_418_34, 1e-10);
        assert_close(rel.ci.lower, 0.027_450_705_532_065_69, 1e-7);
        assert_close(rel.ci.upper, 0.189_360_915_696_771, 1e-7);
    }

    #[test]
    fn identical_groups_have_p_value_one() {
        let r = compare_means(&CONTROL, &CONTROL, 0.05).unwrap();
        assert_close(r.p_value, 1.0, 1e-12);
        assert!(r.absolute_lift.ci.contains(0.0));
    }

    #[test]
    fn single_unit_group_is_rejected() {
        let one = MetricMoments::from_values(&[3.0]);
        assert!(matches!(
            compare_means(&CONTROL, &one, 0.05),
            Err(StatsError::TooFewUnits { required: 2, .. })
        ));
    }

    #[test]
    fn constant_metrics_have_no_test() {
        let a = MetricMoments::from_values(&[2.0, 2.0, 2.0]);
        assert_eq!(
            compare_means(&a, &a, 0.05),
            Err(StatsError::ZeroStandardError)
        );
    }
}
