//! Builds the ExperimentService from settings: opens and migrates its database, and starts
//! the feed consumer ([`crate::consumer`]) that derives conversions from ingested events and
//! follows profile merges and erasures, reading IngestService at `endpoints.ingest` and
//! ProfileService at `endpoints.profiles` (default: this process), unless
//! `experiments.consumers` is false.

use std::sync::Arc;
use std::time::Duration;

use clientele_runtime::Settings;
use clientele_runtime::db::{self, DatabaseTarget};

use crate::consumer::Consumer;
use crate::holdout::{HoldoutConfig, HoldoutError};
use crate::{ExperimentServiceImpl, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS, SqlExperimentStore};

/// How long a feed read waits for the next record before it ends a batch.
const FEED_IDLE: Duration = Duration::from_millis(200);

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Database connection or migration failed.
    #[error(transparent)]
    Db(#[from] db::DbError),
    /// The holdout configuration is invalid.
    #[error("holdout: {0}")]
    Holdout(#[from] HoldoutError),
    /// An upstream endpoint or the service token is invalid.
    #[error("endpoint: {0}")]
    Endpoint(String),
}

/// The global holdout from settings (the OfferService builds the same one).
pub fn holdout(settings: &Settings) -> HoldoutConfig {
    HoldoutConfig {
        enabled: settings.holdout.fraction > 0.0,
        fraction: settings.holdout.fraction,
        seed: settings.holdout.seed.clone(),
        ..Default::default()
    }
}

/// Opens the service's database at `target` and builds the service with the holdout from
/// settings; starts the feed consumer unless `experiments.consumers` is false.
///
/// # Errors
/// As [`build_with_holdout`].
pub async fn build(
    settings: &Settings,
    target: &DatabaseTarget,
) -> Result<ExperimentServiceImpl, SetupError> {
    build_with_holdout(settings, target, holdout(settings)).await
}

/// Opens the service's database at `target` and builds the service with `holdout`; starts
/// the feed consumer unless `experiments.consumers` is false.
///
/// # Errors
/// When the holdout or an endpoint is invalid or the database cannot be opened or migrated.
pub async fn build_with_holdout(
    settings: &Settings,
    target: &DatabaseTarget,
    holdout: HoldoutConfig,
) -> Result<ExperimentServiceImpl, SetupError> {
    let (service, consumer) = build_without_background(settings, target, holdout).await?;
    if settings.experiments.consumers {
        consumer.spawn(target.clone());
    }
    Ok(service)
}

/// Builds the service and its feed consumer without starting anything in the background
/// (tests drive the consumer themselves).
///
/// # Errors
/// When the holdout or an endpoint is invalid or the database cannot be opened or migrated.
pub async fn build_without_background(
    settings: &Settings,
    target: &DatabaseTarget,
    holdout: HoldoutConfig,
) -> Result<(ExperimentServiceImpl, Consumer), SetupError> {
    holdout.validate()?;
    let database = db::open(
        target,
        settings.database_max_connections,
        &POSTGRES_MIGRATIONS,
        &SQLITE_MIGRATIONS,
        "experiments",
    )
    .await?;
    let store = Arc::new(SqlExperimentStore::new(database));
    let consumer = Consumer::new(
        store.clone(),
        &settings.endpoint(&settings.endpoints.ingest),
        &settings.endpoint(&settings.endpoints.profiles),
        settings.service_token.as_deref(),
        FEED_IDLE,
    )
    .map_err(|s| SetupError::Endpoint(s.message().to_owned()))?;
    let service = ExperimentServiceImpl::new(store, holdout).with_definition_cache(
        Duration::from_millis(settings.experiments.definition_cache_ms),
    );
    Ok((service, consumer))
}
