//! ProfileService: the single customer view.
//!
//! - [`identifiers`]: normalisation and keyed hashing of identifiers (pure).
//! - [`stitching`]: which profile a set resolves to, what merges, what the over-merge guard
//!   refuses (pure).
//! - [`store`]: the [`store::ProfileStore`] trait and its SQL implementation for PostgreSQL and
//!   SQLite.
//! - [`service`]: the tonic service, request validation and the read-through cache.
//! - [`row_engagement`]: which engagement counters live in the profile row (pure).
//! - [`change_signal`]: wakes `WatchChanges` streams by the kinds of this process's writes.

pub mod change_signal;
pub mod identifiers;
pub mod model;
pub mod row_engagement;
pub mod service;
pub mod setup;
pub mod stitching;
pub mod store;

pub use service::ProfileServiceImpl;
pub use store::{ProfileStore, SqlProfileStore};

/// Migrations for PostgreSQL (schema `profiles`).
pub static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
/// Migrations for embedded SQLite (`profiles.db`).
pub static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
