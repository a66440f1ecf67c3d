//! k-means with greedy k-means++ seeding and Lloyd iterations.

use rand::seq::index;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{ClusteringError, Matrix, squared_euclidean};

/// Rows per parallel work item. Fixed, so partial sums are always combined in the same order
/// and results are identical whatever the number of threads.
const CHUNK_ROWS: usize = 8192;

/// Parameters of [`KMeans::fit`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KMeansConfig {
    /// Number of clusters, `1 ≤ k ≤ rows`.
    pub k: usize,
    /// Independent restarts (each with its own k-means++ seeding); the run with the lowest
    /// inertia is kept. Default 3.
    pub n_init: usize,
    /// Maximum Lloyd iterations per restart. Default 300 (as scikit-learn).
    pub max_iter: usize,
    /// Convergence tolerance, relative as in scikit-learn: iterations stop when the sum of
    /// squared centroid moves is at most `tol × mean per-feature variance of the data`, or
    /// when no label changes. Default 1e-4.
    pub tol: f64,
    /// Seed of the ChaCha8 generator; restart `i` uses stream `i` of this seed, so results
    /// are reproducible across runs, platforms and thread counts.
    pub seed: u64,
    /// When the data has more rows than this (default 100 000), the starting centroids are
    /// found coarse to fine: three k-means++ seedings on a uniform sample (without
    /// replacement) a tenth this size, each run to convergence there, the best by inertia
    /// then run to convergence on a sample of this size; only then Lloyd on all rows. (When a
    /// tenth would be under 10 000 rows, the three seedings run on the sample of this size.) Lloyd's slow
    /// convergence tail (30–150 iterations on 1M RFM-like rows) is thereby paid on samples,
    /// and the full data typically needs 2–6 iterations; the three seedings avoid most poor
    /// local optima. Each stage uses the same absolute tolerance, so the result is still a
    /// converged Lloyd solution on all rows.
    pub seeding_sample_size: usize,
}

impl Default for KMeansConfig {
    fn default() -> Self {
        Self {
            k: 8,
            n_init: 3,
            max_iter: 300,
            tol: 1e-4,
            seed: 0,
            seeding_sample_size: 100_000,
        }
    }
}

/// A fitted k-means model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KMeans {
    centroids: Matrix,
    labels: Vec<usize>,
    inertia: f64,
    n_iter: usize,
    converged: bool,
}

/// Labels, per-cluster sums and counts of one assignment pass.
struct Assignment {
    sums: Vec<f64>,
    counts: Vec<usize>,
    inertia: f64,
    changed: usize,
}

impl Assignment {
    fn empty(k: usize, d: usize) -> Self {
        Self {
            sums: vec![0.0; k * d],
            counts: vec![0; k],
            inertia: 0.0,
            changed: 0,
        }
    }

    fn merge(&mut self, other: &Self) {
        for (a, b) in self.sums.iter_mut().zip(&other.sums) {
            *a += b;
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.inertia += other.inertia;
        self.changed += other.changed;
    }
}

/// Assignment of one chunk with the dimension known at compile time, so the distance loop is
/// fully unrolled and the point stays in registers.
fn assign_chunk_fixed<const D: usize>(
    points: &[f64],
    centers: &[f64],
    k: usize,
    labels: &mut [usize],
) -> Assignment {
    let centers: Vec<[f64; D]> = centers
        .chunks_exact(D)
        .map(|c| std::array::from_fn(|t| c[t]))
        .collect();
    let mut out = Assignment::empty(k, D);
    for (p, label) in points.chunks_exact(D).zip(labels.iter_mut()) {
        let p: [f64; D] = std::array::from_fn(|t| p[t]);
        let mut best = f64::INFINITY;
        let mut best_j = 0;
        for (j, c) in centers.iter().enumerate() {
            let mut dist = 0.0;
            for t in 0..D {
                let diff = p[t] - c[t];
                dist += diff * diff;
            }
            let closer = dist < best;
            best_j = if closer { j } else { best_j };
            best = if closer { dist } else { best };
        }
        if *label != best_j {
            out.changed += 1;
            *label = best_j;
        }
        out.inertia += best;
        out.counts[best_j] += 1;
        let sum = &mut out.sums[best_j * D..(best_j + 1) * D];
        for t in 0..D {
            sum[t] += p[t];
        }
    }
    out
}

fn assign_chunk_dyn(
    points: &[f64],
    d: usize,
    centers: &[f64],
    k: usize,
    labels: &mut [usize],
) -> Assignment {
    let mut out = Assignment::empty(k, d);
    for (p, label) in points.chunks_exact(d).zip(labels.iter_mut()) {
        let mut best = f64::INFINITY;
        let mut best_j = 0;
        for (j, c) in centers.chunks_exact(d).enumerate() {
            let dist = squared_euclidean(p, c);
            if dist < best {
                best = dist;
                best_j = j;
            }
        }
        if *label != best_j {
            out.changed += 1;
            *label = best_j;
        }
        out.inertia += best;
        out.counts[best_j] += 1;
        for (s, x) in out.sums[best_j * d..(best_j + 1) * d].iter_mut().zip(p) {
            *s += x;
        }
    }
    out
}

/// Assigns every point to its nearest center (first one on exact ties), in parallel chunks.
fn assign(points: &[f64], d: usize, centers: &[f64], labels: &mut [usize]) -> Assignment {
    let k = centers.len() / d;
    let partials: Vec<Assignment> = points
        .par_chunks(CHUNK_ROWS * d)
        .zip(labels.par_chunks_mut(CHUNK_ROWS))
        .map(|(p, l)| match d {
            1 => assign_chunk_fixed::<1>(p, centers, k, l),
            2 => assign_chunk_fixed::<2>(p, centers, k, l),
            3 => assign_chunk_fixed::<3>(p, centers, k, l),
            4 => assign_chunk_fixed::<4>(p, centers, k, l),
            5 => assign_chunk_fixed::<5>(p, centers, k, l),
            6 => assign_chunk_fixed::<6>(p, centers, k, l),
            8 => assign_chunk_fixed::<8>(p, centers, k, l),
            _ => assign_chunk_dyn(p, d, centers, k, l),
        })
        .collect();
    let mut total = Assignment::empty(k, d);
    for part in &partials {
        total.merge(part);
    }
    total
}

/// Squared distance with the dimension known at compile time (`D > 0`) or at run time
/// (`D == 0`, using `dim`).
#[inline(always)]
fn sqdist<const D: usize>(a: &[f64], b: &[f64], dim: usize) -> f64 {
    if D == 0 {
        squared_euclidean(&a[..dim], &b[..dim])
    } else {
        let (a, b) = (&a[..D], &b[..D]);
        let mut s = 0.0;
        for t in 0..D {
            let diff = a[t] - b[t];
            s += diff * diff;
        }
        s
    }
}

/// Changes of per-cluster sums and counts caused by points that switched cluster in one
/// chunk.
struct Delta {
    sums: Vec<f64>,
    counts: Vec<i64>,
    changed: usize,
}

/// Centers per block in the structure-of-arrays layout used by the full scan.
const LANES: usize = 8;

/// Lays out `k` row-major centers of width `dim` in blocks of [`LANES`], NaN-padded.
fn centers_to_soa(centers: &[f64], k: usize, dim: usize) -> Vec<f64> {
    let blocks = k.div_ceil(LANES);
    let mut soa = vec![f64::NAN; blocks * dim * LANES];
    for j in 0..k {
        let (b, lane) = (j / LANES, j % LANES);
        for t in 0..dim {
            soa[(b * dim + t) * LANES + lane] = centers[j * dim + t];
        }
    }
    soa
}

/// Per-iteration quantities shared by all chunks of a Hamerly pass.
struct PassContext<'a> {
    centers: &'a [f64],
    /// The centers in blocks of [`LANES`] (structure of arrays: for each block and feature,
    /// `LANES` consecutive values), padded with NaN centers that never win. Lets the full
    /// scan compute `LANES` distances per feature in vector registers.
    centers_soa: &'a [f64],
    k: usize,
    dim: usize,
    /// Half the distance from each center to its nearest other center.
    half_separation: &'a [f64],
    /// How far each center has moved in total since the first pass (sum of its drifts).
    cumulative_drift: &'a [f64],
    /// Sum over updates of the largest drift of any center.
    cumulative_max_drift: f64,
    /// Recompute every point (first pass, or after empty-cluster relocation).
    full: bool,
}

/// One Hamerly (2010) assignment pass over a chunk: each point keeps an upper bound on the
/// distance to its center and a lower bound on the distance to any other center; points whose
/// bounds prove the assignment unchanged are skipped. Assignments are exactly those of a
/// brute-force pass (up to exact ties), so iterations are Lloyd iterations.
fn hamerly_chunk<const D: usize>(
    ctx: &PassContext<'_>,
    points: &[f64],
    labels: &mut [u32],
    upper: &mut [f64],
    lower: &mut [f64],
) -> Delta {
    let (k, dim) = (ctx.k, ctx.dim);
    let mut delta = Delta {
        sums: vec![0.0; k * dim],
        counts: vec![0; k],
        changed: 0,
    };
    let blocks = ctx.centers_soa.len() / (LANES * dim);
    let scan = |x: &[f64]| {
        let (mut best, mut second, mut best_j) = (f64::INFINITY, f64::INFINITY, 0);
        for b in 0..blocks {
            let mut dist = [0.0_f64; LANES];
            let block = &ctx.centers_soa[b * dim * LANES..(b + 1) * dim * LANES];
            for (t, lane_values) in
                block
                    .chunks_exact(LANES)
                    .enumerate()
                    .take(if D == 0 { dim } else { D })
            {
                let xt = x[t];
                for (acc, c) in dist.iter_mut().zip(lane_values) {
                    let diff = xt - c;
                    *acc += diff * diff;
                }
            }
            for (lane, &dj) in dist.iter().enumerate() {
                // branch-free updates (compiled to selects): the winner is unpredictable;
                // NaN padding compares false and is ignored by `min`
                let closer = dj < best;
                second = if closer { best } else { second.min(dj) };
                best_j = if closer { b * LANES + lane } else { best_j };
                best = if closer { dj } else { best };
            }
        }
        (best_j, best.sqrt(), second.sqrt())
    };
    // Bounds are stored relative to the cumulative drifts so that skipped points need no
    // write: effective upper = stored + cumulative drift of its center, effective lower =
    // stored - cumulative maximum drift.
    let (drift, max_drift) = (ctx.cumulative_drift, ctx.cumulative_max_drift);
    for (((x, label), u), l) in points
        .chunks_exact(dim)
        .zip(labels.iter_mut())
        .zip(upper.iter_mut())
        .zip(lower.iter_mut())
    {
        let old = *label as usize;
        if !ctx.full {
            let bound = ctx.half_separation[old].max(*l - max_drift);
            if *u + drift[old] <= bound {
                continue;
            }
            let exact = sqdist::<D>(x, &ctx.centers[old * dim..], dim).sqrt();
            if exact <= bound {
                *u = exact - drift[old];
                continue;
            }
        }
        let (new, d1, d2) = scan(x);
        *u = d1 - drift[new];
        *l = d2 + max_drift;
        if new != old {
            delta.changed += 1;
            *label = u32::try_from(new).unwrap_or(u32::MAX);
            delta.counts[new] += 1;
            for (s, v) in delta.sums[new * dim..(new + 1) * dim].iter_mut().zip(x) {
                *s += v;
            }
            if old < k {
                delta.counts[old] -= 1;
                for (s, v) in delta.sums[old * dim..(old + 1) * dim].iter_mut().zip(x) {
                    *s -= v;
                }
            }
        }
    }
    delta
}

/// Runs a Hamerly pass over all points in parallel chunks and applies the changes to `sums`
/// and `counts` in chunk order (deterministic). Returns the number of changed labels.
fn hamerly_pass(
    ctx: &PassContext<'_>,
    points: &[f64],
    labels: &mut [u32],
    upper: &mut [f64],
    lower: &mut [f64],
    sums: &mut [f64],
    counts: &mut [i64],
) -> usize {
    let dim = ctx.dim;
    let deltas: Vec<Delta> = points
        .par_chunks(CHUNK_ROWS * dim)
        .zip(labels.par_chunks_mut(CHUNK_ROWS))
        .zip(upper.par_chunks_mut(CHUNK_ROWS))
        .zip(lower.par_chunks_mut(CHUNK_ROWS))
        .map(|(((p, lab), u), l)| match dim {
            1 => hamerly_chunk::<1>(ctx, p, lab, u, l),
            2 => hamerly_chunk::<2>(ctx, p, lab, u, l),
            3 => hamerly_chunk::<3>(ctx, p, lab, u, l),
            4 => hamerly_chunk::<4>(ctx, p, lab, u, l),
            5 => hamerly_chunk::<5>(ctx, p, lab, u, l),
            6 => hamerly_chunk::<6>(ctx, p, lab, u, l),
            8 => hamerly_chunk::<8>(ctx, p, lab, u, l),
            _ => hamerly_chunk::<0>(ctx, p, lab, u, l),
        })
        .collect();
    let mut changed = 0;
    for delta in &deltas {
        for (s, v) in sums.iter_mut().zip(&delta.sums) {
            *s += v;
        }
        for (c, v) in counts.iter_mut().zip(&delta.counts) {
            *c += v;
        }
        changed += delta.changed;
    }
    changed
}

/// Half the distance from each center to its nearest other center (∞ when k = 1).
fn half_separations(centers: &[f64], k: usize, dim: usize) -> Vec<f64> {
    (0..k)
        .map(|j| {
            (0..k)
                .filter(|&o| o != j)
                .map(|o| {
                    squared_euclidean(
                        &centers[j * dim..(j + 1) * dim],
                        &centers[o * dim..(o + 1) * dim],
                    )
                })
                .fold(f64::INFINITY, f64::min)
                .sqrt()
                / 2.0
        })
        .collect()
}

/// Moves each empty cluster onto the point farthest from its current center (distinct points
/// for distinct empty clusters), as scikit-learn does; the point is relabelled and the sums
/// and counts updated. Returns whether anything moved.
fn relocate_empty_clusters(
    data: &Matrix,
    centers: &mut [f64],
    labels: &mut [u32],
    sums: &mut [f64],
    counts: &mut [i64],
) -> bool {
    let d = data.cols();
    let empty: Vec<usize> = (0..counts.len()).filter(|&j| counts[j] <= 0).collect();
    if empty.is_empty() {
        return false;
    }
    let mut far: Vec<(f64, usize)> = data
        .iter_rows()
        .zip(labels.iter())
        .enumerate()
        .map(|(i, (x, &l))| {
            let l = l as usize;
            (squared_euclidean(x, &centers[l * d..(l + 1) * d]), i)
        })
        .collect();
    // largest distance first; index breaks ties for determinism
    far.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    for (&j, &(_, i)) in empty.iter().zip(&far) {
        let x = data.row(i);
        let old = labels[i] as usize;
        counts[old] -= 1;
        for (s, v) in sums[old * d..(old + 1) * d].iter_mut().zip(x) {
            *s -= v;
        }
        counts[j] = 1;
        sums[j * d..(j + 1) * d].copy_from_slice(x);
        centers[j * d..(j + 1) * d].copy_from_slice(x);
        labels[i] = u32::try_from(j).unwrap_or(u32::MAX);
    }
    true
}

/// Mean of the per-feature population variances, the scale of scikit-learn's `tol`.
fn mean_variance(data: &Matrix) -> f64 {
    let d = data.cols();
    #[allow(clippy::cast_precision_loss)]
    let n = data.rows() as f64;
    let mut mean = vec![0.0; d];
    for row in data.iter_rows() {
        for (m, x) in mean.iter_mut().zip(row) {
            *m += x;
        }
    }
    for m in &mut mean {
        *m /= n;
    }
    let mut var = 0.0;
    for row in data.iter_rows() {
        var += squared_euclidean(row, &mean);
    }
    #[allow(clippy::cast_precision_loss)]
    let dims = d as f64;
    var / n / dims
}

/// Lloyd iterations accelerated with Hamerly's bounds (identical assignments, far fewer
/// distance computations once centers settle), followed by one brute-force pass that yields
/// labels and inertia consistent with the returned centroids.
fn lloyd(data: &Matrix, init: &Matrix, max_iter: usize, tol_abs: f64) -> KMeans {
    let run = lloyd_iterations(data, init, max_iter, tol_abs);
    let dim = data.cols();
    let k = init.rows();
    // Final brute-force pass so labels and inertia are exactly those of the returned centroids.
    let mut final_labels = vec![usize::MAX; data.rows()];
    let last = assign(
        data.as_slice(),
        dim,
        run.centers.as_slice(),
        &mut final_labels,
    );
    KMeans {
        centroids: Matrix {
            data: run.centers.data,
            rows: k,
            cols: dim,
        },
        labels: final_labels,
        inertia: last.inertia,
        n_iter: run.n_iter,
        converged: run.converged,
    }
}

/// Centroids after Lloyd iterations, before the final labelling pass.
struct LloydRun {
    centers: Matrix,
    n_iter: usize,
    converged: bool,
}

/// Lloyd iterations (Hamerly-accelerated) from `init` until convergence or `max_iter`.
fn lloyd_iterations(data: &Matrix, init: &Matrix, max_iter: usize, tol_abs: f64) -> LloydRun {
    let dim = data.cols();
    let k = init.rows();
    let n = data.rows();
    let points = data.as_slice();
    let mut centers = init.as_slice().to_vec();
    let mut labels = vec![u32::MAX; n];
    let mut upper = vec![0.0; n];
    let mut lower = vec![0.0; n];
    let mut sums = vec![0.0; k * dim];
    let mut counts = vec![0_i64; k];
    let mut cumulative_drift = vec![0.0; k];
    let mut cumulative_max_drift = 0.0;
    let mut full = true;
    let mut n_iter = 0;
    let mut converged = false;
    for iteration in 0..max_iter {
        n_iter = iteration + 1;
        let half_separation = half_separations(&centers, k, dim);
        let centers_soa = centers_to_soa(&centers, k, dim);
        let ctx = PassContext {
            centers: &centers,
            centers_soa: &centers_soa,
            k,
            dim,
            half_separation: &half_separation,
            cumulative_drift: &cumulative_drift,
            cumulative_max_drift,
            full,
        };
        let changed = hamerly_pass(
            &ctx,
            points,
            &mut labels,
            &mut upper,
            &mut lower,
            &mut sums,
            &mut counts,
        );
        let mut new_centers = centers.clone();
        full = relocate_empty_clusters(data, &mut new_centers, &mut labels, &mut sums, &mut counts);
        for j in 0..k {
            if counts[j] > 0 {
                #[allow(clippy::cast_precision_loss)]
                let count = counts[j] as f64;
                for t in 0..dim {
                    new_centers[j * dim + t] = sums[j * dim + t] / count;
                }
            }
        }
        let mut shift = 0.0;
        let mut largest = 0.0_f64;
        for j in 0..k {
            let moved = squared_euclidean(
                &centers[j * dim..(j + 1) * dim],
                &new_centers[j * dim..(j + 1) * dim],
            );
            shift += moved;
            cumulative_drift[j] += moved.sqrt();
            largest = largest.max(moved.sqrt());
        }
        cumulative_max_drift += largest;
        centers = new_centers;
        if (changed == 0 && !full) || shift <= tol_abs {
            converged = true;
            break;
        }
    }
    LloydRun {
        centers: Matrix {
            data: centers,
            rows: k,
            cols: dim,
        },
        n_iter,
        converged,
    }
}

fn validate(data: &Matrix, k: usize) -> Result<(), ClusteringError> {
    if k == 0 {
        return Err(ClusteringError::InvalidParameter(
            "k must be at least 1".into(),
        ));
    }
    if k > data.rows() {
        return Err(ClusteringError::InvalidParameter(format!(
            "k = {k} exceeds the number of rows ({})",
            data.rows()
        )));
    }
    data.check_finite()
}

/// Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, greedy variant as in
/// scikit-learn): the first center is a uniformly chosen row; each further center is the
/// best, by resulting potential (sum of squared distances to the nearest center), of
/// `2 + ⌊ln k⌋` candidates drawn with probability proportional to the squared distance to the
/// nearest existing center.
///
/// # Errors
/// [`ClusteringError::InvalidParameter`] when `k` is 0 or exceeds the row count.
pub fn kmeans_plus_plus<R: Rng + ?Sized>(
    data: &Matrix,
    k: usize,
    rng: &mut R,
) -> Result<Matrix, ClusteringError> {
    validate(data, k)?;
    let n = data.rows();
    let d = data.cols();
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let n_trials = 2 + (k as f64).ln().floor() as usize;
    let mut centers = Vec::with_capacity(k * d);
    let first = rng.gen_range(0..n);
    centers.extend_from_slice(data.row(first));
    let mut closest: Vec<f64> = data
        .iter_rows()
        .map(|x| squared_euclidean(x, data.row(first)))
        .collect();
    let mut cumulative = vec![0.0; n];
    for _ in 1..k {
        let mut acc = 0.0;
        for (c, v) in cumulative.iter_mut().zip(&closest) {
            acc += v;
            *c = acc;
        }
        let potential = acc;
        let mut best: Option<(f64, usize)> = None;
        for _ in 0..n_trials {
            let target = rng.r#gen::<f64>() * potential;
            let candidate = cumulative.partition_point(|&c| c < target).min(n - 1);
            let candidate_row = data.row(candidate);
            let pot: f64 = data
                .iter_rows()
                .zip(&closest)
                .map(|(x, &c)| c.min(squared_euclidean(x, candidate_row)))
                .sum();
            if best.is_none_or(|(p, _)| pot < p) {
                best = Some((pot, candidate));
            }
        }
        let chosen = best.map_or(0, |(_, i)| i);
        let chosen_row = data.row(chosen);
        for (c, x) in closest.iter_mut().zip(data.iter_rows()) {
            *c = c.min(squared_euclidean(x, chosen_row));
        }
        centers.extend_from_slice(chosen_row);
    }
    Matrix::new(centers, d)
}

/// Rows below which a sample is not split further into a coarser stage.
const MIN_COARSE_ROWS: usize = 10_000;

/// k-means++ seedings tried on the coarsest sample; the one converging to the lowest inertia
/// there is refined on the larger samples and the full data.
const COARSE_SEEDINGS: usize = 3;

/// Starting centroids for Lloyd on `data`: k-means++ directly when `data` has at most
/// `seeding_sample_size` rows; otherwise the converged centroids of Lloyd on a uniform sample
/// of that many rows, itself started the same way one level down (a sample a tenth the size,
/// while that stays at least [`MIN_COARSE_ROWS`] and `k`). The coarsest sample gets
/// [`COARSE_SEEDINGS`] seedings and keeps the best. Deterministic for the generator.
fn coarse_to_fine_init<R: Rng + ?Sized>(
    data: &Matrix,
    config: &KMeansConfig,
    tol_abs: f64,
    rng: &mut R,
) -> Result<Matrix, ClusteringError> {
    let size = config.seeding_sample_size.max(config.k);
    if data.rows() <= size {
        return kmeans_plus_plus(data, config.k, rng);
    }
    let mut picked = index::sample(rng, data.rows(), size).into_vec();
    picked.sort_unstable();
    let sample = data.select_rows(&picked);
    let coarser = size / 10;
    if coarser >= MIN_COARSE_ROWS.max(config.k) {
        let nested = KMeansConfig {
            seeding_sample_size: coarser,
            ..config.clone()
        };
        let init = coarse_to_fine_init(&sample, &nested, tol_abs, rng)?;
        return Ok(lloyd_iterations(&sample, &init, config.max_iter, tol_abs).centers);
    }
    // Coarsest stage: several seedings, each run to convergence on this small sample; the
    // one with the lowest inertia there is refined. Cheap here, and it avoids most of the
    // poor local optima a single greedy k-means++ seeding lands in now and then.
    let mut best: Option<KMeans> = None;
    for _ in 0..COARSE_SEEDINGS {
        let seeds = kmeans_plus_plus(&sample, config.k, rng)?;
        let model = lloyd(&sample, &seeds, config.max_iter, tol_abs);
        if best.as_ref().is_none_or(|b| model.inertia < b.inertia) {
            best = Some(model);
        }
    }
    best.map(|b| b.centroids)
        .ok_or_else(|| ClusteringError::InvalidParameter("no coarse seeding ran".into()))
}

impl KMeans {
    /// Fits k-means: for each of `n_init` restarts, greedy k-means++ seeding (refined coarse
    /// to fine on samples for data over `seeding_sample_size` rows, see
    /// [`KMeansConfig::seeding_sample_size`]) then Lloyd iterations on all rows until
    /// convergence (see [`KMeansConfig::tol`]) or `max_iter`; keeps the restart with the
    /// lowest inertia (the first on ties). Deterministic for a given config and data.
    ///
    /// Empty clusters are re-seeded on the points farthest from their centers.
    ///
    /// # Errors
    /// [`ClusteringError::InvalidParameter`] for `k` = 0, `k` > rows, `n_init` = 0,
    /// `max_iter` = 0 or a negative/non-finite `tol`; [`ClusteringError::InvalidValue`] for
    /// non-finite data.
    pub fn fit(data: &Matrix, config: &KMeansConfig) -> Result<Self, ClusteringError> {
        validate(data, config.k)?;
        if config.n_init == 0 || config.max_iter == 0 {
            return Err(ClusteringError::InvalidParameter(
                "n_init and max_iter must be at least 1".into(),
            ));
        }
        if !config.tol.is_finite() || config.tol < 0.0 {
            return Err(ClusteringError::InvalidParameter(
                "tol must be finite and non-negative".into(),
            ));
        }
        let tol_abs = config.tol * mean_variance(data);
        let mut best: Option<Self> = None;
        for run in 0..config.n_init {
            let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
            rng.set_stream(run as u64);
            let init = coarse_to_fine_init(data, config, tol_abs, &mut rng)?;
            let model = lloyd(data, &init, config.max_iter, tol_abs);
            if best.as_ref().is_none_or(|b| model.inertia < b.inertia) {
                best = Some(model);
            }
        }
        best.ok_or_else(|| ClusteringError::InvalidParameter("n_init must be at least 1".into()))
    }

    /// Runs Lloyd iterations from the given initial centroids (no seeding, one run). Used to
    /// compare with other implementations from identical starting points, or to warm-start
    /// from the previous model's centroids.
    ///
    /// # Errors
    /// As [`Self::fit`], plus [`ClusteringError::DimensionMismatch`] when the centroids'
    /// width differs from the data's.
    pub fn fit_from_centroids(
        data: &Matrix,
        initial: &Matrix,
        max_iter: usize,
        tol: f64,
    ) -> Result<Self, ClusteringError> {
        validate(data, initial.rows())?;
        initial.check_finite()?;
        if initial.cols() != data.cols() {
            return Err(ClusteringError::DimensionMismatch(format!(
                "centroids have {} columns, data {}",
                initial.cols(),
                data.cols()
            )));
        }
        if max_iter == 0 || !tol.is_finite() || tol < 0.0 {
            return Err(ClusteringError::InvalidParameter(
                "max_iter ≥ 1 and finite tol ≥ 0 required".into(),
            ));
        }
        Ok(lloyd(data, initial, max_iter, tol * mean_variance(data)))
    }

    /// Centroids, one row per cluster, in the space of the fitted data.
    #[must_use]
    pub fn centroids(&self) -> &Matrix {
        &self.centroids
    }

    /// Number of clusters.
    #[must_use]
    pub fn k(&self) -> usize {
        self.centroids.rows()
    }

    /// Cluster index (`0..k`) of every fitted row, consistent with [`Self::centroids`].
    #[must_use]
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// Consumes the model, returning the labels.
    #[must_use]
    pub fn into_labels(self) -> Vec<usize> {
        self.labels
    }

    /// Sum of squared distances of the fitted rows to their centroids.
    #[must_use]
    pub fn inertia(&self) -> f64 {
        self.inertia
    }

    /// Lloyd iterations on all rows run by the kept restart (iterations on the coarse-to-fine
    /// samples that found its starting centroids are not counted).
    #[must_use]
    pub fn n_iter(&self) -> usize {
        self.n_iter
    }

    /// Whether the kept restart converged before `max_iter`.
    #[must_use]
    pub fn converged(&self) -> bool {
        self.converged
    }

    /// Number of fitted rows per cluster.
    #[must_use]
    pub fn cluster_sizes(&self) -> Vec<usize> {
        let mut sizes = vec![0; self.k()];
        for &l in &self.labels {
            sizes[l] += 1;
        }
        sizes
    }

    /// Nearest centroid of `point` (first on ties). `point` must have the fitted width.
    #[must_use]
    pub fn predict(&self, point: &[f64]) -> usize {
        let mut best = f64::INFINITY;
        let mut best_j = 0;
        for (j, c) in self.centroids.iter_rows().enumerate() {
            let dist = squared_euclidean(point, c);
            if dist < best {
                best = dist;
                best_j = j;
            }
        }
        best_j
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn blobs(per: usize, seed: u64) -> Matrix {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let centers = [[0.0, 0.0, 0.0], [5.0, 5.0, 0.0], [0.0, 5.0, 5.0]];
        let mut data = Vec::new();
        for c in &centers {
            for _ in 0..per {
                for x in c {
                    data.push(x + rng.gen_range(-0.5..0.5));
                }
            }
        }
        Matrix::new(data, 3).unwrap()
    }

    #[test]
    fn separated_blobs_are_recovered() {
        let data = blobs(100, 1);
        let model = KMeans::fit(
            &data,
            &KMeansConfig {
                k: 3,
                ..KMeansConfig::default()
            },
        )
        .unwrap();
        let labels = model.labels();
        for b in 0..3 {
            let first = labels[b * 100];
            assert!(labels[b * 100..(b + 1) * 100].iter().all(|&l| l == first));
        }
        let mut sizes = model.cluster_sizes();
        sizes.sort_unstable();
        assert_eq!(sizes, vec![100, 100, 100]);
        assert!(model.converged());
    }

    #[test]
    fn same_seed_gives_identical_model() {
        let data = blobs(200, 2);
        let config = KMeansConfig {
            k: 5,
            seeding_sample_size: 100,
            ..KMeansConfig::default()
        };
        let a = KMeans::fit(&data, &config).unwrap();
        let b = KMeans::fit(&data, &config).unwrap();
        assert_eq!(a, b);
    }

    /// Fits on one thread and on the default pool must give identical models.
    fn assert_same_model_on_one_and_all_threads(data: &Matrix, config: &KMeansConfig) {
        let single = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let a = single.install(|| KMeans::fit(data, config)).unwrap();
        let b = KMeans::fit(data, config).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn result_does_not_depend_on_thread_count() {
        let config = KMeansConfig {
            k: 4,
            ..KMeansConfig::default()
        };
        assert_same_model_on_one_and_all_threads(&blobs(20_000, 3), &config);
    }

    #[test]
    fn inertia_matches_labels_and_centroids() {
        let data = blobs(50, 4);
        let model = KMeans::fit(
            &data,
            &KMeansConfig {
                k: 4,
                ..KMeansConfig::default()
            },
        )
        .unwrap();
        let direct: f64 = data
            .iter_rows()
            .zip(model.labels())
            .map(|(x, &l)| squared_euclidean(x, model.centroids().row(l)))
            .sum();
        assert!((direct - model.inertia()).abs() < 1e-9);
        for (i, x) in data.iter_rows().enumerate() {
            assert_eq!(model.predict(x), model.labels()[i]);
        }
    }

    #[test]
    fn duplicate_points_do_not_leave_empty_clusters() {
        let mut rows = vec![[1.0, 1.0]; 10];
        rows.push([2.0, 2.0]);
        rows.push([3.0, 3.0]);
        let data = Matrix::from_rows(&rows).unwrap();
        let model = KMeans::fit(
            &data,
            &KMeansConfig {
                k: 3,
                ..KMeansConfig::default()
            },
        )
        .unwrap();
        assert!(model.cluster_sizes().iter().all(|&s| s > 0));
        assert!(model.inertia().abs() < 1e-12);
    }

    #[test]
    fn more_clusters_than_rows_is_rejected() {
        let data = Matrix::from_rows(&[[1.0], [2.0]]).unwrap();
        assert!(matches!(
            KMeans::fit(
                &data,
                &KMeansConfig {
                    k: 3,
                    ..KMeansConfig::default()
                }
            ),
            Err(ClusteringError::InvalidParameter(_))
        ));
    }

    /// Overlapping, skewed RFM-like rows (log-scaled recency, orders, spend), standardised:
    /// no clean cluster structure, so Lloyd converges slowly, as on real customer bases.
    fn rfm_like(rows: usize, seed: u64) -> Matrix {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut raw = Vec::with_capacity(rows * 3);
        for _ in 0..rows {
            let activity: f64 = rng.r#gen();
            let recency = -((1.0 - rng.r#gen::<f64>()).ln()) * (20.0 + 300.0 * (1.0 - activity));
            let orders = 1.0 + (activity * 30.0 * rng.r#gen::<f64>()).floor();
            let spend = orders * 2_000.0 * (0.2 + 2.0 * rng.r#gen::<f64>() * rng.r#gen::<f64>());
            raw.extend_from_slice(&[recency.ln_1p(), orders.ln_1p(), spend.ln_1p()]);
        }
        let data = Matrix::new(raw, 3).unwrap();
        let mut mean = [0.0; 3];
        let mut sq = [0.0; 3];
        for row in data.iter_rows() {
            for t in 0..3 {
                mean[t] += row[t];
                sq[t] += row[t] * row[t];
            }
        }
        #[allow(clippy::cast_precision_loss)]
        let n = rows as f64;
        let sd: Vec<f64> = (0..3)
            .map(|t| (sq[t] / n - (mean[t] / n).powi(2)).sqrt())
            .collect();
        let scaled = data
            .iter_rows()
            .flat_map(|row| {
                (0..3)
                    .map(|t| (row[t] - mean[t] / n) / sd[t])
                    .collect::<Vec<_>>()
            })
            .collect();
        Matrix::new(scaled, 3).unwrap()
    }

    /// More rows than the default sample size (100 000), so the start is found on a 10 000-row
    /// sample (three seedings) and a 100 000-row sample before Lloyd runs on all rows.
    const COARSE_TO_FINE_ROWS: usize = 120_000;

    #[test]
    fn coarse_to_fine_fit_ends_at_a_lloyd_fixed_point_of_all_rows() {
        let data = rfm_like(COARSE_TO_FINE_ROWS, 5);
        let config = KMeansConfig {
            k: 8,
            n_init: 1,
            ..KMeansConfig::default()
        };
        let model = KMeans::fit(&data, &config).unwrap();
        assert!(model.converged());
        // Every centroid is (within the tolerance) the mean of the rows labelled with it.
        let (k, d) = (8, 3);
        let mut sums = vec![0.0; k * d];
        let mut counts = vec![0.0; k];
        for (x, &l) in data.iter_rows().zip(model.labels()) {
            counts[l] += 1.0;
            for t in 0..d {
                sums[l * d + t] += x[t];
            }
        }
        let shift: f64 = (0..k)
            .map(|j| {
                let mean: Vec<f64> = (0..d).map(|t| sums[j * d + t] / counts[j]).collect();
                squared_euclidean(&mean, model.centroids().row(j))
            })
            .sum();
        assert!(shift <= config.tol * mean_variance(&data), "shift {shift}");
    }

    #[test]
    fn coarse_to_fine_start_is_no_worse_than_seeding_on_all_rows() {
        let data = rfm_like(COARSE_TO_FINE_ROWS, 6);
        let mut coarse_to_fine = 0.0;
        let mut all_rows = 0.0;
        for seed in 0..3 {
            let config = KMeansConfig {
                k: 8,
                n_init: 1,
                seed,
                ..KMeansConfig::default()
            };
            coarse_to_fine += KMeans::fit(&data, &config).unwrap().inertia();
            let plain = KMeansConfig {
                seeding_sample_size: COARSE_TO_FINE_ROWS,
                ..config
            };
            all_rows += KMeans::fit(&data, &plain).unwrap().inertia();
        }
        assert!(
            coarse_to_fine <= all_rows * 1.001,
            "coarse to fine {coarse_to_fine}, k-means++ on all rows {all_rows}"
        );
    }

    #[test]
    fn coarse_to_fine_fit_does_not_depend_on_thread_count() {
        let config = KMeansConfig {
            k: 6,
            n_init: 1,
            ..KMeansConfig::default()
        };
        assert_same_model_on_one_and_all_threads(&rfm_like(COARSE_TO_FINE_ROWS, 7), &config);
    }

    #[test]
    fn dynamic_dimension_path_matches_fixed_path() {
        // d = 7 uses the generic loop; compare to a manual evaluation
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let data = Matrix::new((0..7 * 300).map(|_| rng.r#gen::<f64>()).collect(), 7).unwrap();
        let model = KMeans::fit(
            &data,
            &KMeansConfig {
                k: 3,
                ..KMeansConfig::default()
            },
        )
        .unwrap();
        for (i, x) in data.iter_rows().enumerate() {
            assert_eq!(model.predict(x), model.labels()[i]);
        }
    }
}
