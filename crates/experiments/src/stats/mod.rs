//! Experiment statistics computed from sufficient statistics.
//!
//! Every test here takes aggregates, never individual units:
//!
//! | input                | SQL                                                        |
//! |----------------------|------------------------------------------------------------|
//! | [`ConversionCounts`] | `COUNT(*)`, `SUM(converted::int)`                          |
//! | [`MetricMoments`]    | `COUNT(*)`, `SUM(y)`, `SUM(y*y)`                           |
//! | [`CovariateMoments`] | the above plus `SUM(x)`, `SUM(x*x)`, `SUM(x*y)` (CUPED)     |
//!
//! grouped by variant, so the service can analyse millions of units with one
//! `GROUP BY` query. Sums are taken as `f64`; compute them in SQL as
//! `double precision` (or `numeric` cast at the end). Variances derived from
//! raw sums lose precision when the mean is huge relative to the spread
//! (catastrophic cancellation); for money metrics in currency units this is
//! far below reporting precision, but a metric like epoch timestamps should
//! be centred in SQL first.
//!
//! What is provided, and the method behind each:
//!
//! * [`proportions`]: two-proportion z-test (pooled SE for the p-value,
//!   unpooled Wald SE for the CI of the absolute difference), relative lift
//!   with a delta-method CI;
//! * [`means`]: Welch's t-test with Welch–Satterthwaite degrees of freedom;
//! * [`multiple`]: Holm–Bonferroni adjustment when several treatments are
//!   compared with one control;
//! * [`srm`]: sample-ratio-mismatch check (chi-square goodness of fit);
//! * [`sequential`]: always-valid p-values and confidence sequences from the
//!   normal-mixture SPRT (Johari et al. 2017) for teams that look every day;
//! * [`cuped`]: CUPED variance reduction with a pre-period covariate.
//!
//! All CIs are two-sided at level `1 - alpha`. Reference values for every
//! statistic were computed with scipy/statsmodels (see
//! `tests/reference/README.md`).

pub mod cuped;
pub mod means;
pub mod multiple;
pub mod proportions;
pub mod sequential;
pub mod srm;
pub mod summary;

pub use cuped::{
    CovariateMoments, CupedAdjustment, CupedComparison, compare_means_cuped,
    compare_means_cuped_to_control,
};
pub use means::{MeanComparison, compare_means, compare_means_to_control, welch_t_test};
pub use multiple::{TreatmentResult, holm_bonferroni};
pub use proportions::{ProportionComparison, compare_conversions, compare_conversions_to_control};
pub use sequential::{MixtureSequentialTest, SequentialResult};
pub use srm::{SRM_P_VALUE_THRESHOLD, SampleRatioCheck, check_sample_ratio};
pub use summary::{ConversionCounts, MetricMoments, SampleSummary, VariantSummary, VariantTotals};

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, Normal};
use thiserror::Error;

/// A closed interval `[lower, upper]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// Lower bound.
    pub lower: f64,
    /// Upper bound.
    pub upper: f64,
}

impl Interval {
    /// `center ± half_width`.
    #[must_use]
    pub fn around(center: f64, half_width: f64) -> Self {
        Self {
            lower: center - half_width,
            upper: center + half_width,
        }
    }

    /// Whether `x` lies in the interval.
    #[must_use]
    pub fn contains(&self, x: f64) -> bool {
        self.lower <= x && x <= self.upper
    }
}

/// A point estimate with its two-sided `1 - alpha` confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// Point estimate.
    pub value: f64,
    /// Standard error of the estimate.
    pub standard_error: f64,
    /// Confidence interval.
    pub ci: Interval,
}

/// Why a statistic cannot be computed.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum StatsError {
    /// A group has fewer units than the statistic needs.
    #[error("{group} has {units} units; at least {required} are needed")]
    TooFewUnits {
        /// Which group (`"control"`, `"treatment"`, `"variant 2"`, …).
        group: String,
        /// Units present.
        units: u64,
        /// Units required.
        required: u64,
    },
    /// More conversions than units.
    #[error("{group} has {conversions} conversions but only {units} units")]
    ConversionsExceedUnits {
        /// Which group.
        group: String,
        /// Conversions given.
        conversions: u64,
        /// Units given.
        units: u64,
    },
    /// A sum is NaN or infinite.
    #[error("{field} must be finite, got {value}")]
    NonFinite {
        /// The offending input.
        field: &'static str,
        /// Its value.
        value: f64,
    },
    /// `alpha` is not in `(0, 1)`.
    #[error("alpha must be in (0, 1), got {0}")]
    InvalidAlpha(f64),
    /// The standard error of the difference is zero (e.g. no conversions in
    /// either group, or constant metrics), so no test statistic exists.
    #[error("standard error of the difference is zero; the test is undefined")]
    ZeroStandardError,
    /// The CUPED covariate has zero variance, so theta is undefined.
    #[error("covariate has zero variance; CUPED theta is undefined")]
    ZeroCovariateVariance,
    /// Counts and weights given to the SRM check differ in length.
    #[error("observed has {observed} groups but weights has {weights}")]
    LengthMismatch {
        /// Number of observed counts.
        observed: usize,
        /// Number of weights.
        weights: usize,
    },
    /// A weight is negative or non-finite, or all are zero.
    #[error(
        "weights[{index}] must be finite and non-negative, with a positive total; got {weight}"
    )]
    InvalidWeight {
        /// Index of the offending weight.
        index: usize,
        /// Its value.
        weight: f64,
    },
    /// The mixing variance of the sequential test is not positive and finite.
    #[error("tau_squared must be positive and finite, got {0}")]
    InvalidTauSquared(f64),
    /// A variance given to the sequential test is not positive and finite.
    #[error("variance of the estimate must be positive and finite, got {0}")]
    InvalidVariance(f64),
    /// A previous always-valid p-value is outside `[0, 1]`.
    #[error("previous p-value must be in [0, 1], got {0}")]
    InvalidPreviousPValue(f64),
}

pub(crate) fn check_alpha(alpha: f64) -> Result<(), StatsError> {
    if alpha > 0.0 && alpha < 1.0 {
        Ok(())
    } else {
        Err(StatsError::InvalidAlpha(alpha))
    }
}

pub(crate) fn check_finite(field: &'static str, value: f64) -> Result<(), StatsError> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(StatsError::NonFinite { field, value })
    }
}

fn standard_normal() -> Normal {
    // Mean 0 and standard deviation 1 are valid parameters.
    Normal::standard()
}

/// `z` such that `P(Z <= z) = p` for a standard normal `Z`.
pub(crate) fn normal_quantile(p: f64) -> f64 {
    standard_normal().inverse_cdf(p)
}

/// Two-sided p-value `P(|Z| >= |z|)`, computed from the upper tail so that
/// small p-values keep their precision.
pub(crate) fn two_sided_normal_p(z: f64) -> f64 {
    (2.0 * standard_normal().sf(z.abs())).min(1.0)
}

/// Delta-method estimate of `treatment / control - 1` for two independent
/// means with variances-of-the-mean `var_t` and `var_c`:
/// `Var(T/C) ≈ var_t / C² + T² var_c / C⁴`. The CI uses the normal quantile
/// (the delta method is a large-sample approximation). `None` when the
/// control mean is zero, where relative lift is undefined.
pub(crate) fn relative_lift(
    treatment: f64,
    var_t: f64,
    control: f64,
    var_c: f64,
    alpha: f64,
) -> Option<Estimate> {
    if control == 0.0 {
        return None;
    }
    let value = treatment / control - 1.0;
    let c2 = control * control;
    let se = (var_t / c2 + treatment * treatment * var_c / (c2 * c2)).sqrt();
    let z = normal_quantile(1.0 - alpha / 2.0);
    Some(Estimate {
        value,
        standard_error: se,
        ci: Interval::around(value, z * se),
    })
}

pub(crate) fn group_name(index: usize) -> String {
    if index == 0 {
        "control".to_owned()
    } else {
        format!("variant {index}")
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    /// Relative closeness (with a 1e-12 absolute floor for values near zero)
    /// used against scipy/statsmodels reference values.
    #[track_caller]
    pub fn assert_close(actual: f64, expected: f64, tolerance: f64) {
        assert!(
            (actual - expected).abs() <= tolerance * expected.abs() + 1e-12,
            "actual {actual} vs expected {expected} (tolerance {tolerance})"
        );
    }
}
