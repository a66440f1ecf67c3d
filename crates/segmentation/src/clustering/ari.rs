//! Adjusted Rand index between two labelings.

use super::{ClusteringError, densify_labels};

/// Adjusted Rand index (Hubert & Arabie 1985) of two labelings of the same rows: 1.0 for
/// identical partitions (label values themselves do not matter), about 0 for independent
/// ones, negative when agreement is below chance. Symmetric. Computed from the pair
/// confusion matrix in exact integer arithmetic, as scikit-learn's `adjusted_rand_score`
/// (including its convention that two partitions with no disagreeing pair score 1.0, e.g.
/// both a single cluster). Used to measure clustering stability between reruns.
///
/// # Errors
/// [`ClusteringError::DimensionMismatch`] when the labelings differ in length.
pub fn adjusted_rand_index(a: &[usize], b: &[usize]) -> Result<f64, ClusteringError> {
    if a.len() != b.len() {
        return Err(ClusteringError::DimensionMismatch(format!(
            "labelings of {} and {} rows",
            a.len(),
            b.len()
        )));
    }
    let (da, ca) = densify_labels(a);
    let (db, cb) = densify_labels(b);
    let mut table = vec![0_i128; ca * cb];
    let mut rows = vec![0_i128; ca];
    let mut cols = vec![0_i128; cb];
    for (&x, &y) in da.iter().zip(&db) {
        table[x * cb + y] += 1;
        rows[x] += 1;
        cols[y] += 1;
    }
    let n = i128::try_from(a.len()).unwrap_or(i128::MAX);
    let sum_squares: i128 = table.iter().map(|v| v * v).sum();
    let row_squares: i128 = rows.iter().map(|v| v * v).sum();
    let col_squares: i128 = cols.iter().map(|v| v * v).sum();
    // pair confusion matrix (ordered pairs), as sklearn.metrics.cluster.pair_confusion_matrix
    let tp = sum_squares - n;
    let fp = col_squares - sum_squares;
    let fn_ = row_squares - sum_squares;
    let tn = n * n - fp - fn_ - sum_squares;
    if fn_ == 0 && fp == 0 {
        return Ok(1.0);
    }
    let numerator = 2 * (tp * tn - fn_ * fp);
    let denominator = (tp + fn_) * (fn_ + tn) + (tp + fp) * (fp + tn);
    #[allow(clippy::cast_precision_loss)]
    let ari = numerator as f64 / denominator as f64;
    Ok(ari)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn relabelled_identical_partition_scores_one() {
        let ari = adjusted_rand_index(&[0, 0, 1, 1, 2], &[5, 5, 3, 3, 9]).unwrap();
        assert!((ari - 1.0).abs() < f64::EPSILON);
    }

    #[test]
    fn known_small_example_matches_reference() {
        // sklearn.metrics.adjusted_rand_score([0, 0, 1, 1], [0, 0, 1, 2]) = 0.5714285714285714
        let ari = adjusted_rand_index(&[0, 0, 1, 1], &[0, 0, 1, 2]).unwrap();
        assert!((ari - 0.571_428_571_428_571_4).abs() < 1e-12);
    }

    #[test]
    fn ari_is_symmetric() {
        let a = [0, 1, 1, 2, 2, 2, 0, 1];
        let b = [1, 1, 0, 2, 2, 0, 0, 1];
        let ab = adjusted_rand_index(&a, &b).unwrap();
        let ba = adjusted_rand_index(&b, &a).unwrap();
        assert!((ab - ba).abs() < 1e-15);
    }

    #[test]
    fn length_mismatch_is_rejected() {
        assert!(adjusted_rand_index(&[0, 1], &[0]).is_err());
    }
}
