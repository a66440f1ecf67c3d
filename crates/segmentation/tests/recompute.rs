//! Batch recompute through the engine on both engines: what changes between runs when no fact
//! changed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use clientele_proto::v1 as pb;
use clientele_runtime::db::{self, DatabaseTarget};
use clientele_runtime::settings::SegmentationSettings;
use clientele_runtime::testing;
use clientele_segmentation::engine::Engine;
use clientele_segmentation::scoring::{ScoringConfig, kind_of};
use clientele_segmentation::store::{Fact, RunRecord, SqlSegmentationStore};
use clientele_segmentation::{POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};
use rand::{Rng, SeedableRng};

const DAY: i64 = 86_400_000_000;
const NOW: i64 = 1_780_000_000_000_000;

#[derive(Debug, Clone, Copy)]
enum Backend {
    Postgres,
    Sqlite,
}

async fn engine(backend: Backend, dir: &std::path::Path) -> Engine {
    let target = match backend {
        Backend::Postgres => DatabaseTarget::Postgres {
            url: testing::postgres_url(),
            schema: testing::unique_schema("segmentation"),
        },
        Backend::Sqlite => DatabaseTarget::Sqlite {
            path: dir.join("segmentation.db"),
        },
    };
    let database = db::open(
        &target,
        4,
        &POSTGRES_MIGRATIONS,
        &SQLITE_MIGRATIONS,
        "segmentation",
    )
    .await
    .expect("database (is PostgreSQL running?)");
    let store = match &target {
        DatabaseTarget::Postgres { url, schema } => {
            SqlSegmentationStore::connect_postgres(database, url, schema, 2)
                .await
                .unwrap()
        }
        DatabaseTarget::Sqlite { .. } => SqlSegmentationStore::new(database),
    };
    Engine {
        store: Arc::new(store),
        config: Arc::new(ScoringConfig::from_settings(&SegmentationSettings::default()).unwrap()),
        profiles: None,
        changed: Arc::default(),
        rescore_cache: Default::default(),
    }
}

fn define(id: &str, def: pb::segment::Definition) -> (pb::Segment, i32) {
    let kind = kind_of(&def) as i32;
    let segment = pb::Segment {
        segment_id: id.into(),
        display_name: id.into(),
        definition: Some(def),
        ..Default::default()
    };
    (segment, kind)
}

/// 400 customers with 1–6 orders over two years (many ties in frequency and monetary), the
/// bench's four segment kinds, and one customer whose last order is 90 days minus one minute
/// before `NOW` (inside `recency_days <= 90` at `NOW`, outside a few minutes later).
async fn base(e: &Engine) -> String {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut facts = Vec::new();
    for p in 0..400 {
        let id = format!("p{p:04}");
        for o in 0..rng.gen_range(1..=6) {
            facts.push(Fact::Order {
                profile_id: id.clone(),
                order_id: format!("o{o}"),
                placed_at: NOW - rng.gen_range(1..700) * DAY,
                amount_minor: 1000 * rng.gen_range(1..5),
                discount_minor: 0,
                converted: true,
                lines: vec![("books".into(), 1000)],
            });
        }
    }
    let edge = "p-edge".to_owned();
    for (o, days) in [(0, 200), (1, 150), (2, 90)] {
        facts.push(Fact::Order {
            profile_id: edge.clone(),
            order_id: format!("o{o}"),
            placed_at: NOW - days * DAY + 60_000_000,
            amount_minor: 5000,
            discount_minor: 0,
            converted: true,
            lines: vec![("books".into(), 5000)],
        });
    }
    e.store
        .apply_events("ingest", None, "log:1", &facts)
        .await
        .unwrap();
    let segments = [
        define(
            "champions",
            pb::segment::Definition::Rfm(pb::RfmDefinition {
                segment_names: vec!["Champions".into()],
                ..Default::default()
            }),
        ),
        define(
            "active",
            pb::segment::Definition::Lifecycle(pb::LifecycleDefinition {
                states: vec![pb::LifecycleState::Active as i32],
            }),
        ),
        define(
            "regulars",
            pb::segment::Definition::Rule(pb::RuleDefinition {
                expression: "orders >= 3 and recency_days <= 90".into(),
            }),
        ),
        define(
            "behaviour",
            pb::segment::Definition::Cluster(pb::ClusterDefinition {
                k: 4,
                method: pb::ClusteringMethod::Kmeans as i32,
                features: vec![1, 2, 3],
                scaling: pb::FeatureScaling::Standard as i32,
                log1p_features: vec![2, 3],
                seed: 1,
                n_init: 1,
                ..Default::default()
            }),
        ),
    ];
    for (s, kind) in &segments {
        e.store.define_segment(s, *kind, 0, NOW).await.unwrap();
    }
    edge
}

async fn run_at(e: &Engine, key: &str, as_of: i64) -> pb::RecomputeOutputs {
    let run = RunRecord {
        run_id: uuid::Uuid::new_v4().to_string(),
        idempotency_key: key.into(),
        requested_by: "test".into(),
        state: 0,
        phase: 0,
        processed: 0,
        total: 0,
        created_at: as_of,
        start_time: None,
        finish_time: None,
        error_message: String::new(),
        data_as_of: None,
        outputs: None,
        changes_cursor: String::new(),
        model: None,
    };
    e.store.start_run(&run).await.unwrap();
    e.run_recompute_at(&run.run_id, as_of).await.unwrap();
    e.store.get_run(&run.run_id).await.unwrap().outputs.unwrap()
}

macro_rules! recompute_suite {
    ($backend:expr) => {
        use super::*;

        #[tokio::test]
        async fn a_second_run_on_unchanged_facts_at_the_same_instant_changes_nothing() {
            let dir = tempfile::tempdir().unwrap();
            let e = engine($backend, dir.path()).await;
            base(&e).await;
            let first = run_at(&e, "r1", NOW).await;
            assert!(first.entered > 400, "{first:?}");
            let second = run_at(&e, "r2", NOW).await;
            assert_eq!((second.entered, second.exited), (0, 0));
        }

        #[tokio::test]
        async fn a_later_run_on_unchanged_facts_moves_only_profiles_whose_recency_crossed_a_limit()
        {
            let dir = tempfile::tempdir().unwrap();
            let e = engine($backend, dir.path()).await;
            let edge = base(&e).await;
            run_at(&e, "r1", NOW).await;
            let cursor = e.store.changes_end().await.unwrap();
            // Five minutes later: the edge customer's last order is now older than 90 days.
            let later = run_at(&e, "r2", NOW + 5 * 60_000_000).await;
            let changes = e.store.changes_after(cursor, 100).await.unwrap();
            assert_eq!(later.entered, 0, "{changes:?}");
            assert!(
                changes
                    .iter()
                    .any(|c| c.profile_id == edge && c.segment_id == "regulars"),
                "{changes:?}"
            );
            assert!(
                changes
                    .iter()
                    .all(|c| c.change_type == pb::MembershipChangeType::Exited as i32),
                "{changes:?}"
            );
        }
    };
}

mod postgres {
    recompute_suite!(Backend::Postgres);
}

mod sqlite {
    recompute_suite!(Backend::Sqlite);
}
