//! IngestService: the single entry point for customer behaviour and commerce events.
//!
//! - [`validate`]: the contract's per-kind rules, canonical form and payload hash (pure).
//! - [`store`]: the [`store::EventStore`] trait with a PostgreSQL implementation (bulk
//!   `UNNEST` array writes over a native pool) and an embedded SQLite one.
//! - [`service`]: the tonic service: validation → one BatchResolve per batch → one commit per
//!   batch, IngestStream with durable acknowledgements and resume, timelines and the log.
//! - [`identity_cache`]: identifiers already linked to a live profile, so returning
//!   customers skip BatchResolve (pure; invalidated by the change feed).
//! - [`forwarder`]: follows the log (and the outbox of waiting refunds) into
//!   ProfileService.ApplyAggregates.
//! - [`erasure`]: follows ProfileService.WatchChanges and deletes erased people's events.
//! - [`setup`]: builds the service from settings.

pub mod erasure;
pub mod forwarder;
pub mod identity_cache;
pub mod service;
pub mod setup;
pub mod store;
pub mod validate;

pub use service::IngestServiceImpl;
pub use store::{EventStore, PgEventStore, SqliteEventStore};

/// Migrations for PostgreSQL (schema `ingest`).
pub static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
/// Migrations for embedded SQLite (`ingest.db`).
pub static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
