//! Segmentation domain: customer features, RFM scoring, clustering, lifecycle states and
//! predicted customer value. The domain modules are pure (no I/O) so they are unit-tested and
//! benchmarked directly; the gRPC service and its store are layered on top:
//!
//! * [`scoring`]: glue from stored facts to features, scores and segment membership, and the
//!   validation of segment definitions (pure).
//! * [`store`]: the [`store::SegmentationStore`] trait and its SQL implementation for
//!   PostgreSQL and SQLite.
//! * [`engine`]: batch recompute runs and real-time re-scoring.
//! * [`consumer`]: the IngestService / ProfileService feed consumer.
//! * [`service`]: the tonic service; [`setup`]: builds it from settings.

pub mod clustering;
pub mod clv;
pub mod consumer;
pub mod engine;
pub mod features;
pub mod lifecycle;
pub mod rfm;
pub mod scoring;
pub mod service;
pub mod setup;
pub mod store;

pub use service::SegmentationServiceImpl;
pub use store::{SegmentationStore, SqlSegmentationStore};

/// Migrations for PostgreSQL (schema `segmentation`).
pub static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
/// Migrations for embedded SQLite (`segmentation.db`).
pub static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
