//! Gaussian mixture with full covariance matrices, fitted by EM.
//!
//! Chosen over DBSCAN for non-spherical groups because customer features are strongly
//! correlated (frequency and monetary value move together): a full-covariance component
//! captures a tilted ellipsoid, gives every profile a soft membership (useful for "between
//! segments" customers) and needs no density radius to tune, while still assigning every
//! profile (DBSCAN would leave noise points unsegmented).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{ClusteringError, KMeans, KMeansConfig, Matrix};

/// Parameters of [`GaussianMixture::fit`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GaussianMixtureConfig {
    /// Number of components, `1 ≤ k ≤ rows`.
    pub k: usize,
    /// Maximum EM iterations (default 100).
    pub max_iter: usize,
    /// Stop when the mean log-likelihood per row changes by less than this (default 1e-3).
    pub tol: f64,
    /// Added to covariance diagonals to keep them positive definite (default 1e-6).
    pub reg_covar: f64,
    /// Seed of the k-means run that initialises the responsibilities.
    pub seed: u64,
}

impl Default for GaussianMixtureConfig {
    fn default() -> Self {
        Self {
            k: 4,
            max_iter: 100,
            tol: 1e-3,
            reg_covar: 1e-6,
            seed: 0,
        }
    }
}

/// A fitted Gaussian mixture: weights, means and full covariances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GaussianMixture {
    weights: Vec<f64>,
    means: Matrix,
    covariances: Vec<Matrix>,
    /// Lower Cholesky factors of the covariances, row-major `d × d`.
    cholesky: Vec<Vec<f64>>,
    mean_log_likelihood: f64,
    n_iter: usize,
    converged: bool,
}

/// Lower Cholesky factor of a symmetric `d × d` row-major matrix.
fn cholesky(a: &[f64], d: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..=i {
            let mut s = a[i * d + j];
            for t in 0..j {
                s -= l[i * d + t] * l[j * d + t];
            }
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    return None;
                }
                l[i * d + i] = s.sqrt();
            } else {
                l[i * d + j] = s / l[j * d + j];
            }
        }
    }
    Some(l)
}

/// Result of an M-step: weights, means, covariances and their Cholesky factors.
type MStep = (Vec<f64>, Matrix, Vec<Matrix>, Vec<Vec<f64>>);

struct Component<'a> {
    log_weight: f64,
    mean: &'a [f64],
    chol: &'a [f64],
    log_det: f64,
}

/// `ln N(x | mean, L Lᵀ)` using forward substitution with the Cholesky factor.
#[allow(clippy::needless_range_loop)] // triangular solve: indices are the clearest form
fn log_density(x: &[f64], c: &Component<'_>, y: &mut [f64]) -> f64 {
    let d = x.len();
    let mut maha = 0.0;
    for i in 0..d {
        let mut s = x[i] - c.mean[i];
        for t in 0..i {
            s -= c.chol[i * d + t] * y[t];
        }
        y[i] = s / c.chol[i * d + i];
        maha += y[i] * y[i];
    }
    #[allow(clippy::cast_precision_loss)]
    let dims = d as f64;
    -0.5 * (dims * (2.0 * std::f64::consts::PI).ln() + c.log_det + maha)
}

fn log_sum_exp(values: &[f64]) -> f64 {
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + values.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
}

impl GaussianMixture {
    fn components(&self) -> Vec<Component<'_>> {
        let d = self.means.cols();
        (0..self.weights.len())
            .map(|j| Component {
                log_weight: self.weights[j].ln(),
                mean: self.means.row(j),
                chol: &self.cholesky[j],
                log_det: 2.0
                    * (0..d)
                        .map(|i| self.cholesky[j][i * d + i].ln())
                        .sum::<f64>(),
            })
            .collect()
    }

    /// Weighted log densities `ln π_j + ln N(x | μ_j, Σ_j)` of one point.
    fn weighted_log_densities(components: &[Component<'_>], x: &[f64]) -> Vec<f64> {
        let mut y = vec![0.0; x.len()];
        components
            .iter()
            .map(|c| c.log_weight + log_density(x, c, &mut y))
            .collect()
    }

    /// E-step: log responsibilities (row-major `n × k`) and mean log-likelihood.
    fn e_step(&self, data: &Matrix) -> (Vec<f64>, f64) {
        let components = self.components();
        let rows: Vec<(Vec<f64>, f64)> = data
            .as_slice()
            .par_chunks(data.cols())
            .map(|x| {
                let mut w = Self::weighted_log_densities(&components, x);
                let norm = log_sum_exp(&w);
                for v in &mut w {
                    *v -= norm;
                }
                (w, norm)
            })
            .collect();
        let mut log_resp = Vec::with_capacity(data.rows() * self.weights.len());
        let mut total = 0.0;
        for (w, norm) in rows {
            log_resp.extend(w);
            total += norm;
        }
        #[allow(clippy::cast_precision_loss)]
        let n = data.rows() as f64;
        (log_resp, total / n)
    }

    /// M-step from responsibilities (row-major `n × k`).
    fn m_step(
        data: &Matrix,
        resp: &[f64],
        k: usize,
        reg_covar: f64,
    ) -> Result<MStep, ClusteringError> {
        let d = data.cols();
        #[allow(clippy::cast_precision_loss)]
        let n = data.rows() as f64;
        let mut nk = vec![10.0 * f64::EPSILON; k];
        let mut means = vec![0.0; k * d];
        for (x, r) in data.iter_rows().zip(resp.chunks_exact(k)) {
            for j in 0..k {
                nk[j] += r[j];
                for t in 0..d {
                    means[j * d + t] += r[j] * x[t];
                }
            }
        }
        for j in 0..k {
            for t in 0..d {
                means[j * d + t] /= nk[j];
            }
        }
        let mut covs = vec![vec![0.0; d * d]; k];
        let mut diff = vec![0.0; d];
        for (x, r) in data.iter_rows().zip(resp.chunks_exact(k)) {
            for j in 0..k {
                for t in 0..d {
                    diff[t] = x[t] - means[j * d + t];
                }
                let cov = &mut covs[j];
                for a in 0..d {
                    for b in 0..=a {
                        cov[a * d + b] += r[j] * diff[a] * diff[b];
                    }
                }
            }
        }
        let mut chols = Vec::with_capacity(k);
        let mut cov_mats = Vec::with_capacity(k);
        for (j, cov) in covs.iter_mut().enumerate() {
            for a in 0..d {
                for b in 0..=a {
                    cov[a * d + b] /= nk[j];
                    cov[b * d + a] = cov[a * d + b];
                }
                cov[a * d + a] += reg_covar;
            }
            let chol = cholesky(cov, d).ok_or_else(|| {
                ClusteringError::Numerical(format!(
                    "covariance of component {j} is not positive definite; increase reg_covar"
                ))
            })?;
            chols.push(chol);
            cov_mats.push(Matrix::new(cov.clone(), d)?);
        }
        let weights = nk.iter().map(|v| v / n).collect();
        Ok((weights, Matrix::new(means, d)?, cov_mats, chols))
    }

    /// Fits the mixture by EM: responsibilities start from a k-means partition (one-hot, as
    /// scikit-learn's `init_params="kmeans"`), then E and M steps alternate until the mean
    /// log-likelihood per row improves by less than `tol` or `max_iter` is reached.
    /// Deterministic for a seed.
    ///
    /// # Errors
    /// [`ClusteringError::InvalidParameter`] for invalid k or parameters,
    /// [`ClusteringError::Numerical`] when a covariance degenerates despite `reg_covar`.
    pub fn fit(data: &Matrix, config: &GaussianMixtureConfig) -> Result<Self, ClusteringError> {
        if config.max_iter == 0
            || !(config.tol.is_finite() && config.tol >= 0.0)
            || config.reg_covar.is_nan()
            || config.reg_covar < 0.0
        {
            return Err(ClusteringError::InvalidParameter(
                "max_iter ≥ 1, tol ≥ 0 and reg_covar ≥ 0 required".into(),
            ));
        }
        let k = config.k;
        let kmeans = KMeans::fit(
            data,
            &KMeansConfig {
                k,
                n_init: 1,
                seed: config.seed,
                ..KMeansConfig::default()
            },
        )?;
        let mut resp = vec![0.0; data.rows() * k];
        for (i, &l) in kmeans.labels().iter().enumerate() {
            resp[i * k + l] = 1.0;
        }
        let (weights, means, covariances, cholesky) =
            Self::m_step(data, &resp, k, config.reg_covar)?;
        let mut model = Self {
            weights,
            means,
            covariances,
            cholesky,
            mean_log_likelihood: f64::NEG_INFINITY,
            n_iter: 0,
            converged: false,
        };
        for iteration in 1..=config.max_iter {
            let (log_resp, mean_ll) = model.e_step(data);
            for (r, lr) in resp.iter_mut().zip(&log_resp) {
                *r = lr.exp();
            }
            let (weights, means, covariances, cholesky) =
                Self::m_step(data, &resp, k, config.reg_covar)?;
            model.weights = weights;
            model.means = means;
            model.covariances = covariances;
            model.cholesky = cholesky;
            let change = mean_ll - model.mean_log_likelihood;
            model.mean_log_likelihood = mean_ll;
            model.n_iter = iteration;
            if change.abs() < config.tol {
                model.converged = true;
                break;
            }
        }
        Ok(model)
    }

    /// Mixing weights, summing to 1.
    #[must_use]
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// Component means, one row per component.
    #[must_use]
    pub fn means(&self) -> &Matrix {
        &self.means
    }

    /// Component covariance matrices (`d × d`, including `reg_covar` on the diagonal).
    #[must_use]
    pub fn covariances(&self) -> &[Matrix] {
        &self.covariances
    }

    /// Mean log-likelihood per row at the last E-step (nats).
    #[must_use]
    pub fn mean_log_likelihood(&self) -> f64 {
        self.mean_log_likelihood
    }

    /// EM iterations run.
    #[must_use]
    pub fn n_iter(&self) -> usize {
        self.n_iter
    }

    /// Whether EM converged before `max_iter`.
    #[must_use]
    pub fn converged(&self) -> bool {
        self.converged
    }

    /// Posterior membership probabilities of `point` for each component (sum to 1).
    #[must_use]
    pub fn predict_proba(&self, point: &[f64]) -> Vec<f64> {
        let components = self.components();
        let mut w = Self::weighted_log_densities(&components, point);
        let norm = log_sum_exp(&w);
        for v in &mut w {
            *v = (*v - norm).exp();
        }
        w
    }

    /// Most probable component of `point` (first on ties).
    #[must_use]
    pub fn predict(&self, point: &[f64]) -> usize {
        let components = self.components();
        let w = Self::weighted_log_densities(&components, point);
        let mut best = 0;
        for (j, v) in w.iter().enumerate() {
            if *v > w[best] {
                best = j;
            }
        }
        best
    }

    /// Bayesian information criterion on `data` (lower is better), for choosing k:
    /// `-2 · ln L + p · ln n` with `p = (k - 1) + k·d + k·d(d + 1)/2`.
    #[must_use]
    pub fn bic(&self, data: &Matrix) -> f64 {
        let (_, mean_ll) = self.e_step(data);
        let k = self.weights.len();
        let d = self.means.cols();
        #[allow(clippy::cast_precision_loss)]
        let (n, params) = (
            data.rows() as f64,
            ((k - 1) + k * d + k * d * (d + 1) / 2) as f64,
        );
        -2.0 * mean_ll * n + params * n.ln()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn normal(rng: &mut ChaCha8Rng) -> f64 {
        let u: f64 = 1.0 - rng.r#gen::<f64>();
        let v: f64 = rng.r#gen::<f64>();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// A tight round group next to a long, tilted one (correlated features): the k-means
    /// bisector cuts the tilted group's near tail off, a full-covariance mixture does not.
    fn round_and_tilted(per: usize) -> (Matrix, Vec<usize>) {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut data = Vec::new();
        let mut truth = Vec::new();
        for _ in 0..per {
            data.push(0.3 * normal(&mut rng));
            data.push(0.3 * normal(&mut rng));
            truth.push(0);
        }
        for _ in 0..per {
            let along = 3.0 * normal(&mut rng);
            let across = 0.3 * normal(&mut rng);
            data.push(4.0 + (along + across) / std::f64::consts::SQRT_2);
            data.push((along - across) / std::f64::consts::SQRT_2);
            truth.push(1);
        }
        (Matrix::new(data, 2).unwrap(), truth)
    }

    #[test]
    fn full_covariance_separates_tilted_group_better_than_kmeans() {
        let (data, truth) = round_and_tilted(300);
        let gmm = GaussianMixture::fit(
            &data,
            &GaussianMixtureConfig {
                k: 2,
                ..GaussianMixtureConfig::default()
            },
        )
        .unwrap();
        let labels: Vec<usize> = data.iter_rows().map(|x| gmm.predict(x)).collect();
        let ari = crate::clustering::adjusted_rand_index(&truth, &labels).unwrap();
        assert!(ari > 0.95, "gmm ari {ari}");
        let kmeans = KMeans::fit(
            &data,
            &KMeansConfig {
                k: 2,
                ..KMeansConfig::default()
            },
        )
        .unwrap();
        let kmeans_ari = crate::clustering::adjusted_rand_index(&truth, kmeans.labels()).unwrap();
        assert!(
            ari > kmeans_ari + 0.05,
            "gmm ari {ari} vs k-means ari {kmeans_ari}"
        );
    }

    #[test]
    fn probabilities_sum_to_one_and_weights_sum_to_one() {
        let (data, _) = round_and_tilted(100);
        let gmm = GaussianMixture::fit(
            &data,
            &GaussianMixtureConfig {
                k: 3,
                ..GaussianMixtureConfig::default()
            },
        )
        .unwrap();
        let p = gmm.predict_proba(data.row(0));
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((gmm.weights().iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(gmm.mean_log_likelihood().is_finite());
    }

    #[test]
    fn bic_prefers_true_component_count() {
        let (data, _) = round_and_tilted(300);
        let bic = |k| {
            GaussianMixture::fit(
                &data,
                &GaussianMixtureConfig {
                    k,
                    ..GaussianMixtureConfig::default()
                },
            )
            .unwrap()
            .bic(&data)
        };
        assert!(bic(2) < bic(1));
    }

    #[test]
    fn cholesky_rejects_indefinite_matrix() {
        assert!(cholesky(&[1.0, 2.0, 2.0, 1.0], 2).is_none());
        let l = cholesky(&[4.0, 2.0, 2.0, 3.0], 2).unwrap();
        assert!(
            (l[0] - 2.0).abs() < 1e-12
                && (l[2] - 1.0).abs() < 1e-12
                && (l[3] - 2.0_f64.sqrt()).abs() < 1e-12
        );
    }
}
