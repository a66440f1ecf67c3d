//! Builds the OfferService from settings: opens and migrates its database, loads the
//! programme, connects the upstream services and builds the global holdout exactly as the
//! ExperimentService does, so both agree on who is held out.

use std::sync::Arc;

use clientele_experiments::holdout::HoldoutConfig;
use clientele_runtime::Settings;
use clientele_runtime::db::{self, DatabaseTarget};

use crate::catalogue::FrequencyCap;
use crate::consumers::Consumers;
use crate::program::{Program, ProgramError};
use crate::service::Upstreams;
use crate::upstream::{GrpcExperiments, GrpcProfiles, GrpcSegments};
use crate::{OfferServiceImpl, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS, SqlOfferStore};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Database connection or migration failed.
    #[error(transparent)]
    Db(#[from] db::DbError),
    /// The programme file is invalid.
    #[error("offers.program_file: {0}")]
    Program(#[from] ProgramError),
    /// An upstream endpoint is invalid.
    #[error("endpoint: {0}")]
    Endpoint(String),
    /// The holdout configuration is invalid.
    #[error("holdout: {0}")]
    Holdout(#[from] clientele_experiments::holdout::HoldoutError),
}

/// The global holdout from settings, built exactly like the ExperimentService's.
pub fn holdout(settings: &Settings) -> HoldoutConfig {
    HoldoutConfig {
        enabled: settings.holdout.fraction > 0.0,
        fraction: settings.holdout.fraction,
        seed: settings.holdout.seed.clone(),
        ..Default::default()
    }
}

/// Decide's read models from `offers.decision_cache_*`.
pub fn read_model_config(settings: &Settings) -> crate::read_model::ReadModelConfig {
    let o = &settings.offers;
    crate::read_model::ReadModelConfig {
        max_profiles: o.decision_cache_profiles,
        upstream_ttl: std::time::Duration::from_secs(o.decision_cache_ttl_secs.max(1)),
        ledger_ttl: std::time::Duration::from_secs(o.decision_cache_ledger_ttl_secs.max(1)),
    }
}

/// Upstream clients at the configured endpoints (default: this process).
///
/// # Errors
/// When an endpoint is not a valid URI.
pub fn upstreams(settings: &Settings) -> Result<Upstreams, SetupError> {
    let token = settings.service_token.as_deref();
    let err = |s: tonic::Status| SetupError::Endpoint(s.message().to_string());
    Ok(Upstreams {
        profiles: Arc::new(
            GrpcProfiles::new(&settings.endpoint(&settings.endpoints.profiles), token)
                .map_err(err)?,
        ),
        segments: Arc::new(
            GrpcSegments::new(&settings.endpoint(&settings.endpoints.segmentation), token)
                .map_err(err)?,
        ),
        experiments: Arc::new(
            GrpcExperiments::new(&settings.endpoint(&settings.endpoints.experiments), token)
                .map_err(err)?,
        ),
    })
}

/// Opens the service's database at `target` and builds the service; starts the feed
/// consumers in the background unless `offers.consumers` is false.
///
/// # Errors
/// As [`build_without_background`].
pub async fn build(
    settings: &Settings,
    target: &DatabaseTarget,
) -> Result<OfferServiceImpl, SetupError> {
    let (service, consumers) = build_without_background(settings, target).await?;
    if settings.offers.consumers {
        // Not ready (health NOT_SERVING) until the consumers caught up with the feeds: until
        // then every old change they read invalidates Decide's read models. The server
        // serves meanwhile (in `--target all` it also serves the feeds themselves).
        service.set_ready(false);
        consumers.spawn(target.clone());
        let (waiting, timeout) = (
            service.clone(),
            std::time::Duration::from_secs(settings.offers.ready_timeout_secs),
        );
        tokio::spawn(async move {
            let mut ready = waiting.readiness();
            if tokio::time::timeout(timeout, ready.wait_for(|r| *r))
                .await
                .is_err()
            {
                tracing::warn!(
                    timeout_secs = timeout.as_secs(),
                    "feed consumers have not caught up; serving anyway"
                );
                waiting.set_ready(true);
            }
        });
    }
    Ok(service)
}

/// Opens the service's database at `target` and builds the service and its feed consumers
/// without starting anything in the background (tests drive the consumers themselves).
///
/// # Errors
/// When the programme, an endpoint or the holdout is invalid, or the database cannot be
/// opened or migrated.
pub async fn build_without_background(
    settings: &Settings,
    target: &DatabaseTarget,
) -> Result<(OfferServiceImpl, Consumers), SetupError> {
    let program = match &settings.offers.program_file {
        Some(path) => Program::from_toml_file(path)?,
        None => Program::builtin(),
    };
    let holdout = holdout(settings);
    holdout.validate()?;
    let up = upstreams(settings)?;
    let database = db::open(
        target,
        settings.database_max_connections,
        &POSTGRES_MIGRATIONS,
        &SQLITE_MIGRATIONS,
        "offers",
    )
    .await?;
    let frequency_cap = (settings.offers.frequency_cap > 0).then(|| FrequencyCap {
        max_offers: settings.offers.frequency_cap,
        window_hours: settings.offers.frequency_window_hours.max(1),
    });
    let service = OfferServiceImpl::new(
        Arc::new(SqlOfferStore::new(database)),
        program,
        up,
        holdout,
        frequency_cap,
        read_model_config(settings),
    );
    let consumers = Consumers::new(
        service.clone(),
        &settings.endpoint(&settings.endpoints.ingest),
        &settings.endpoint(&settings.endpoints.segmentation),
        &settings.endpoint(&settings.endpoints.profiles),
        settings.service_token.as_deref(),
        std::time::Duration::from_millis(300),
    )
    .map_err(|s| SetupError::Endpoint(s.message().to_string()))?;
    Ok((service, consumers))
}
