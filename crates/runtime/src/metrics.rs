//! Prometheus metrics: per-method request counts and latency, cache hit ratio and database
//! pool use, served as text on `GET /metrics` of the metrics HTTP port.

use std::sync::{Arc, LazyLock, Mutex};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// Every metric a Clientele process exports.
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// `grpc_server_handled_total{method, code}`.
    pub grpc_handled: IntCounterVec,
    /// `grpc_server_handling_seconds{method}`: time to response headers.
    pub grpc_latency: HistogramVec,
    /// `cache_requests_total{cache, result}` with result `hit`, `miss` or `error`.
    pub cache_requests: IntCounterVec,
    /// `db_pool_connections{service, state}` with state `idle` or `in_use`.
    pub db_pool: IntGaugeVec,
    refreshers: Mutex<Vec<Arc<dyn Fn() + Send + Sync>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[allow(clippy::expect_used)]
fn build() -> Metrics {
    let registry = Registry::new();
    let grpc_handled = IntCounterVec::new(
        Opts::new(
            "grpc_server_handled_total",
            "gRPC calls completed, by method and status code",
        ),
        &["method", "code"],
    )
    .expect("valid metric");
    let grpc_latency = HistogramVec::new(
        HistogramOpts::new(
            "grpc_server_handling_seconds",
            "gRPC call latency to response headers",
        )
        .buckets(vec![
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
        ]),
        &["method"],
    )
    .expect("valid metric");
    let cache_requests = IntCounterVec::new(
        Opts::new(
            "cache_requests_total",
            "Cache look-ups by cache and result (hit, miss, error)",
        ),
        &["cache", "result"],
    )
    .expect("valid metric");
    let db_pool = IntGaugeVec::new(
        Opts::new(
            "db_pool_connections",
            "Database pool connections by service and state",
        ),
        &["service", "state"],
    )
    .expect("valid metric");
    for c in [
        Box::new(grpc_handled.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(grpc_latency.clone()),
        Box::new(cache_requests.clone()),
        Box::new(db_pool.clone()),
    ] {
        registry.register(c).expect("metric registered once");
    }
    Metrics {
        registry,
        grpc_handled,
        grpc_latency,
        cache_requests,
        db_pool,
        refreshers: Mutex::new(Vec::new()),
    }
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(build);

impl Metrics {
    /// Registers a callback run before every scrape (used to sample pool gauges).
    pub fn on_scrape(&self, f: Arc<dyn Fn() + Send + Sync>) {
        if let Ok(mut r) = self.refreshers.lock() {
            r.push(f);
        }
    }

    /// Renders the Prometheus text exposition format.
    pub fn render(&self) -> String {
        if let Ok(r) = self.refreshers.lock() {
            for f in r.iter() {
                f();
            }
        }
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Serves `/metrics` until `shutdown` resolves.
pub async fn serve(
    addr: std::net::SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async { METRICS.render() }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics endpoint listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_metrics_include_recorded_calls() {
        METRICS
            .grpc_handled
            .with_label_values(&["/x.Y/Z", "0"])
            .inc();
        let text = METRICS.render();
        assert!(text.contains("grpc_server_handled_total{code=\"0\",method=\"/x.Y/Z\"} 1"));
    }
}
