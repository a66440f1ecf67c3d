//! Generated code for Clientele's gRPC contracts (`proto/clientele/v1`).
//!
//! Every service talks to the others only through these types. The messages, clients
//! (`*_client`) and servers (`*_server`) are generated at build time; nothing here is written
//! by hand except the re-exports.

/// `clientele.v1`: all five services and their shared types.
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]
pub mod v1 {
    tonic::include_proto!("clientele.v1");
}

/// Encoded `FileDescriptorSet` of every Clientele proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/clientele_descriptor.bin"));

pub use prost_types::Timestamp;
