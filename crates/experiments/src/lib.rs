//! Pure domain logic of Clientele's A/B experiment service.
//!
//! * [`assignment`]: deterministic, stateless variant assignment that is
//!   bit-compatible with GrowthBook's SDKs, so units bucketed here and in a
//!   GrowthBook SDK land in the same variant.
//! * [`stats`]: experiment analysis from sufficient statistics (counts, sums,
//!   sums of squares and cross-products), so results can be computed from SQL
//!   aggregates without loading individual units.
//!
//! No I/O happens here; the gRPC service layer is built on top.

pub mod assignment;
pub mod stats;
