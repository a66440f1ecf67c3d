//! What every Clientele service shares: layered settings, telemetry (logs, OTLP traces, W3C
//! propagation), Prometheus metrics, bearer-token auth with scopes, database and cache
//! plumbing, precise gRPC statuses, and the gRPC host with health, reflection and graceful
//! shutdown. Service crates depend on this and on `clientele-proto`, never on each other.

pub mod auth;
pub mod cache;
pub mod client;
pub mod db;
pub mod feed;
pub mod leader;
pub mod metrics;
pub mod server;
pub mod settings;
pub mod status;
pub mod telemetry;
pub mod testing;
pub mod time;

pub use settings::Settings;
