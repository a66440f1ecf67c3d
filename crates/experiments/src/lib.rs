//! ExperimentService: A/B tests of offers and experiences, and the global holdout.
//!
//! Pure domain logic:
//! * [`assignment`]: deterministic, stateless variant assignment that is bit-compatible with
//!   GrowthBook's SDKs, so units bucketed here and in a GrowthBook SDK land in the same
//!   variant.
//! * [`stats`]: experiment analysis from sufficient statistics (counts, sums, sums of squares
//!   and cross-products), so results are computed from SQL aggregates without loading units.
//! * [`holdout`]: the global long-term holdout shared with the OfferService.
//! * [`definition`]: validation of experiment definitions and targeting evaluation.
//! * [`events`]: how ingested events (purchases, refunds, …) become conversions.
//! * [`results`]: per-variant aggregates → `GetResultsResponse` figures.
//! * [`render`]: a plain-text table of results for the CLI.
//!
//! Service layer:
//! * [`store`]: the [`store::ExperimentStore`] trait and its SQL implementation for
//!   PostgreSQL and SQLite (sticky first exposures, exactly-once conversions).
//! * [`service`]: the tonic service.
//! * [`cache`]: the bounded-staleness cache of definitions that assignment reads.
//! * [`consumer`]: follows IngestService.WatchEvents (event-derived conversions) and
//!   ProfileService.WatchChanges (merges, erasure) with durable cursors.
//! * [`setup`]: builds the service from settings.

pub mod assignment;
pub mod cache;
pub mod consumer;
pub mod definition;
pub mod events;
pub mod holdout;
pub mod model;
pub mod render;
pub mod results;
pub mod service;
pub mod setup;
pub mod stats;
pub mod store;

pub use render::render_results_table;
pub use service::ExperimentServiceImpl;
pub use store::{ExperimentStore, SqlExperimentStore};

/// Migrations for PostgreSQL (schema `experiments`).
pub static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
/// Migrations for embedded SQLite (`experiments.db`).
pub static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
