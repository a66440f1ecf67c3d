//! `log1p` + z-score preprocessing with stored parameters.

use serde::{Deserialize, Serialize};

use super::{ClusteringError, Matrix};

/// Per-feature `z = (ln(1 + x) - mean) / std`, fitted on a base and reusable on new points.
///
/// `mean` and `std` are the population mean and standard deviation (ddof = 0, as
/// scikit-learn's `StandardScaler`) of `ln(1 + x)` over the fitting data. A constant feature
/// has `std` stored as 1.0 so it maps to 0 instead of dividing by zero. Inputs must be finite
/// and greater than -1 (RFM features are non-negative).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Log1pStandardizer {
    means: Vec<f64>,
    stds: Vec<f64>,
}

fn check_domain(data: &Matrix) -> Result<(), ClusteringError> {
    data.check_finite()?;
    for (row, values) in data.iter_rows().enumerate() {
        if let Some(col) = values.iter().position(|&v| v <= -1.0) {
            return Err(ClusteringError::InvalidValue {
                row,
                col,
                reason: "log1p needs values greater than -1",
            });
        }
    }
    Ok(())
}

impl Log1pStandardizer {
    /// Fits means and standard deviations of `ln(1 + x)` per column.
    ///
    /// # Errors
    /// [`ClusteringError::InvalidParameter`] for an empty matrix,
    /// [`ClusteringError::InvalidValue`] for non-finite values or values ≤ -1.
    pub fn fit(data: &Matrix) -> Result<Self, ClusteringError> {
        if data.rows() == 0 {
            return Err(ClusteringError::InvalidParameter(
                "cannot fit a scaler on no rows".into(),
            ));
        }
        check_domain(data)?;
        let d = data.cols();
        #[allow(clippy::cast_precision_loss)]
        let n = data.rows() as f64;
        let mut means = vec![0.0; d];
        for row in data.iter_rows() {
            for (m, &x) in means.iter_mut().zip(row) {
                *m += x.ln_1p();
            }
        }
        for m in &mut means {
            *m /= n;
        }
        let mut vars = vec![0.0; d];
        for row in data.iter_rows() {
            for ((v, &x), &m) in vars.iter_mut().zip(row).zip(&means) {
                let diff = x.ln_1p() - m;
                *v += diff * diff;
            }
        }
        let stds = vars
            .into_iter()
            .map(|v| {
                let s = (v / n).sqrt();
                if s > 0.0 { s } else { 1.0 }
            })
            .collect();
        Ok(Self { means, stds })
    }

    /// Builds a standardizer from stored parameters (e.g. loaded from the model store).
    ///
    /// # Errors
    /// [`ClusteringError::DimensionMismatch`] when lengths differ,
    /// [`ClusteringError::InvalidParameter`] for a non-positive or non-finite std.
    pub fn from_parameters(means: Vec<f64>, stds: Vec<f64>) -> Result<Self, ClusteringError> {
        if means.len() != stds.len() || means.is_empty() {
            return Err(ClusteringError::DimensionMismatch(format!(
                "{} means vs {} stds",
                means.len(),
                stds.len()
            )));
        }
        if stds.iter().chain(&means).any(|s| !s.is_finite()) || stds.iter().any(|&s| s <= 0.0) {
            return Err(ClusteringError::InvalidParameter(
                "stds must be finite and positive".into(),
            ));
        }
        Ok(Self { means, stds })
    }

    /// Fits on `data` and returns the transformed data too.
    ///
    /// # Errors
    /// As [`Self::fit`].
    pub fn fit_transform(data: &Matrix) -> Result<(Self, Matrix), ClusteringError> {
        let scaler = Self::fit(data)?;
        let transformed = scaler.transform(data)?;
        Ok((scaler, transformed))
    }

    /// Means of `ln(1 + x)` per feature.
    #[must_use]
    pub fn means(&self) -> &[f64] {
        &self.means
    }

    /// Standard deviations of `ln(1 + x)` per feature (1.0 for constant features).
    #[must_use]
    pub fn stds(&self) -> &[f64] {
        &self.stds
    }

    fn check_cols(&self, cols: usize) -> Result<(), ClusteringError> {
        if cols == self.means.len() {
            Ok(())
        } else {
            Err(ClusteringError::DimensionMismatch(format!(
                "scaler has {} features, input has {cols}",
                self.means.len()
            )))
        }
    }

    /// Projects one point (original units) into the standardized space.
    ///
    /// # Errors
    /// [`ClusteringError::DimensionMismatch`] for a wrong length,
    /// [`ClusteringError::InvalidValue`] for non-finite values or values ≤ -1.
    pub fn transform_point(&self, point: &[f64]) -> Result<Vec<f64>, ClusteringError> {
        let m = Matrix::new(point.to_vec(), point.len().max(1))?;
        Ok(self.transform(&m)?.into_vec())
    }

    /// Projects every row of `data` into the standardized space.
    ///
    /// # Errors
    /// As [`Self::transform_point`].
    pub fn transform(&self, data: &Matrix) -> Result<Matrix, ClusteringError> {
        self.check_cols(data.cols())?;
        check_domain(data)?;
        let mut out = data.clone();
        let d = self.means.len();
        for row in out.data.chunks_exact_mut(d) {
            for ((x, m), s) in row.iter_mut().zip(&self.means).zip(&self.stds) {
                *x = (x.ln_1p() - m) / s;
            }
        }
        Ok(out)
    }

    /// Maps standardized rows back to original units: `x = exp(z·std + mean) - 1`.
    ///
    /// # Errors
    /// [`ClusteringError::DimensionMismatch`] for a wrong column count.
    pub fn inverse_transform(&self, data: &Matrix) -> Result<Matrix, ClusteringError> {
        self.check_cols(data.cols())?;
        let mut out = data.clone();
        let d = self.means.len();
        for row in out.data.chunks_exact_mut(d) {
            for ((x, m), s) in row.iter_mut().zip(&self.means).zip(&self.stds) {
                *x = (*x * s + m).exp_m1();
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn transformed_columns_have_zero_mean_and_unit_variance() {
        let data =
            Matrix::from_rows(&[[0.0, 10.0], [3.0, 20.0], [8.0, 400.0], [1.0, 5.0]]).unwrap();
        let (_, z) = Log1pStandardizer::fit_transform(&data).unwrap();
        for c in 0..2 {
            let col: Vec<f64> = z.iter_rows().map(|r| r[c]).collect();
            let mean = col.iter().sum::<f64>() / 4.0;
            let var = col.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / 4.0;
            assert!(mean.abs() < 1e-12);
            assert!((var - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn inverse_transform_recovers_original_values() {
        let data =
            Matrix::from_rows(&[[0.0, 10.0, 2.5], [3.0, 20.0, 0.0], [8.0, 400.0, 7.0]]).unwrap();
        let (scaler, z) = Log1pStandardizer::fit_transform(&data).unwrap();
        let back = scaler.inverse_transform(&z).unwrap();
        for (a, b) in back.as_slice().iter().zip(data.as_slice()) {
            assert!((a - b).abs() < 1e-9 * b.abs().max(1.0));
        }
    }

    #[test]
    fn new_point_is_projected_with_stored_parameters() {
        let data = Matrix::from_rows(&[[1.0], [3.0]]).unwrap();
        let scaler = Log1pStandardizer::fit(&data).unwrap();
        let mean = (2.0_f64.ln() + 4.0_f64.ln()) / 2.0;
        let std = (4.0_f64.ln() - 2.0_f64.ln()) / 2.0;
        let z = scaler.transform_point(&[7.0]).unwrap();
        assert!((z[0] - (8.0_f64.ln() - mean) / std).abs() < 1e-12);
    }

    #[test]
    fn constant_feature_maps_to_zero() {
        let data = Matrix::from_rows(&[[5.0, 1.0], [5.0, 2.0]]).unwrap();
        let (scaler, z) = Log1pStandardizer::fit_transform(&data).unwrap();
        assert!((scaler.stds()[0] - 1.0).abs() < f64::EPSILON);
        assert!(z.row(0)[0].abs() < 1e-12 && z.row(1)[0].abs() < 1e-12);
    }

    #[test]
    fn values_at_or_below_minus_one_are_rejected() {
        let data = Matrix::from_rows(&[[0.0], [-1.0]]).unwrap();
        assert!(matches!(
            Log1pStandardizer::fit(&data),
            Err(ClusteringError::InvalidValue { row: 1, col: 0, .. })
        ));
    }

    #[test]
    fn wrong_feature_count_is_rejected() {
        let scaler = Log1pStandardizer::fit(&Matrix::from_rows(&[[1.0, 2.0]]).unwrap()).unwrap();
        assert!(matches!(
            scaler.transform_point(&[1.0]),
            Err(ClusteringError::DimensionMismatch(_))
        ));
    }
}
