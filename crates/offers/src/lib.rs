//! Pure domain rules of Clientele's offer and reward engine.
//!
//! Nothing in this crate performs I/O: every function takes the state it needs
//! and returns a value, so the gRPC service and its PostgreSQL store can be
//! layered on top and tested separately.
//!
//! * [`ledger`] — the append-only points ledger ([`ledger::PointsLedger`]):
//!   accrual in expiring batches, FIFO redemption, expiry, refunds, manual
//!   adjustments and idempotent command handling.
//! * [`earning`] — how many points an order or event earns ([`earning::EarningRules`]).
//! * [`tiers`] — loyalty tier qualification with grace-period downgrades
//!   ([`tiers::evaluate_tier`]).
//! * [`catalogue`] — the offer catalogue and its eligibility data.
//! * [`decision`] — which offers a customer may receive right now ([`decision::decide`]).
//! * [`eligibility_rule`] — rule-expression eligibility: checking at definition, the facts a
//!   rule reads, cached compiled rules.
//! * [`money`] — integer money in minor units with an ISO 4217 code.
//!
//! Service layer (I/O lives only here):
//! * [`store`] — the [`store::OfferStore`] trait and its SQL implementation for PostgreSQL
//!   and SQLite (per-profile serialised ledger writes, atomic budget booking).
//! * [`service`] — the tonic `clientele.v1.OfferService`.
//! * [`consumers`] — order accrual / refund reversal from the ingest feed (exactly once per
//!   order) and segment-entry / event triggers.
//! * [`read_model`] — Decide's per-profile caches of upstream facts and ledger views, kept
//!   current by the feeds and this process's writes.
//! * [`upstream`] — the other services the decision path reads, each behind a small trait.
//! * [`setup`] — builds the service from settings.
//!
//! Money is never a float: amounts are `i64` minor units, multipliers and
//! percentages are integer basis points (10 000 = 100 % = ×1.0).

pub mod catalogue;
pub mod decision;
pub mod earning;
pub mod eligibility_rule;
pub mod ledger;
pub mod money;
pub mod tiers;

pub mod consumers;
pub mod convert;
pub mod program;
pub mod read_model;
pub mod service;
pub mod setup;
pub mod store;
pub mod upstream;

pub use service::OfferServiceImpl;
pub use store::{OfferStore, SqlOfferStore};

/// Migrations for PostgreSQL (schema `offers`).
pub static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
/// Migrations for embedded SQLite (`offers.db`).
pub static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

pub use money::{CurrencyCode, Money};

/// Any error this crate's rules can return, for callers that want one type.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OffersError {
    /// A points-ledger command was refused.
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    /// Points could not be computed for an order or event.
    #[error(transparent)]
    Earning(#[from] earning::EarningError),
    /// Tier configuration or history is invalid.
    #[error(transparent)]
    Tier(#[from] tiers::TierError),
    /// The offer catalogue is invalid.
    #[error(transparent)]
    Catalogue(#[from] catalogue::CatalogueError),
    /// A money value was malformed.
    #[error(transparent)]
    Money(#[from] money::MoneyError),
}
