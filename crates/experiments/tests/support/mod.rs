//! Test fixtures: an experiment store and service on a fresh PostgreSQL schema or SQLite
//! file, and builders for requests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;

use clientele_experiments::holdout::HoldoutConfig;
use clientele_experiments::{
    ExperimentServiceImpl, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS, SqlExperimentStore,
};
use clientele_proto::v1 as pb;
use clientele_proto::v1::experiment_service_server::ExperimentService;
use clientele_runtime::db::{self, DatabaseTarget};
use clientele_runtime::testing;
use tonic::Request;

/// Which database a fixture uses.
#[derive(Debug, Clone, Copy)]
pub enum Engine {
    Postgres,
    Sqlite,
}

pub struct Fixture {
    pub store: Arc<SqlExperimentStore>,
    pub service: ExperimentServiceImpl,
    pub target: DatabaseTarget,
    _dir: Option<tempfile::TempDir>,
}

/// Opens the migrated database at `target` (a pool of its own).
async fn open(target: &DatabaseTarget) -> Arc<SqlExperimentStore> {
    let database = db::open(
        target,
        25,
        &POSTGRES_MIGRATIONS,
        &SQLITE_MIGRATIONS,
        "experiments",
    )
    .await
    .expect("test database (is PostgreSQL running? see README)");
    Arc::new(SqlExperimentStore::new(database))
}

/// A fixture on PostgreSQL whose service caches definitions for `ttl`.
pub async fn cached_fixture(ttl: std::time::Duration) -> Fixture {
    let mut f = fixture(Engine::Postgres).await;
    f.service = ExperimentServiceImpl::new(f.store.clone(), HoldoutConfig::default())
        .with_definition_cache(ttl);
    f
}

pub async fn fixture(engine: Engine) -> Fixture {
    fixture_with(engine, HoldoutConfig::default()).await
}

pub async fn fixture_with(engine: Engine, holdout: HoldoutConfig) -> Fixture {
    let (target, dir) = match engine {
        Engine::Postgres => (
            DatabaseTarget::Postgres {
                url: testing::postgres_url(),
                schema: testing::unique_schema("experiments"),
            },
            None,
        ),
        Engine::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            (
                DatabaseTarget::Sqlite {
                    path: dir.path().join("experiments.db"),
                },
                Some(dir),
            )
        }
    };
    let store = open(&target).await;
    Fixture {
        service: ExperimentServiceImpl::new(store.clone(), holdout),
        store,
        target,
        _dir: dir,
    }
}

pub fn days(n: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: n * 86_400,
        nanos: 0,
    }
}

pub fn binary_metric(key: &str) -> pb::Metric {
    pb::Metric {
        key: key.into(),
        name: format!("{key} metric"),
        r#type: pb::MetricType::Binary as i32,
        goal: pb::MetricGoal::Increase as i32,
        conversion_window: Some(days(7)),
        source: Some(pb::metric::Source::Recorded(pb::RecordedMetricSource {})),
        ..pb::Metric::default()
    }
}

pub fn revenue_metric(key: &str, currency: &str) -> pb::Metric {
    pb::Metric {
        r#type: pb::MetricType::Continuous as i32,
        currency: currency.into(),
        ..binary_metric(key)
    }
}

pub fn experiment(key: &str, weights: &[f64]) -> pb::Experiment {
    pb::Experiment {
        key: key.into(),
        display_name: format!("Experiment {key}"),
        hypothesis: "A better checkout converts more".into(),
        variants: weights
            .iter()
            .enumerate()
            .map(|(i, w)| pb::Variant {
                key: if i == 0 {
                    "control".into()
                } else {
                    format!("treatment_{i}")
                },
                name: format!("Variant {i}"),
                weight: *w,
            })
            .collect(),
        coverage: 1.0,
        hash_version: 2,
        holdout: pb::HoldoutParticipation::Include as i32,
        primary_metric: Some(binary_metric("purchase")),
        ..pb::Experiment::default()
    }
}

pub fn now() -> prost_types::Timestamp {
    let micros = chrono::Utc::now().timestamp_micros();
    clientele_runtime::time::timestamp(micros)
}

pub fn later(secs: i64) -> prost_types::Timestamp {
    let micros = chrono::Utc::now().timestamp_micros() + secs * 1_000_000;
    clientele_runtime::time::timestamp(micros)
}

pub fn unit_ids(attribute: &str, id: &str) -> HashMap<String, String> {
    [(attribute.to_owned(), id.to_owned())].into()
}

impl Fixture {
    /// Another process on the same database: its own pool, no definition cache.
    pub async fn peer(&self) -> ExperimentServiceImpl {
        ExperimentServiceImpl::new(open(&self.target).await, HoldoutConfig::default())
    }

    pub async fn create(&self, e: pb::Experiment) -> pb::Experiment {
        self.service
            .create_experiment(Request::new(pb::CreateExperimentRequest {
                experiment: Some(e),
            }))
            .await
            .unwrap()
            .into_inner()
            .experiment
            .unwrap()
    }

    pub async fn start(&self, key: &str) -> pb::Experiment {
        self.service
            .start_experiment(Request::new(pb::StartExperimentRequest { key: key.into() }))
            .await
            .unwrap()
            .into_inner()
            .experiment
            .unwrap()
    }

    pub async fn create_and_start(&self, e: pb::Experiment) -> pb::Experiment {
        let key = e.key.clone();
        self.create(e).await;
        self.start(&key).await
    }

    pub async fn assign(&self, key: &str, unit: &str) -> pb::Assignment {
        self.service
            .assign(Request::new(pb::AssignRequest {
                experiment_key: key.into(),
                unit_id: unit.into(),
                ..pb::AssignRequest::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .assignment
            .unwrap()
    }

    /// Assigns and, when in the experiment, logs the exposure; returns the variant.
    pub async fn expose(&self, key: &str, unit: &str, pre: Option<f64>) -> Option<i32> {
        let a = self.assign(key, unit).await;
        if !a.in_experiment {
            return None;
        }
        self.service
            .log_exposure(Request::new(pb::LogExposureRequest {
                experiment_key: key.into(),
                unit_id: unit.into(),
                variant_index: a.variant_index,
                pre_period_value: pre,
                ..pb::LogExposureRequest::default()
            }))
            .await
            .unwrap();
        Some(a.variant_index)
    }

    pub async fn convert(&self, metric: &str, unit: &str, idem: &str, value: Option<pb::Money>) {
        self.service
            .record_conversion(Request::new(pb::RecordConversionRequest {
                metric_key: metric.into(),
                unit_ids: unit_ids("profile_id", unit),
                occurred_at: Some(later(1)),
                value,
                idempotency_key: idem.into(),
            }))
            .await
            .unwrap();
    }

    pub async fn results(&self, key: &str) -> pb::GetResultsResponse {
        self.service
            .get_results(Request::new(pb::GetResultsRequest {
                experiment_key: key.into(),
                metric_keys: vec![],
            }))
            .await
            .unwrap()
            .into_inner()
    }
}

pub fn usd(amount_minor: i64) -> Option<pb::Money> {
    Some(pb::Money {
        amount_minor,
        currency: "USD".into(),
    })
}
