//! The gRPC host every service runs in: auth, tracing and metrics layers, the standard health
//! service, server reflection, and a graceful stop on SIGTERM / Ctrl-C (health turns
//! NOT_SERVING, in-flight calls drain for up to `shutdown_grace_secs`, then the process exits).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering, Ordering as AtomicOrdering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tonic::service::RoutesBuilder;
use tonic_health::ServingStatus;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::auth::{AuthLayer, Authenticator};
use crate::metrics::METRICS;
use crate::settings::Settings;
use crate::telemetry::HeaderExtractor;

/// What a service contributes to a host: its tonic service, its fully qualified name (for
/// health), and the scope each of its methods needs.
#[derive(Default)]
pub struct Mount {
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    scopes: Vec<(String, &'static str)>,
    readiness: Vec<(&'static str, watch::Receiver<bool>)>,
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mount")
            .field("services", &self.names)
            .finish()
    }
}

impl Mount {
    /// Adds a tonic service. `name` is its full name (`clientele.v1.ProfileService`);
    /// `scopes` pairs each method name (`GetProfile`) with the scope it needs.
    pub fn add<S>(&mut self, name: &'static str, svc: S, scopes: &[(&str, &'static str)])
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.routes.add_service(svc);
        self.names.push(name);
        self.scopes
            .extend(scopes.iter().map(|(m, s)| (format!("/{name}/{m}"), *s)));
    }

    /// Reports service `name` NOT_SERVING on the health service while `ready` is false (the
    /// server itself serves from the start: only the health status waits, so a service whose
    /// readiness depends on another one in the same process cannot deadlock).
    pub fn add_readiness(&mut self, name: &'static str, ready: watch::Receiver<bool>) {
        self.readiness.push((name, ready));
    }

    /// Names of the mounted services.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }
}

/// A future that resolves on SIGTERM or Ctrl-C.
pub async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Serves `mount` on `listener` until `shutdown` resolves, then drains in-flight calls for at
/// most `settings.shutdown_grace_secs`.
pub async fn serve(
    settings: &Settings,
    mount: Mount,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    for name in &mount.names {
        health_reporter
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    health_reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let (stop_tx, mut stop_rx) = watch::channel(false);
    for (name, mut ready) in mount.readiness {
        if *ready.borrow() {
            continue;
        }
        health_reporter
            .set_service_status(name, ServingStatus::NotServing)
            .await;
        let (reporter, stopping) = (health_reporter.clone(), stop_rx.clone());
        tokio::spawn(async move {
            if ready.wait_for(|r| *r).await.is_ok() && !*stopping.borrow() {
                reporter
                    .set_service_status(name, ServingStatus::Serving)
                    .await;
                tracing::info!(service = name, "ready: health SERVING");
            }
        });
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(clientele_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(clientele_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let auth = Authenticator::new(
        &settings.tokens,
        mount.scopes.iter().map(|(m, s)| (m.as_str(), *s)),
    );
    let names = mount.names.clone();
    let mut routes = mount.routes;
    routes
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    let reporter = health_reporter.clone();
    let grace = Duration::from_secs(settings.shutdown_grace_secs);
    tokio::spawn(async move {
        shutdown.await;
        for name in &names {
            reporter
                .set_service_status(*name, ServingStatus::NotServing)
                .await;
        }
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let _ = stop_tx.send(true);
    });
    let mut drain_rx = stop_rx.clone();
    let stopped = async move {
        let _ = stop_rx.wait_for(|s| *s).await;
        tracing::info!("shutting down: draining in-flight calls");
    };

    let addr = listener.local_addr()?;
    tracing::info!(%addr, services = ?mount.names, "gRPC server listening");
    // `serve_with_incoming*` ignores the builder's TCP options: without TCP_NODELAY on every
    // accepted socket, small responses wait ~40 ms for the peer's delayed ACK (Nagle).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .layer(RequestLayer)
        .layer(AuthLayer::new(auth))
        .add_routes(routes.routes())
        .serve_with_incoming_shutdown(incoming, stopped);
    tokio::pin!(server);
    // hyper keeps idle HTTP/2 connections open through a graceful shutdown (hyper#4170), so
    // rather than wait for clients to hang up, exit once no call is in flight.
    tokio::select! {
        r = &mut server => r?,
        () = async {
            let _ = drain_rx.wait_for(|s| *s).await;
            let deadline = Instant::now() + grace;
            while IN_FLIGHT.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Let the last responses leave the socket buffers.
            tokio::time::sleep(Duration::from_millis(100)).await;
        } => {
            let left = IN_FLIGHT.load(Ordering::SeqCst);
            if left > 0 {
                tracing::warn!(grace_secs = grace.as_secs(), in_flight = left, "drain grace period over; exiting with calls in flight");
            } else {
                tracing::info!("drained: no call in flight");
            }
        }
    }
    Ok(())
}

/// Calls (unary, or streams until their response headers) currently being handled.
static IN_FLIGHT: AtomicI64 = AtomicI64::new(0);

/// Counts a call as in flight for as long as it lives, cancellation included.
struct InFlight;

impl InFlight {
    fn enter() -> Self {
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Tower layer that opens a span per call (child of the caller's W3C trace context) and records
/// the call's count and latency by method and gRPC status code.
#[derive(Debug, Clone, Copy)]
pub struct RequestLayer;

impl<S> Layer<S> for RequestLayer {
    type Service = RequestService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestService { inner }
    }
}

/// Service produced by [`RequestLayer`].
#[derive(Debug, Clone)]
pub struct RequestService<S> {
    inner: S,
}

impl<S, B, RB> Service<http::Request<B>> for RequestService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_string();
        // With an exporter, or when the caller sends trace context, a call is an info-level
        // span joined to the caller's trace; otherwise a debug-level span costs nothing
        // unless debug logging is on.
        let traced = crate::telemetry::TRACING_EXPORT.load(AtomicOrdering::Relaxed)
            || req.headers().contains_key("traceparent");
        let span = if traced {
            let parent = opentelemetry::global::get_text_map_propagator(|p| {
                p.extract(&HeaderExtractor(req.headers()))
            });
            let span = tracing::info_span!(
                "grpc.request",
                otel.name = %method,
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.method = %method,
                rpc.grpc.status_code = tracing::field::Empty,
            );
            let _ = span.set_parent(parent);
            span
        } else {
            tracing::debug_span!(
                "grpc.request",
                rpc.method = %method,
                rpc.grpc.status_code = tracing::field::Empty,
            )
        };
        let started = Instant::now();
        let in_flight = InFlight::enter();
        let fut = self.inner.call(req);
        Box::pin(
            async move {
                let result = fut.await;
                drop(in_flight);
                // Errors from unary calls arrive as trailers-only responses, with the status in
                // the headers; a response without it is OK (or reports its status in
                // trailers, for streams).
                let code = match &result {
                    Ok(resp) => resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("0")
                        .to_string(),
                    Err(_) => "transport".to_string(),
                };
                tracing::Span::current().record("rpc.grpc.status_code", code.as_str());
                METRICS
                    .grpc_latency
                    .with_label_values(&[method.as_str()])
                    .observe(started.elapsed().as_secs_f64());
                METRICS
                    .grpc_handled
                    .with_label_values(&[method.as_str(), code.as_str()])
                    .inc();
                result
            }
            .instrument(span),
        )
    }
}
