//! Silhouette coefficient (Rousseeuw 1987) with Euclidean distance.

use rand::SeedableRng;
use rand::seq::index;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::{ClusteringError, Matrix, densify_labels, squared_euclidean};

fn check_inputs(data: &Matrix, labels: &[usize]) -> Result<(Vec<usize>, usize), ClusteringError> {
    if labels.len() != data.rows() {
        return Err(ClusteringError::DimensionMismatch(format!(
            "{} labels for {} rows",
            labels.len(),
            data.rows()
        )));
    }
    data.check_finite()?;
    let (dense, c) = densify_labels(labels);
    if c < 2 || c >= data.rows() {
        return Err(ClusteringError::InvalidParameter(format!(
            "silhouette needs 2 <= number of clusters <= rows - 1, got {c} clusters for {} rows",
            data.rows()
        )));
    }
    Ok((dense, c))
}

/// Silhouette of every row: `s(i) = (b - a) / max(a, b)` where `a` is the mean distance to the
/// other members of its cluster and `b` the smallest mean distance to another cluster's
/// members; 0 for members of singleton clusters (and when `a = b = 0`), as scikit-learn.
/// Values in `[-1, 1]`. Exact, `O(rows² · cols)` time, parallel over rows.
///
/// # Errors
/// [`ClusteringError::DimensionMismatch`] when `labels` and rows differ in number,
/// [`ClusteringError::InvalidParameter`] unless `2 ≤ clusters ≤ rows - 1`,
/// [`ClusteringError::InvalidValue`] for non-finite data.
pub fn silhouette_samples(data: &Matrix, labels: &[usize]) -> Result<Vec<f64>, ClusteringError> {
    let (dense, c) = check_inputs(data, labels)?;
    let mut sizes = vec![0_usize; c];
    for &l in &dense {
        sizes[l] += 1;
    }
    let scores = (0..data.rows())
        .into_par_iter()
        .map(|i| {
            let xi = data.row(i);
            let mut sums = vec![0.0; c];
            for (xj, &lj) in data.iter_rows().zip(&dense) {
                sums[lj] += squared_euclidean(xi, xj).sqrt();
            }
            let own = dense[i];
            if sizes[own] <= 1 {
                return 0.0;
            }
            #[allow(clippy::cast_precision_loss)]
            let a = sums[own] / (sizes[own] - 1) as f64;
            #[allow(clippy::cast_precision_loss)]
            let b = (0..c)
                .filter(|&l| l != own)
                .map(|l| sums[l] / sizes[l] as f64)
                .fold(f64::INFINITY, f64::min);
            let denom = a.max(b);
            if denom > 0.0 { (b - a) / denom } else { 0.0 }
        })
        .collect();
    Ok(scores)
}

/// Mean silhouette over all rows, exact (see [`silhouette_samples`]); `O(rows²)`, so use
/// [`silhouette_score_sampled`] above a few thousand rows.
///
/// # Errors
/// As [`silhouette_samples`].
pub fn silhouette_score(data: &Matrix, labels: &[usize]) -> Result<f64, ClusteringError> {
    let samples = silhouette_samples(data, labels)?;
    #[allow(clippy::cast_precision_loss)]
    let n = samples.len() as f64;
    Ok(samples.iter().sum::<f64>() / n)
}

/// Silhouette on a uniform random subset of `sample_size` rows drawn without replacement
/// with a ChaCha8 generator seeded by `seed` (scikit-learn's `sample_size` semantics:
/// distances are computed within the subset only). Exact when `sample_size ≥ rows`.
/// Deterministic for a seed. Cost `O(sample_size² · cols)`: 10 000 rows take well under a
/// second; the standard error of the estimate is roughly `std(s) / √sample_size`.
///
/// # Errors
/// As [`silhouette_samples`], evaluated on the subset (which must still contain at least two
/// clusters).
pub fn silhouette_score_sampled(
    data: &Matrix,
    labels: &[usize],
    sample_size: usize,
    seed: u64,
) -> Result<f64, ClusteringError> {
    if labels.len() != data.rows() {
        return Err(ClusteringError::DimensionMismatch(format!(
            "{} labels for {} rows",
            labels.len(),
            data.rows()
        )));
    }
    if sample_size >= data.rows() {
        return silhouette_score(data, labels);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut picked = index::sample(&mut rng, data.rows(), sample_size).into_vec();
    picked.sort_unstable();
    let subset = data.select_rows(&picked);
    let sub_labels: Vec<usize> = picked.iter().map(|&i| labels[i]).collect();
    silhouette_score(&subset, &sub_labels)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn two_point_clusters_on_a_line_have_known_silhouette() {
        // clusters {0, 1} and {10, 11}: a = 1, b = 10 or 9 / 11 means
        let data = Matrix::from_rows(&[[0.0], [1.0], [10.0], [11.0]]).unwrap();
        let s = silhouette_samples(&data, &[0, 0, 1, 1]).unwrap();
        assert!((s[0] - (10.5 - 1.0) / 10.5).abs() < 1e-12);
        assert!((s[1] - (9.5 - 1.0) / 9.5).abs() < 1e-12);
    }

    #[test]
    fn singleton_cluster_member_scores_zero() {
        let data = Matrix::from_rows(&[[0.0], [1.0], [10.0]]).unwrap();
        let s = silhouette_samples(&data, &[0, 0, 7]).unwrap();
        assert!(s[2].abs() < f64::EPSILON);
    }

    #[test]
    fn single_cluster_is_rejected() {
        let data = Matrix::from_rows(&[[0.0], [1.0], [10.0]]).unwrap();
        assert!(matches!(
            silhouette_score(&data, &[0, 0, 0]),
            Err(ClusteringError::InvalidParameter(_))
        ));
    }

    #[test]
    fn sampled_score_is_exact_when_sample_covers_all_rows() {
        let data = Matrix::from_rows(&[[0.0], [1.0], [10.0], [11.0], [5.0]]).unwrap();
        let labels = [0, 0, 1, 1, 1];
        let exact = silhouette_score(&data, &labels).unwrap();
        let sampled = silhouette_score_sampled(&data, &labels, 10, 3).unwrap();
        assert!((exact - sampled).abs() < f64::EPSILON);
    }

    #[test]
    fn sampled_score_is_deterministic_for_a_seed() {
        let data = Matrix::new((0..400).map(f64::from).collect(), 1).unwrap();
        let labels: Vec<usize> = (0..400).map(|i| usize::from(i >= 200)).collect();
        let a = silhouette_score_sampled(&data, &labels, 50, 11).unwrap();
        let b = silhouette_score_sampled(&data, &labels, 50, 11).unwrap();
        assert!((a - b).abs() < f64::EPSILON);
        let exact = silhouette_score(&data, &labels).unwrap();
        assert!((a - exact).abs() < 0.1);
    }
}
