//! Criterion benchmarks of k-means on RFM-like standardized data.

use clientele_segmentation::clustering::{
    KMeans, KMeansConfig, Log1pStandardizer, Matrix, silhouette_score_sampled,
};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `rows` RFM-like profiles (recency days, orders, spend), log1p-standardized.
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
    let raw = Matrix::new(data, 3).expect("3 columns");
    Log1pStandardizer::fit_transform(&raw)
        .expect("valid data")
        .1
}

fn bench_kmeans(c: &mut Criterion) {
    let mut group = c.benchmark_group("kmeans_k8_n_init1");
    group.sample_size(10);
    for rows in [10_000_usize, 100_000, 1_000_000] {
        let data = rfm_like(rows, 42);
        let config = KMeansConfig {
            k: 8,
            n_init: 1,
            seed: 7,
            ..KMeansConfig::default()
        };
        group.bench_with_input(BenchmarkId::from_parameter(rows), &data, |b, data| {
            b.iter(|| KMeans::fit(data, &config).expect("fit"));
        });
    }
    group.finish();
}

fn bench_silhouette(c: &mut Criterion) {
    let data = rfm_like(100_000, 43);
    let model = KMeans::fit(
        &data,
        &KMeansConfig {
            k: 5,
            n_init: 1,
            ..KMeansConfig::default()
        },
    )
    .expect("fit");
    let mut group = c.benchmark_group("silhouette_sampled");
    group.sample_size(10);
    group.bench_function("10k_of_100k", |b| {
        b.iter(|| silhouette_score_sampled(&data, model.labels(), 10_000, 1).expect("silhouette"));
    });
    group.finish();
}

criterion_group!(benches, bench_kmeans, bench_silhouette);
criterion_main!(benches);
