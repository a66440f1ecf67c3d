//! Holm–Bonferroni correction for comparing several treatments with control.
//!
//! With `m` p-values sorted ascending `p_(1) <= … <= p_(m)`, the adjusted
//! value is `p̃_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))`; rejecting
//! `p̃ < alpha` controls the family-wise error rate at `alpha` under any
//! dependence, and is uniformly more powerful than plain Bonferroni. Same
//! definition as statsmodels `multipletests(method="holm")`.

use serde::{Deserialize, Serialize};

/// One treatment's comparison with control plus its multiplicity-adjusted
/// p-value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TreatmentResult<T> {
    /// Variant index in the experiment (control is 0, so this is `>= 1`).
    pub variant: usize,
    /// The unadjusted comparison with control.
    pub comparison: T,
    /// Holm–Bonferroni adjusted p-value.
    pub adjusted_p_value: f64,
    /// Whether `adjusted_p_value < alpha`.
    pub significant: bool,
}

/// Holm–Bonferroni adjusted p-values, in the order given.
///
/// NaN p-values sort last and stay NaN.
#[must_use]
pub fn holm_bonferroni(p_values: &[f64]) -> Vec<f64> {
    let m = p_values.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p_values[a].total_cmp(&p_values[b]));
    let mut adjusted = vec![0.0; m];
    let mut running_max: f64 = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        #[allow(clippy::cast_precision_loss)]
        let factor = (m - rank) as f64;
        running_max = running_max.max((factor * p_values[i]).min(1.0));
        adjusted[i] = if p_values[i].is_nan() {
            f64::NAN
        } else {
            running_max
        };
    }
    adjusted
}

/// Pairs each comparison with its Holm-adjusted p-value; comparison `i` is
/// variant `i + 1`.
pub(crate) fn adjust_treatments<T>(
    comparisons: Vec<T>,
    p_value: impl Fn(&T) -> f64,
    alpha: f64,
) -> Vec<TreatmentResult<T>> {
    let p: Vec<f64> = comparisons.iter().map(&p_value).collect();
    let adjusted = holm_bonferroni(&p);
    comparisons
        .into_iter()
        .zip(adjusted)
        .enumerate()
        .map(|(i, (comparison, adjusted_p_value))| TreatmentResult {
            variant: i + 1,
            comparison,
            adjusted_p_value,
            significant: adjusted_p_value < alpha,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::test_support::assert_close;

    #[test]
    fn holm_matches_statsmodels_multipletests() {
        // statsmodels multipletests([0.01, 0.04, 0.03, 0.005, 0.2], method="holm")
        let adjusted = holm_bonferroni(&[0.01, 0.04, 0.03, 0.005, 0.2]);
        for (a, e) in adjusted.iter().zip([0.04, 0.09, 0.09, 0.025, 0.2]) {
            assert_close(*a, e, 1e-12);
        }
    }

    #[test]
    fn single_p_value_is_unchanged() {
        assert_eq!(holm_bonferroni(&[0.03]), vec![0.03]);
    }

    #[test]
    fn adjusted_p_values_are_capped_at_one() {
        assert_eq!(holm_bonferroni(&[0.6, 0.7]), vec![1.0, 1.0]);
    }
}
