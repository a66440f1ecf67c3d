//! Measures a full batch recompute over a synthetic customer base.
//!
//! ```text
//! cargo run --release -p clientele-segmentation --example recompute_bench -- [profiles] [postgres|sqlite]
//! ```
//!
//! Defaults: 50 000 profiles on PostgreSQL (`CLIENTELE_TEST_DATABASE_URL`, else the local test
//! database) in a fresh schema. The base is loaded straight through the store's fold (what the
//! feed consumer does), then one run recomputes features, RFM, CLV fits, lifecycle, a k-means
//! clustering and four segments, and publishes memberships and snapshots. Timings per step are
//! printed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use clientele_proto::v1 as pb;
use clientele_runtime::db::{self, DatabaseTarget};
use clientele_runtime::settings::SegmentationSettings;
use clientele_segmentation::engine::Engine;
use clientele_segmentation::scoring::ScoringConfig;
use clientele_segmentation::store::{Fact, RunRecord, SegmentationStore, SqlSegmentationStore};
use clientele_segmentation::{POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};
use rand::{Rng, SeedableRng};

const DAY: i64 = 86_400_000_000;

fn segment(id: &str, def: pb::segment::Definition) -> (pb::Segment, i32) {
    let kind = clientele_segmentation::scoring::kind_of(&def) as i32;
    (
        pb::Segment {
            segment_id: id.into(),
            display_name: id.into(),
            definition: Some(def),
            ..Default::default()
        },
        kind,
    )
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(50_000);
    let engine_name = args.get(2).map_or("postgres", String::as_str);
    let dir = tempfile::tempdir().unwrap();
    let target = if engine_name == "sqlite" {
        DatabaseTarget::Sqlite {
            path: dir.path().join("segmentation.db"),
        }
    } else {
        DatabaseTarget::Postgres {
            url: clientele_runtime::testing::postgres_url(),
            schema: clientele_runtime::testing::unique_schema("segbench"),
        }
    };
    let database = db::open(
        &target,
        8,
        &POSTGRES_MIGRATIONS,
        &SQLITE_MIGRATIONS,
        "segmentation",
    )
    .await
    .expect("database");
    let store = Arc::new(SqlSegmentationStore::new(database));
    let now = clientele_runtime::time::now_micros();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let t = Instant::now();
    let mut cursor: Option<String> = None;
    let mut facts = Vec::new();
    let mut orders = 0usize;
    for p in 0..n {
        let profile = format!("{:08x}-0000-4000-8000-{:012x}", p, p);
        let k = 1 + rng.gen_range(0..6) * rng.gen_range(0..2) + rng.gen_range(0..2);
        let start = rng.gen_range(0..700);
        let gap = rng.gen_range(7..90);
        let spend = rng.gen_range(1_500..20_000);
        for o in 0..k {
            let days = start - o * gap;
            if days < 0 {
                break;
            }
            facts.push(Fact::Order {
                profile_id: profile.clone(),
                order_id: format!("o{o}"),
                placed_at: now - i64::from(days) * DAY - rng.gen_range(0..DAY),
                amount_minor: spend / 2 + rng.gen_range(0..spend),
                discount_minor: 0,
                converted: true,
                lines: vec![(["books", "home", "toys"][o as usize % 3].into(), 1_000)],
            });
            orders += 1;
        }
        if facts.len() >= 5_000 || p + 1 == n {
            let next = format!("log:{p}");
            store
                .apply_events("ingest", cursor.as_deref(), &next, &facts)
                .await
                .unwrap();
            cursor = Some(next);
            facts.clear();
        }
    }
    println!(
        "folded {n} profiles / {orders} orders through the store in {:?}",
        t.elapsed()
    );
    for (seg, kind) in [
        segment(
            "champions",
            pb::segment::Definition::Rfm(pb::RfmDefinition {
                segment_names: vec!["Champions".into()],
                ..Default::default()
            }),
        ),
        segment(
            "active",
            pb::segment::Definition::Lifecycle(pb::LifecycleDefinition {
                states: vec![pb::LifecycleState::Active as i32],
            }),
        ),
        segment(
            "regulars",
            pb::segment::Definition::Rule(pb::RuleDefinition {
                expression: "orders >= 3 and recency_days <= 90".into(),
            }),
        ),
        segment(
            "behaviour",
            pb::segment::Definition::Cluster(pb::ClusterDefinition {
                k: 4,
                method: pb::ClusteringMethod::Kmeans as i32,
                features: vec![1, 2, 3],
                scaling: pb::FeatureScaling::Standard as i32,
                log1p_features: vec![2, 3],
                seed: 1,
                n_init: 3,
                ..Default::default()
            }),
        ),
    ] {
        store.define_segment(&seg, kind, 0, now).await.unwrap();
    }
    let engine = Engine {
        store: store.clone(),
        config: Arc::new(ScoringConfig::from_settings(&SegmentationSettings::default()).unwrap()),
        profiles: None,
        changed: Arc::default(),
    };
    let t = Instant::now();
    let loaded = store.load_all_profiles(now).await.unwrap();
    println!("bulk load of {} profiles: {:?}", loaded.len(), t.elapsed());
    drop(loaded);
    for i in 0..2 {
        let run = RunRecord {
            run_id: uuid::Uuid::new_v4().to_string(),
            idempotency_key: format!("bench-{i}"),
            requested_by: "bench".into(),
            state: 0,
            phase: 0,
            processed: 0,
            total: 0,
            created_at: now,
            start_time: None,
            finish_time: None,
            error_message: String::new(),
            data_as_of: None,
            outputs: None,
            changes_cursor: String::new(),
            model: None,
        };
        store.start_run(&run).await.unwrap();
        let t = Instant::now();
        let timings = engine.run_recompute_timed(&run.run_id).await.unwrap();
        let done = store.get_run(&run.run_id).await.unwrap();
        let out = done.outputs.unwrap();
        println!(
            "run {i}: full recompute of {n} profiles in {:?} (entered {}, exited {}, clusters {:?}, CLV converged {:?})",
            t.elapsed(),
            out.entered,
            out.exited,
            out.clusters
                .first()
                .map(|c| c.clusters.iter().map(|x| x.size).collect::<Vec<_>>()),
            out.predicted_value.map(|p| p.converged),
        );
        for (step, took) in timings {
            println!("    {step:<28} {took:?}");
        }
    }
}
