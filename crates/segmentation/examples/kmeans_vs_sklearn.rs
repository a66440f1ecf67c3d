//! Times our k-means against scikit-learn's on the same 1M × 3 RFM-like data.
//!
//! ```text
//! cargo run --release -p clientele-segmentation --example kmeans_vs_sklearn [-- ROWS [PATH]]
//! ```
//!
//! Generates `ROWS` (default 1 000 000) RFM-like profiles with a fixed seed, log1p-standardizes
//! them, writes them to `PATH` (default `/tmp/clientele_kmeans_bench.f64`, raw little-endian
//! f64, row-major, 3 columns), then fits k = 8 with one k-means++ restart for seeds 0, 1, 2
//! (mean time and mean inertia). When `python3 -c "import sklearn"` works it times
//! `KMeans(8, algorithm="lloyd", n_init=1)` (greedy k-means++ too) on the same file in the
//! same run, and also both implementations from identical initial centroids, and prints the
//! time and inertia ratios.

use std::io::Write;
use std::process::Command;
use std::time::Instant;

use clientele_segmentation::clustering::{
    KMeans, KMeansConfig, Log1pStandardizer, Matrix, kmeans_plus_plus,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rfm_like(rows: usize, seed: u64) -> Matrix {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut data = Vec::with_capacity(rows * 3);
    for _ in 0..rows {
        let activity: f64 = rng.r#gen::<f64>();
        let recency = -((1.0 - rng.r#gen::<f64>()).ln()) * (20.0 + 300.0 * (1.0 - activity));
        let frequency = 1.0 + (activity * 30.0 * rng.r#gen::<f64>()).floor();
        let monetary = frequency * 2_000.0 * (0.2 + 2.0 * rng.r#gen::<f64>() * rng.r#gen::<f64>());
        data.extend_from_slice(&[recency, frequency, monetary]);
    }
    Matrix::new(data, 3).expect("3 columns")
}

fn write_f64(path: &str, values: &[f64]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(values.len() * 8);
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::File::create(path)?.write_all(&bytes)
}

const SKLEARN_SCRIPT: &str = r#"
import sys, time
import numpy as np
from sklearn.cluster import KMeans
X = np.fromfile(sys.argv[1], dtype="<f8").reshape(-1, 3)
init = np.fromfile(sys.argv[2], dtype="<f8").reshape(-1, 3)
total, inertia, iters = 0.0, 0.0, 0
for seed in range(3):
    t = time.perf_counter()
    km = KMeans(8, algorithm="lloyd", n_init=1, random_state=seed).fit(X)
    total += time.perf_counter() - t
    inertia += km.inertia_ / 3
    iters += km.n_iter_
    print("sklearn seed", seed, km.inertia_, km.n_iter_, file=sys.stderr)
print("own_init", total / 3, inertia, iters)
best = None
for _ in range(3):
    t = time.perf_counter()
    km = KMeans(8, init=init, algorithm="lloyd", n_init=1).fit(X)
    dt = time.perf_counter() - t
    if best is None or dt < best[0]:
        best = (dt, km.inertia_, km.n_iter_)
print("same_init", *best)
"#;

fn parse_line(output: &str, key: &str) -> Option<(f64, f64, usize)> {
    let line = output.lines().find(|l| l.starts_with(key))?;
    let mut parts = line.split_whitespace().skip(1);
    Some((
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    ))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let rows: usize = args.get(1).map_or(Ok(1_000_000), |s| s.parse())?;
    let path = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| "/tmp/clientele_kmeans_bench.f64".into());
    let init_path = format!("{path}.init");

    let raw = rfm_like(rows, 42);
    let (_, data) = Log1pStandardizer::fit_transform(&raw)?;
    write_f64(&path, data.as_slice())?;
    println!("data: {rows} x 3 standardized RFM-like rows written to {path}");
    println!("threads: {}", rayon::current_num_threads());

    // Our k-means: own greedy k-means++ seeding (on a 100k sample), one restart, seeds 0..3;
    // mean time and mean inertia over the seeds (the sklearn side uses random_state 0..3).
    let mut ours = (0.0, 0.0, 0);
    for seed in 0..3 {
        let config = KMeansConfig {
            k: 8,
            n_init: 1,
            seed,
            ..KMeansConfig::default()
        };
        let t = Instant::now();
        let model = KMeans::fit(&data, &config)?;
        let dt = t.elapsed().as_secs_f64();
        println!(
            "ours seed {seed}: {dt:.3} s, inertia {:.6}, {} iterations",
            model.inertia(),
            model.n_iter()
        );
        ours = (
            ours.0 + dt / 3.0,
            ours.1 + model.inertia() / 3.0,
            ours.2 + model.n_iter(),
        );
    }

    // Identical starting centroids for both implementations (pure Lloyd comparison).
    let mut rng = ChaCha8Rng::seed_from_u64(123);
    let init = kmeans_plus_plus(&data, 8, &mut rng)?;
    write_f64(&init_path, init.as_slice())?;
    let mut ours_same: Option<(f64, f64, usize)> = None;
    for _ in 0..3 {
        let t = Instant::now();
        let model = KMeans::fit_from_centroids(&data, &init, 300, 1e-4)?;
        let dt = t.elapsed().as_secs_f64();
        if ours_same.is_none_or(|(best, _, _)| dt < best) {
            ours_same = Some((dt, model.inertia(), model.n_iter()));
        }
    }
    let ours_same = ours_same.ok_or("no run")?;
    println!(
        "ours (own init, mean of 3 seeds): {:.3} s, mean inertia {:.6}, {} iterations in total",
        ours.0, ours.1, ours.2
    );
    println!(
        "ours (same init, best of 3):      {:.3} s, inertia {:.6}, {} iterations",
        ours_same.0, ours_same.1, ours_same.2
    );

    let has_sklearn = Command::new("python3")
        .args(["-c", "import sklearn"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_sklearn {
        println!("python3 with scikit-learn not available: skipping the comparison");
        return Ok(());
    }
    let output = Command::new("python3")
        .args(["-c", SKLEARN_SCRIPT, &path, &init_path])
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        return Err(format!(
            "sklearn script failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let sk = parse_line(&stdout, "own_init").ok_or("unparsable sklearn output")?;
    let sk_same = parse_line(&stdout, "same_init").ok_or("unparsable sklearn output")?;
    println!(
        "sklearn (own init, mean of 3):    {:.3} s, mean inertia {:.6}, {} iterations in total",
        sk.0, sk.1, sk.2
    );
    println!(
        "sklearn (same init, best of 3):   {:.3} s, inertia {:.6}, {} iterations",
        sk_same.0, sk_same.1, sk_same.2
    );
    println!(
        "own init:  time ratio sklearn/ours = {:.2}x, inertia ratio ours/sklearn = {:.6}",
        sk.0 / ours.0,
        ours.1 / sk.1
    );
    println!(
        "same init: time ratio sklearn/ours = {:.2}x, inertia ratio ours/sklearn = {:.9}",
        sk_same.0 / ours_same.0,
        ours_same.1 / sk_same.1
    );
    Ok(())
}
