//! Choice of k by silhouette and the end-to-end k-means segmentation run with its report.

use serde::{Deserialize, Serialize};

use super::{
    ClusteringError, KMeans, KMeansConfig, Log1pStandardizer, Matrix, adjusted_rand_index,
    silhouette_score_sampled,
};

/// Silhouette and inertia of one candidate k.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KScore {
    /// Number of clusters.
    pub k: usize,
    /// (Sampled) silhouette of the k-means partition, in `[-1, 1]`.
    pub silhouette: f64,
    /// k-means inertia on all rows.
    pub inertia: f64,
}

/// Fits k-means for every k in `k_min..=k_max` (with `kmeans` for everything but k) and
/// returns the model with the highest silhouette — computed with
/// [`silhouette_score_sampled`] on `silhouette_sample_size` rows and seed `kmeans.seed` —
/// plus the scores of every k. Ties go to the smaller k (the simpler segmentation).
///
/// # Errors
/// [`ClusteringError::InvalidParameter`] unless `2 ≤ k_min ≤ k_max < rows`; errors of
/// [`KMeans::fit`] and the silhouette.
pub fn select_k_by_silhouette(
    data: &Matrix,
    k_min: usize,
    k_max: usize,
    kmeans: &KMeansConfig,
    silhouette_sample_size: usize,
) -> Result<(KMeans, Vec<KScore>), ClusteringError> {
    if k_min < 2 || k_min > k_max || k_max >= data.rows() {
        return Err(ClusteringError::InvalidParameter(format!(
            "k range {k_min}..={k_max} must satisfy 2 <= min <= max < rows ({})",
            data.rows()
        )));
    }
    let mut best: Option<(f64, KMeans)> = None;
    let mut scores = Vec::with_capacity(k_max - k_min + 1);
    for k in k_min..=k_max {
        let model = KMeans::fit(
            data,
            &KMeansConfig {
                k,
                ..kmeans.clone()
            },
        )?;
        let silhouette =
            silhouette_score_sampled(data, model.labels(), silhouette_sample_size, kmeans.seed)?;
        scores.push(KScore {
            k,
            silhouette,
            inertia: model.inertia(),
        });
        if best.as_ref().is_none_or(|(s, _)| silhouette > *s) {
            best = Some((silhouette, model));
        }
    }
    best.map(|(_, m)| (m, scores))
        .ok_or_else(|| ClusteringError::InvalidParameter("empty k range".into()))
}

/// How [`run_kmeans_segmentation`] chooses k.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KChoice {
    /// Use exactly this k.
    Fixed(usize),
    /// Best silhouette over `min..=max` (see [`select_k_by_silhouette`]).
    BySilhouette {
        /// Smallest k tried (≥ 2).
        min: usize,
        /// Largest k tried.
        max: usize,
    },
}

/// Configuration of [`run_kmeans_segmentation`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentationConfig {
    /// How k is chosen (default: silhouette over 3..=8).
    pub k: KChoice,
    /// k-means parameters; its `k` field is ignored in favour of [`Self::k`].
    pub kmeans: KMeansConfig,
    /// Rows used for the silhouette (default 10 000; exact below that).
    pub silhouette_sample_size: usize,
    /// Reruns with seeds `seed + 1 ..= seed + stability_reruns` compared by adjusted Rand
    /// index to the kept model (default 2; 0 skips the stability check).
    pub stability_reruns: usize,
}

impl Default for SegmentationConfig {
    fn default() -> Self {
        Self {
            k: KChoice::BySilhouette { min: 3, max: 8 },
            kmeans: KMeansConfig::default(),
            silhouette_sample_size: 10_000,
            stability_reruns: 2,
        }
    }
}

/// Summary of a segmentation run, for display and for deciding whether to publish it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusteringReport {
    /// Number of clusters.
    pub k: usize,
    /// Rows per cluster.
    pub sizes: Vec<usize>,
    /// Centroids mapped back to original feature units by the inverse transform
    /// (`exp(z·std + mean) - 1`): the back-transformed log-space mean, i.e. a geometric-mean
    /// style "typical member", less sensitive to outliers than the arithmetic mean.
    pub centroids_original: Matrix,
    /// Centroids in the standardized space the model was fitted in.
    pub centroids_standardized: Matrix,
    /// Silhouette of the partition (sampled, see [`SegmentationConfig`]).
    pub silhouette: f64,
    /// k-means inertia in the standardized space.
    pub inertia: f64,
    /// Mean adjusted Rand index between the kept model and the reruns; `None` when
    /// `stability_reruns = 0`. Near 1 means the segmentation does not depend on the seed.
    pub stability_ari: Option<f64>,
    /// Silhouette and inertia per k tried (only the chosen k for [`KChoice::Fixed`]).
    pub k_scores: Vec<KScore>,
    /// Lloyd iterations of the kept model.
    pub n_iter: usize,
    /// Whether the kept model converged.
    pub converged: bool,
}

/// Everything a segmentation run produces: the report plus what is needed to assign new
/// profiles (transform with `scaler`, then `model.predict`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusteringRun {
    /// The run summary.
    pub report: ClusteringReport,
    /// The fitted preprocessing.
    pub scaler: Log1pStandardizer,
    /// The fitted k-means model (labels are in the order of the input rows).
    pub model: KMeans,
}

/// Runs the whole k-means segmentation on raw features (original units, each > -1): fit
/// [`Log1pStandardizer`], choose k and fit [`KMeans`], compute the silhouette and stability,
/// and build the [`ClusteringReport`]. Deterministic for `config.kmeans.seed`.
///
/// # Errors
/// Errors of the preprocessing, k-means, silhouette and ARI steps.
pub fn run_kmeans_segmentation(
    raw: &Matrix,
    config: &SegmentationConfig,
) -> Result<ClusteringRun, ClusteringError> {
    let (scaler, data) = Log1pStandardizer::fit_transform(raw)?;
    let (model, k_scores) = match config.k {
        KChoice::Fixed(k) => {
            let model = KMeans::fit(
                &data,
                &KMeansConfig {
                    k,
                    ..config.kmeans.clone()
                },
            )?;
            let silhouette = silhouette_score_sampled(
                &data,
                model.labels(),
                config.silhouette_sample_size,
                config.kmeans.seed,
            )?;
            let score = KScore {
                k,
                silhouette,
                inertia: model.inertia(),
            };
            (model, vec![score])
        }
        KChoice::BySilhouette { min, max } => select_k_by_silhouette(
            &data,
            min,
            max,
            &config.kmeans,
            config.silhouette_sample_size,
        )?,
    };
    let k = model.k();
    let silhouette = k_scores
        .iter()
        .find(|s| s.k == k)
        .map_or(f64::NAN, |s| s.silhouette);
    let mut aris = Vec::with_capacity(config.stability_reruns);
    for r in 1..=config.stability_reruns {
        let rerun = KMeans::fit(
            &data,
            &KMeansConfig {
                k,
                seed: config.kmeans.seed.wrapping_add(r as u64),
                ..config.kmeans.clone()
            },
        )?;
        aris.push(adjusted_rand_index(model.labels(), rerun.labels())?);
    }
    #[allow(clippy::cast_precision_loss)]
    let stability_ari = (!aris.is_empty()).then(|| aris.iter().sum::<f64>() / aris.len() as f64);
    let report = ClusteringReport {
        k,
        sizes: model.cluster_sizes(),
        centroids_original: scaler.inverse_transform(model.centroids())?,
        centroids_standardized: model.centroids().clone(),
        silhouette,
        inertia: model.inertia(),
        stability_ari,
        k_scores,
        n_iter: model.n_iter(),
        converged: model.converged(),
    };
    Ok(ClusteringRun {
        report,
        scaler,
        model,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// Three customer groups in original units (recency days, orders, spend).
    fn customers(per: usize) -> Matrix {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let groups = [
            [5.0, 20.0, 50_000.0],
            [60.0, 4.0, 8_000.0],
            [300.0, 1.0, 1_500.0],
        ];
        let mut data = Vec::new();
        for g in &groups {
            for _ in 0..per {
                for x in g {
                    data.push(x * rng.gen_range(0.8..1.25));
                }
            }
        }
        Matrix::new(data, 3).unwrap()
    }

    #[test]
    fn silhouette_selection_finds_three_groups_and_reports_them() {
        let run = run_kmeans_segmentation(
            &customers(200),
            &SegmentationConfig {
                k: KChoice::BySilhouette { min: 2, max: 6 },
                ..SegmentationConfig::default()
            },
        )
        .unwrap();
        let report = &run.report;
        assert_eq!(report.k, 3);
        assert_eq!(report.k_scores.len(), 5);
        let mut sizes = report.sizes.clone();
        sizes.sort_unstable();
        assert_eq!(sizes, vec![200, 200, 200]);
        assert!(report.silhouette > 0.8);
        assert!((report.stability_ari.unwrap() - 1.0).abs() < 1e-12);
        // centroids in original units sit near the generating values
        let mut recencies: Vec<f64> = report
            .centroids_original
            .iter_rows()
            .map(|r| r[0])
            .collect();
        recencies.sort_by(f64::total_cmp);
        assert!((recencies[0] - 5.0).abs() < 1.0, "{recencies:?}");
        assert!((recencies[2] - 300.0).abs() < 30.0, "{recencies:?}");
    }

    #[test]
    fn new_profile_is_assigned_through_stored_scaler() {
        let run = run_kmeans_segmentation(
            &customers(100),
            &SegmentationConfig {
                k: KChoice::Fixed(3),
                stability_reruns: 0,
                ..SegmentationConfig::default()
            },
        )
        .unwrap();
        assert_eq!(run.report.stability_ari, None);
        let z = run.scaler.transform_point(&[4.0, 22.0, 55_000.0]).unwrap();
        let cluster = run.model.predict(&z);
        assert_eq!(cluster, run.model.labels()[0]);
    }

    #[test]
    fn invalid_k_range_is_rejected() {
        let data = customers(10);
        assert!(select_k_by_silhouette(&data, 1, 3, &KMeansConfig::default(), 100).is_err());
        assert!(select_k_by_silhouette(&data, 4, 3, &KMeansConfig::default(), 100).is_err());
    }
}
