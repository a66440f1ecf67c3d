//! Throughput of `assign_variant`, the per-request hot path.
//!
//! Target: at least 5 million assignments per second on one core. Criterion
//! reports element throughput; each iteration assigns a batch of ids.

#![allow(missing_docs)]

use std::hint::black_box;

use clientele_experiments::assignment::{
    ExperimentSpec, HashVersion, NamespaceRange, assign_variant,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const BATCH: usize = 1_024;

fn ids(prefix: &str) -> Vec<String> {
    (0..BATCH).map(|i| format!("{prefix}{i:08}")).collect()
}

fn bench_assignment(c: &mut Criterion) {
    let ascii_ids = ids("customer-");
    let korean_ids = ids("고객-😀-");

    let v2 = ExperimentSpec::new("checkout-redesign", vec![0.5, 0.3, 0.2]);
    let v1 = ExperimentSpec {
        hash_version: HashVersion::V1,
        ..v2.clone()
    };
    let namespaced = ExperimentSpec {
        coverage: 0.8,
        namespace: Some(NamespaceRange {
            id: "checkout".into(),
            start: 0.0,
            end: 0.5,
        }),
        ..v2.clone()
    };

    let mut group = c.benchmark_group("assign_variant");
    group.throughput(Throughput::Elements(BATCH as u64));
    for (name, spec, units) in [
        ("v2_ascii", &v2, &ascii_ids),
        ("v1_ascii", &v1, &ascii_ids),
        ("v2_namespace_coverage_ascii", &namespaced, &ascii_ids),
        ("v2_korean_emoji", &v2, &korean_ids),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                for id in units {
                    black_box(assign_variant(black_box(spec), black_box(id)));
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench_assignment);
criterion_main!(benches);
