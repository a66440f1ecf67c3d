//! One trace follows a call across services: the client side writes W3C `traceparent` from
//! the current span, and the server's request layer makes its span a child of it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clientele_runtime::client::{ClientInterceptor, lazy_channel};
use clientele_runtime::server::{Mount, serve};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test(flavor = "current_thread")]
async fn the_server_span_joins_the_callers_trace() {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let settings = clientele_runtime::Settings::default();
    let server = tokio::spawn(async move {
        serve(&settings, Mount::default(), listener, async move {
            let _ = stopped.await;
        })
        .await
    });

    let root = tracing::info_span!("caller");
    let caller = root.context().span().span_context().clone();
    async {
        let channel = lazy_channel(&endpoint).unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::with_interceptor(
            channel,
            ClientInterceptor::new(None).unwrap(),
        );
        health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
    }
    .instrument(root)
    .await;
    let _ = stop.send(());
    server.await.unwrap().unwrap();
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let server_span = spans
        .iter()
        .find(|s| s.name == "/grpc.health.v1.Health/Check")
        .expect("a server span per call");
    assert_eq!(server_span.span_context.trace_id(), caller.trace_id());
    assert_eq!(server_span.parent_span_id, caller.span_id());
    assert_eq!(
        server_span.span_kind,
        opentelemetry::trace::SpanKind::Server
    );
}
