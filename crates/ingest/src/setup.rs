//! Builds the IngestService from settings: opens and migrates its database (PostgreSQL schema
//! `ingest` or `<data_dir>/ingest.db`), connects lazily to ProfileService and starts the
//! background forwarder and pruning.

use std::sync::Arc;

use clientele_runtime::Settings;
use clientele_runtime::client::{ClientInterceptor, lazy_channel};
use clientele_runtime::db::{self, DatabaseTarget};

use crate::service::ProfileClient;
use crate::store::{EventStore, PgEventStore, SqliteEventStore, StoreError};
use crate::{IngestServiceImpl, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Database connection or migration failed.
    #[error(transparent)]
    Db(#[from] db::DbError),
    /// The native PostgreSQL pool could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The ProfileService endpoint or token is unusable.
    #[error("profile service client: {0}")]
    Client(String),
}

/// Opens the event store at `target`.
pub async fn open_store(
    settings: &Settings,
    target: &DatabaseTarget,
) -> Result<Arc<dyn EventStore>, SetupError> {
    let database = db::open(
        target,
        settings.database_max_connections,
        &POSTGRES_MIGRATIONS,
        &SQLITE_MIGRATIONS,
        "ingest",
    )
    .await?;
    Ok(match target {
        DatabaseTarget::Postgres { url, schema } => Arc::new(
            PgEventStore::connect(database, url, schema, settings.database_max_connections).await?,
        ),
        DatabaseTarget::Sqlite { .. } => Arc::new(SqliteEventStore::new(database)),
    })
}

/// A ProfileService client for `settings.endpoints.profiles` presenting
/// `settings.service_token`.
pub fn profile_client(settings: &Settings) -> Result<ProfileClient, SetupError> {
    let endpoint = settings.endpoint(&settings.endpoints.profiles);
    let channel = lazy_channel(&endpoint).map_err(|e| SetupError::Client(e.to_string()))?;
    let interceptor = ClientInterceptor::new(settings.service_token.as_deref())
        .map_err(|e| SetupError::Client(e.message().to_string()))?;
    Ok(
        clientele_proto::v1::profile_service_client::ProfileServiceClient::with_interceptor(
            channel,
            interceptor,
        ),
    )
}

/// Builds the service without background tasks (tests drive the forwarder themselves).
pub async fn build_without_background(
    settings: &Settings,
    target: &DatabaseTarget,
) -> Result<IngestServiceImpl, SetupError> {
    let store = open_store(settings, target).await?;
    Ok(IngestServiceImpl::new(
        store,
        profile_client(settings)?,
        settings.ingest.clone(),
    ))
}

/// Opens the service's database at `target`, builds the service and starts its forwarder.
pub async fn build(
    settings: &Settings,
    target: &DatabaseTarget,
) -> Result<IngestServiceImpl, SetupError> {
    let svc = build_without_background(settings, target).await?;
    svc.spawn_background(target.clone());
    Ok(svc)
}
