//! Behavioural clustering of customers: preprocessing, k-means, Gaussian mixtures, quality
//! and stability metrics, and a run report.
//!
//! Typical flow ([`run_kmeans_segmentation`] does all of it):
//!
//! 1. [`Log1pStandardizer`]: `log1p` then z-score each feature (RFM features are heavily
//!    right-skewed; the log makes Euclidean distance meaningful), keeping the means and
//!    standard deviations so new profiles can be projected later;
//! 2. [`KMeans`]: k-means++ seeding and Lloyd iterations, deterministic for a seed;
//! 3. [`silhouette_score`] / [`silhouette_score_sampled`] to judge separation and
//!    [`select_k_by_silhouette`] to choose k;
//! 4. [`adjusted_rand_index`] between reruns with different seeds to measure stability;
//! 5. [`GaussianMixture`] (full covariance EM) when groups are elongated or correlated
//!    rather than spherical.
//!
//! Data is a row-major [`Matrix`] of `f64` (one row per profile). Everything is pure; the
//! only parallelism is rayon inside k-means and the silhouette, and results do not depend on
//! the number of threads (partial sums are combined in a fixed order).

mod ari;
mod gmm;
mod kmeans;
mod matching;
mod preprocess;
mod report;
mod silhouette;

pub use ari::adjusted_rand_index;
pub use gmm::{GaussianMixture, GaussianMixtureConfig};
pub use kmeans::{KMeans, KMeansConfig, kmeans_plus_plus};
pub use matching::{match_centroids, min_cost_assignment};
pub use preprocess::Log1pStandardizer;
pub use report::{
    ClusteringReport, ClusteringRun, KChoice, KScore, SegmentationConfig, run_kmeans_segmentation,
    select_k_by_silhouette,
};
pub use silhouette::{silhouette_samples, silhouette_score, silhouette_score_sampled};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors of the clustering module.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ClusteringError {
    /// The data buffer length is not a multiple of the column count, or there are no columns.
    #[error("matrix shape mismatch: {len} values cannot form rows of {cols} columns")]
    Shape {
        /// Length of the flat buffer.
        len: usize,
        /// Requested number of columns.
        cols: usize,
    },
    /// Two inputs that must agree in size do not.
    #[error("dimension mismatch: {0}")]
    DimensionMismatch(String),
    /// A value is NaN or infinite, or outside the domain of a transform.
    #[error("invalid value at row {row}, column {col}: {reason}")]
    InvalidValue {
        /// Row of the value.
        row: usize,
        /// Column of the value.
        col: usize,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// A parameter is out of range (k = 0, more clusters than points, …).
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// Numerical failure, e.g. a covariance matrix that is not positive definite.
    #[error("numerical failure: {0}")]
    Numerical(String),
}

/// A dense row-major matrix of `f64`: row `i` is `data[i*cols .. (i+1)*cols]`.
///
/// The flat layout keeps k-means' inner loops cache-friendly and vectorisable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Matrix {
    data: Vec<f64>,
    rows: usize,
    cols: usize,
}

impl Matrix {
    /// Wraps a flat row-major buffer.
    ///
    /// # Errors
    /// [`ClusteringError::Shape`] when `cols == 0` or `data.len()` is not a multiple of
    /// `cols`.
    pub fn new(data: Vec<f64>, cols: usize) -> Result<Self, ClusteringError> {
        if cols == 0 || !data.len().is_multiple_of(cols) {
            return Err(ClusteringError::Shape {
                len: data.len(),
                cols,
            });
        }
        let rows = data.len() / cols;
        Ok(Self { data, rows, cols })
    }

    /// Builds a matrix from rows of equal length.
    ///
    /// # Errors
    /// [`ClusteringError::Shape`] for no rows, empty rows or rows of different lengths.
    pub fn from_rows<R: AsRef<[f64]>>(rows: &[R]) -> Result<Self, ClusteringError> {
        let cols = rows.first().map_or(0, |r| r.as_ref().len());
        let mut data = Vec::with_capacity(rows.len() * cols);
        for row in rows {
            let row = row.as_ref();
            if row.len() != cols {
                return Err(ClusteringError::Shape {
                    len: row.len(),
                    cols,
                });
            }
            data.extend_from_slice(row);
        }
        Self::new(data, cols)
    }

    /// A `rows × cols` matrix of zeros (`cols` must be positive for later use).
    #[must_use]
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            data: vec![0.0; rows * cols],
            rows,
            cols,
        }
    }

    /// Number of rows (points).
    #[must_use]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (features).
    #[must_use]
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `i`. Panics if `i >= rows()`.
    #[must_use]
    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// Mutable row `i`. Panics if `i >= rows()`.
    pub fn row_mut(&mut self, i: usize) -> &mut [f64] {
        &mut self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// The flat row-major buffer.
    #[must_use]
    pub fn as_slice(&self) -> &[f64] {
        &self.data
    }

    /// Consumes the matrix, returning the flat row-major buffer.
    #[must_use]
    pub fn into_vec(self) -> Vec<f64> {
        self.data
    }

    /// Iterator over rows.
    pub fn iter_rows(&self) -> impl ExactSizeIterator<Item = &[f64]> {
        self.data.chunks_exact(self.cols)
    }

    /// The rows at `indices`, in that order.
    #[must_use]
    pub fn select_rows(&self, indices: &[usize]) -> Self {
        let mut data = Vec::with_capacity(indices.len() * self.cols);
        for &i in indices {
            data.extend_from_slice(self.row(i));
        }
        Self {
            data,
            rows: indices.len(),
            cols: self.cols,
        }
    }

    /// Checks that every value is finite.
    ///
    /// # Errors
    /// [`ClusteringError::InvalidValue`] at the first NaN or infinity.
    pub fn check_finite(&self) -> Result<(), ClusteringError> {
        match self.data.iter().position(|v| !v.is_finite()) {
            None => Ok(()),
            Some(pos) => Err(ClusteringError::InvalidValue {
                row: pos / self.cols,
                col: pos % self.cols,
                reason: "not finite",
            }),
        }
    }
}

/// Squared Euclidean distance of two equally long slices.
#[inline]
#[must_use]
pub fn squared_euclidean(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Maps arbitrary labels to dense `0..c` in order of first appearance; returns the dense
/// labels and `c`.
fn densify_labels(labels: &[usize]) -> (Vec<usize>, usize) {
    let mut map = std::collections::HashMap::new();
    let dense = labels
        .iter()
        .map(|&l| {
            let next = map.len();
            *map.entry(l).or_insert(next)
        })
        .collect();
    (dense, map.len())
}
