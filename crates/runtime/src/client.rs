//! Outgoing gRPC calls to other Clientele services: a lazily connecting channel and an
//! interceptor that adds the bearer token and the current W3C trace context.

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::telemetry::MetadataInjector;

/// Adds `authorization: Bearer …` and `traceparent` to every outgoing call.
#[derive(Clone)]
pub struct ClientInterceptor {
    authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl std::fmt::Debug for ClientInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientInterceptor")
            .field("has_token", &self.authorization.is_some())
            .finish()
    }
}

impl ClientInterceptor {
    /// An interceptor presenting `token` (if any).
    pub fn new(token: Option<&str>) -> Result<Self, tonic::Status> {
        let authorization = token
            .map(|t| {
                MetadataValue::try_from(format!("Bearer {t}"))
                    .map_err(|_| tonic::Status::invalid_argument("token is not valid ASCII"))
            })
            .transpose()?;
        Ok(Self { authorization })
    }
}

impl Interceptor for ClientInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(a) = &self.authorization {
            req.metadata_mut().insert("authorization", a.clone());
        }
        let cx = tracing::Span::current().context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut MetadataInjector(req.metadata_mut()));
        });
        Ok(req)
    }
}

/// A channel to `endpoint` (`http://host:port`) that connects on first use and reconnects after
/// failures, so a service can start before the services it calls.
pub fn lazy_channel(endpoint: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(endpoint.to_string())?
        .connect_timeout(std::time::Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect_lazy())
}
