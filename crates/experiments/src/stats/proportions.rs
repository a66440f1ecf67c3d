//! Two-proportion z-test for conversion rates.
//!
//! Method, for control rate `p_c = x_c / n_c` and treatment rate
//! `p_t = x_t / n_t`:
//!
//! * **p-value**: under H0 (`p_t = p_c`) both groups share the pooled rate
//!   `p = (x_c + x_t) / (n_c + n_t)`, so `SE0 = sqrt(p (1 - p) (1/n_c + 1/n_t))`
//!   and `z = (p_t - p_c) / SE0` (statsmodels `proportions_ztest`).
//! * **absolute lift CI**: away from H0 the pooled SE is wrong, so the CI of
//!   `p_t - p_c` uses the unpooled Wald SE
//!   `sqrt(p_c (1 - p_c) / n_c + p_t (1 - p_t) / n_t)` (statsmodels
//!   `confint_proportions_2indep(method="wald")`).
//! * **relative lift** `p_t / p_c - 1`: delta-method SE
//!   `sqrt(V_t / p_c² + p_t² V_c / p_c⁴)` with `V = p (1 - p) / n`; the CI is
//!   symmetric on the relative scale.
//!
//! These are large-sample approximations: trust them once each group has a
//! few dozen conversions and non-conversions.

use serde::{Deserialize, Serialize};

use super::multiple::{TreatmentResult, adjust_treatments};
use super::summary::{ConversionCounts, as_f64};
use super::{
    Estimate, Interval, StatsError, check_alpha, group_name, normal_quantile, relative_lift,
    two_sided_normal_p,
};

/// Result of comparing one treatment's conversion rate with control's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProportionComparison {
    /// Control conversion rate.
    pub control_rate: f64,
    /// Treatment conversion rate.
    pub treatment_rate: f64,
    /// `treatment_rate - control_rate` with its unpooled (Wald) CI.
    pub absolute_lift: Estimate,
    /// `treatment_rate / control_rate - 1` with its delta-method CI; `None`
    /// when control has no conversions.
    pub relative_lift: Option<Estimate>,
    /// z statistic with the pooled standard error.
    pub z_score: f64,
    /// Two-sided p-value of H0: equal rates.
    pub p_value: f64,
}

/// Compares `treatment` with `control` by a two-proportion z-test; CIs are
/// at level `1 - alpha`.
///
/// # Errors
/// [`StatsError::TooFewUnits`] for an empty group,
/// [`StatsError::ConversionsExceedUnits`], [`StatsError::InvalidAlpha`], and
/// [`StatsError::ZeroStandardError`] when both groups have all or no
/// conversions.
pub fn compare_conversions(
    control: ConversionCounts,
    treatment: ConversionCounts,
    alpha: f64,
) -> Result<ProportionComparison, StatsError> {
    compare_named(control, treatment, "treatment", alpha)
}

fn compare_named(
    control: ConversionCounts,
    treatment: ConversionCounts,
    treatment_name: &str,
    alpha: f64,
) -> Result<ProportionComparison, StatsError> {
    check_alpha(alpha)?;
    control.check("control")?;
    treatment.check(treatment_name)?;
    let (Some(pc), Some(pt)) = (control.rate(), treatment.rate()) else {
        let (group, units) = if control.units == 0 {
            ("control", control.units)
        } else {
            (treatment_name, treatment.units)
        };
        return Err(StatsError::TooFewUnits {
            group: group.to_owned(),
            units,
            required: 1,
        });
    };
    let (nc, nt) = (as_f64(control.units), as_f64(treatment.units));

    let pooled = as_f64(control.conversions + treatment.conversions) / (nc + nt);
    let se_pooled = (pooled * (1.0 - pooled) * (1.0 / nc + 1.0 / nt)).sqrt();
    if se_pooled == 0.0 {
        return Err(StatsError::ZeroStandardError);
    }
    let diff = pt - pc;
    let z = diff / se_pooled;

    let var_c = pc * (1.0 - pc) / nc;
    let var_t = pt * (1.0 - pt) / nt;
    let se_unpooled = (var_c + var_t).sqrt();
    let q = normal_quantile(1.0 - alpha / 2.0);

    Ok(ProportionComparison {
        control_rate: pc,
        treatment_rate: pt,
        absolute_lift: Estimate {
            value: diff,
            standard_error: se_unpooled,
            ci: Interval::around(diff, q * se_unpooled),
        },
        relative_lift: relative_lift(pt, var_t, pc, var_c, alpha),
        z_score: z,
        p_value: two_sided_normal_p(z),
    })
}

/// Compares each treatment with control and adjusts the p-values with
/// Holm–Bonferroni, controlling the family-wise error rate at `alpha`.
/// Treatment `i` in the slice is variant `i + 1`. CIs are per comparison
/// (not adjusted).
///
/// # Errors
/// As [`compare_conversions`], for the first failing treatment.
pub fn compare_conversions_to_control(
    control: ConversionCounts,
    treatments: &[ConversionCounts],
    alpha: f64,
) -> Result<Vec<TreatmentResult<ProportionComparison>>, StatsError> {
    let comparisons = treatments
        .iter()
        .enumerate()
        .map(|(i, t)| compare_named(control, *t, &group_name(i + 1), alpha))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(adjust_treatments(comparisons, |c| c.p_value, alpha))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::stats::test_support::assert_close;

    // Reference: statsmodels proportions_ztest / confint_proportions_2indep,
    // numpy delta method; see tests/reference/README.md.
    #[test]
    fn z_test_matches_statsmodels() {
        let r = compare_conversions(
            ConversionCounts::new(10_000, 1_000),
            ConversionCounts::new(10_050, 1_080),
            0.05,
        )
        .unwrap();
        assert_close(r.z_score, 1.732_725_293_059_732_8, 1e-9);
        assert_close(r.p_value, 0.083_144_506_711_714_86, 1e-9);
        assert_close(r.absolute_lift.value, 0.007_462_686_567_164_173, 1e-12);
        assert_close(r.absolute_lift.ci.lower, -0.000_977_394_245_027_046_7, 1e-7);
        assert_close(r.absolute_lift.ci.upper, 0.015_902_767_379_355_393, 1e-7);
        let rel = r.relative_lift.unwrap();
        assert_close(rel.value, 0.074_626_865_671_641_78, 1e-12);
        assert_close(rel.ci.lower, -0.012_887_519_594_213_609, 1e-7);
        assert_close(rel.ci.upper, 0.162_141_250_937_497_18, 1e-7);
    }

    #[test]
    fn holm_adjusts_three_arm_conversions_like_statsmodels() {
        let results = compare_conversions_to_control(
            ConversionCounts::new(10_000, 1_000),
            &[
                ConversionCounts::new(10_050, 1_080),
                ConversionCounts::new(9_950, 1_010),
            ],
            0.05,
        )
        .unwrap();
        assert_eq!(results[0].variant, 1);
        assert_eq!(results[1].variant, 2);
        assert_close(
            results[0].comparison.p_value,
            0.083_144_506_711_714_86,
            1e-9,
        );
        assert_close(results[1].comparison.p_value, 0.723_559_534_628_888_8, 1e-9);
        assert_close(results[0].adjusted_p_value, 0.166_289_013_423_429_72, 1e-9);
        assert_close(results[1].adjusted_p_value, 0.723_559_534_628_888_8, 1e-9);
        assert!(results.iter().all(|r| !r.significant));
    }

    #[test]
    fn no_conversions_anywhere_has_no_test() {
        let r = compare_conversions(
            ConversionCounts::new(10, 0),
            ConversionCounts::new(12, 0),
            0.05,
        );
        assert_eq!(r, Err(StatsError::ZeroStandardError));
    }

    #[test]
    fn zero_control_rate_has_no_relative_lift() {
        let r = compare_conversions(
            ConversionCounts::new(100, 0),
            ConversionCounts::new(100, 5),
            0.05,
        )
        .unwrap();
        assert!(r.relative_lift.is_none());
    }

    #[test]
    fn empty_treatment_is_named_in_the_error() {
        let err = compare_conversions_to_control(
            ConversionCounts::new(100, 5),
            &[ConversionCounts::new(100, 5), ConversionCounts::new(0, 0)],
            0.05,
        )
        .unwrap_err();
        assert!(err.to_string().contains("variant 2"), "{err}");
    }
}
