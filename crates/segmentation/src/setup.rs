//! Builds the SegmentationService from settings: opens and migrates its database, marks runs
//! interrupted by a restart as FAILED, connects lazily to IngestService and ProfileService,
//! and (with [`build`]) starts the feed consumer in the background.

use std::sync::Arc;
use std::time::Duration;

use clientele_proto::v1 as pb;
use clientele_runtime::Settings;
use clientele_runtime::client::{ClientInterceptor, lazy_channel};
use clientele_runtime::db::{self, DatabaseTarget};
use tokio::sync::Notify;

use crate::consumer::{Consumer, IngestClient};
use crate::engine::{Engine, ProfileClient};
use crate::scoring::ScoringConfig;
use crate::store::{SegmentationStore, SqlSegmentationStore};
use crate::{POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS, SegmentationServiceImpl};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Database connection or migration failed.
    #[error(transparent)]
    Db(#[from] db::DbError),
    /// A stored-state repair failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The `segmentation` settings are invalid.
    #[error("settings: {0}")]
    Settings(String),
    /// An upstream endpoint or the service token is invalid.
    #[error("client: {0}")]
    Client(String),
}

/// The service and its (not yet started) consumer.
#[derive(Debug)]
pub struct Built {
    /// The service.
    pub service: SegmentationServiceImpl,
    /// The feed consumer; call [`Consumer::spawn`] or drive it step by step.
    pub consumer: Consumer,
}

fn clients(settings: &Settings) -> Result<(IngestClient, ProfileClient), SetupError> {
    let interceptor = ClientInterceptor::new(settings.service_token.as_deref())
        .map_err(|e| SetupError::Client(e.message().to_owned()))?;
    let ingest = lazy_channel(&settings.endpoint(&settings.endpoints.ingest))
        .map_err(|e| SetupError::Client(e.to_string()))?;
    let profiles = lazy_channel(&settings.endpoint(&settings.endpoints.profiles))
        .map_err(|e| SetupError::Client(e.to_string()))?;
    Ok((
        pb::ingest_service_client::IngestServiceClient::with_interceptor(
            ingest,
            interceptor.clone(),
        ),
        pb::profile_service_client::ProfileServiceClient::with_interceptor(profiles, interceptor),
    ))
}

/// Opens the database at `target` and builds the service and its consumer without starting
/// anything in the background (tests drive the consumer themselves).
///
/// # Errors
/// Invalid settings, or a database that cannot be opened or migrated.
pub async fn build_without_background(
    settings: &Settings,
    target: &DatabaseTarget,
) -> Result<Built, SetupError> {
    let config =
        ScoringConfig::from_settings(&settings.segmentation).map_err(SetupError::Settings)?;
    let database = db::open(
        target,
        settings.database_max_connections,
        &POSTGRES_MIGRATIONS,
        &SQLITE_MIGRATIONS,
        "segmentation",
    )
    .await?;
    // On PostgreSQL batch runs are published with COPY over a small native pool.
    let store = match target {
        DatabaseTarget::Postgres { url, schema } => {
            SqlSegmentationStore::connect_postgres(database, url, schema, 2).await?
        }
        DatabaseTarget::Sqlite { .. } => SqlSegmentationStore::new(database),
    };
    let failed = store
        .fail_interrupted_runs(clientele_runtime::time::now_micros())
        .await?;
    if failed > 0 {
        tracing::warn!(
            runs = failed,
            "recompute runs interrupted by a restart marked FAILED"
        );
    }
    let (ingest, profiles) = clients(settings)?;
    let engine = Engine {
        store: Arc::new(store),
        config: Arc::new(config),
        profiles: Some(profiles.clone()),
        changed: Arc::new(Notify::new()),
        rescore_cache: Default::default(),
    };
    let consumer = Consumer::new(engine.clone(), ingest, profiles, Duration::from_millis(300));
    Ok(Built {
        service: SegmentationServiceImpl::new(engine),
        consumer,
    })
}

/// Opens the database at `target`, builds the service and starts the feed consumer.
///
/// # Errors
/// As [`build_without_background`].
pub async fn build(
    settings: &Settings,
    target: &DatabaseTarget,
) -> Result<SegmentationServiceImpl, SetupError> {
    let built = build_without_background(settings, target).await?;
    built.consumer.spawn(target.clone());
    Ok(built.service)
}
