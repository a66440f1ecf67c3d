//! Segmentation domain: customer features, RFM scoring, clustering, lifecycle states and
//! predicted customer value. Everything here is pure (no I/O) so it is unit-tested and
//! benchmarked directly; the gRPC service and its store are layered on top.

pub mod clustering;
pub mod clv;
pub mod features;
pub mod lifecycle;
pub mod rfm;
