//! Builds the ExperimentService from settings: opens and migrates its database.
//!
//! The global holdout is not part of `clientele_runtime::Settings` yet, so [`build`] runs with
//! the default (disabled) holdout and [`build_with_holdout`] takes an explicit one; the server
//! assembly should pass the deployment's configuration once settings carry it.

use std::sync::Arc;

use clientele_runtime::Settings;
use clientele_runtime::db::{self, DatabaseTarget};

use crate::holdout::{HoldoutConfig, HoldoutError};
use crate::{ExperimentServiceImpl, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS, SqlExperimentStore};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Database connection or migration failed.
    #[error(transparent)]
    Db(#[from] db::DbError),
    /// The holdout configuration is invalid.
    #[error("holdout: {0}")]
    Holdout(#[from] HoldoutError),
}

/// Opens the service's database at `target` and builds the service with the default
/// (disabled) global holdout.
///
/// # Errors
/// When the database cannot be opened or migrated.
pub async fn build(
    settings: &Settings,
    target: &DatabaseTarget,
) -> Result<ExperimentServiceImpl, SetupError> {
    build_with_holdout(settings, target, HoldoutConfig::default()).await
}

/// Opens the service's database at `target` and builds the service with `holdout`.
///
/// # Errors
/// When the holdout is invalid or the database cannot be opened or migrated.
pub async fn build_with_holdout(
    settings: &Settings,
    target: &DatabaseTarget,
    holdout: HoldoutConfig,
) -> Result<ExperimentServiceImpl, SetupError> {
    holdout.validate()?;
    let database = db::open(
        target,
        settings.database_max_connections,
        &POSTGRES_MIGRATIONS,
        &SQLITE_MIGRATIONS,
        "experiments",
    )
    .await?;
    let store = SqlExperimentStore::new(database);
    Ok(ExperimentServiceImpl::new(Arc::new(store), holdout))
}
