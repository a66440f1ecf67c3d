//! Sample-ratio-mismatch (SRM) check.
//!
//! If units are split 50/50 but 5 000 and 5 400 arrive, assignment or
//! logging is broken (bots, redirects, crashes in one variant) and every
//! metric comparison is suspect. The check is Pearson's chi-square goodness
//! of fit of the observed unit counts against the configured weights:
//! `χ² = Σ (O_i - E_i)² / E_i` with `E_i = N w_i / Σ w`, `k - 1` degrees of
//! freedom (scipy `chisquare`). A mismatch is flagged when
//! `p < 0.001`: with daily checks over many experiments a looser threshold
//! would raise false alarms, and real SRMs are usually far more extreme.

use serde::{Deserialize, Serialize};
use statrs::distribution::{ChiSquared, ContinuousCDF};

use super::StatsError;
use super::summary::as_f64;

/// p-value below which a sample ratio mismatch is flagged.
pub const SRM_P_VALUE_THRESHOLD: f64 = 0.001;

/// Outcome of [`check_sample_ratio`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRatioCheck {
    /// Expected units per variant, `N w_i / Σ w`.
    pub expected: Vec<f64>,
    /// Pearson chi-square statistic.
    pub chi_square: f64,
    /// Degrees of freedom: variants with positive weight, minus one.
    pub degrees_of_freedom: u64,
    /// Goodness-of-fit p-value.
    pub p_value: f64,
    /// Whether `p_value < SRM_P_VALUE_THRESHOLD`.
    pub mismatch: bool,
}

/// Tests observed units per variant against configured weights (any
/// positive scale; they are normalised). A variant with zero weight must
/// receive no units: if it has any, that is reported as a mismatch with
/// `p = 0`.
///
/// # Errors
/// [`StatsError::LengthMismatch`], [`StatsError::InvalidWeight`] for
/// negative/non-finite weights or an all-zero total,
/// [`StatsError::TooFewUnits`] when nothing was observed.
pub fn check_sample_ratio(
    observed: &[u64],
    weights: &[f64],
) -> Result<SampleRatioCheck, StatsError> {
    if observed.len() != weights.len() {
        return Err(StatsError::LengthMismatch {
            observed: observed.len(),
            weights: weights.len(),
        });
    }
    for (index, &weight) in weights.iter().enumerate() {
        if !weight.is_finite() || weight < 0.0 {
            return Err(StatsError::InvalidWeight { index, weight });
        }
    }
    let total_weight: f64 = weights.iter().sum();
    if total_weight <= 0.0 {
        return Err(StatsError::InvalidWeight {
            index: 0,
            weight: total_weight,
        });
    }
    let total: u64 = observed.iter().sum();
    if total == 0 {
        return Err(StatsError::TooFewUnits {
            group: "all variants".to_owned(),
            units: 0,
            required: 1,
        });
    }
    let n = as_f64(total);
    let expected: Vec<f64> = weights.iter().map(|w| n * w / total_weight).collect();

    let mut chi_square = 0.0;
    let mut cells = 0u64;
    let mut impossible = false;
    for (&o, &e) in observed.iter().zip(&expected) {
        if e == 0.0 {
            impossible |= o > 0;
            continue;
        }
        let d = as_f64(o) - e;
        chi_square += d * d / e;
        cells += 1;
    }
    let degrees_of_freedom = cells.saturating_sub(1);
    let p_value = if impossible {
        chi_square = f64::INFINITY;
        0.0
    } else if degrees_of_freedom == 0 {
        1.0
    } else {
        ChiSquared::new(as_f64(degrees_of_freedom))
            .map(|d| d.sf(chi_square))
            .unwrap_or(f64::NAN)
    };
    Ok(SampleRatioCheck {
        expected,
        chi_square,
        degrees_of_freedom,
        p_value,
        mismatch: p_value < SRM_P_VALUE_THRESHOLD,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::stats::test_support::assert_close;

    // Reference: scipy.stats.chisquare(observed, f_exp).
    #[test]
    fn balanced_three_way_split_matches_scipy_and_is_not_flagged() {
        let c = check_sample_ratio(&[5_000, 5_110, 4_890], &[1.0, 1.0, 1.0]).unwrap();
        assert_close(c.chi_square, 4.84, 1e-12);
        assert_eq!(c.degrees_of_freedom, 2);
        assert_close(c.p_value, 0.088_921_617_459_386_34, 1e-9);
        assert!(!c.mismatch);
    }

    #[test]
    fn skewed_fifty_fifty_split_is_flagged_as_mismatch() {
        let c = check_sample_ratio(&[5_000, 5_400], &[0.5, 0.5]).unwrap();
        assert_close(c.chi_square, 15.384_615_384_615_385, 1e-12);
        assert_close(c.p_value, 8.769_942_375_590_228e-5, 1e-8);
        assert!(c.mismatch);
    }

    #[test]
    fn uneven_weights_are_respected() {
        let c = check_sample_ratio(&[2_010, 7_990], &[0.2, 0.8]).unwrap();
        assert_close(c.chi_square, 0.0625, 1e-12);
        assert_close(c.p_value, 0.802_587_348_634_152_6, 1e-9);
        assert!(!c.mismatch);
    }

    #[test]
    fn units_in_a_zero_weight_variant_are_a_mismatch() {
        let c = check_sample_ratio(&[500, 500, 3], &[0.5, 0.5, 0.0]).unwrap();
        assert!(c.mismatch);
        assert_eq!(c.p_value, 0.0);
    }

    #[test]
    fn mismatched_lengths_are_rejected() {
        assert_eq!(
            check_sample_ratio(&[1, 2], &[1.0]),
            Err(StatsError::LengthMismatch {
                observed: 2,
                weights: 1
            })
        );
    }
}
