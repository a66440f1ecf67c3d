//! Trace continuity across processes: ingest and profiles run as separate processes exporting
//! spans over OTLP/gRPC to a small collector inside the test. One IngestBatch call, sent with
//! a W3C `traceparent`, must come back as one trace: spans of both services under the
//! caller's trace id, the profile service's server span a descendant of an ingest span.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clientele::generate::{self, GeneratorConfig};
use clientele_e2e::{Deployment, TestDatabase, free_port};
use clientele_proto::v1 as pb;
use clientele_proto::v1::ingest_service_client::IngestServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
}

/// The collector: stores every span it is sent.
#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref()?.value.clone())
                .map(|v| match v {
                    Value::StringValue(s) => s,
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Span {
                        service: service.clone(),
                        name: s.name,
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent_span_id: s.parent_span_id,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn one_ingest_call_is_one_trace_across_ingest_and_profiles() {
    let collector = Collector::default();
    let otlp_port = free_port();
    let server = collector.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(server))
            .serve(([127, 0, 0, 1], otlp_port).into())
            .await
    });
    let otlp = format!("http://127.0.0.1:{otlp_port}");
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];

    let db = TestDatabase::create().await;
    let deployment = Deployment::new(&db.url);
    let profiles = deployment.start("profiles", &otel).await;
    let mut ingest_env = otel.to_vec();
    ingest_env.push(("CLIENTELE_ENDPOINTS__PROFILES", profiles.endpoint.as_str()));
    let ingest = deployment.start("ingest", &ingest_env).await;

    let events: Vec<pb::Event> = generate::customer_events(&GeneratorConfig::new(7, 1, 60), 0)
        .into_iter()
        .take(5)
        .collect();
    assert!(!events.is_empty());
    // The caller's own trace: every span of the call must carry this id.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(pb::IngestBatchRequest {
        events: events.clone(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    let reply = IngestServiceClient::new(ingest.channel())
        .ingest_batch(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.results.len(), events.len());

    // Spans are exported in batches every 100 ms: wait until both services have reported.
    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans: Vec<Span> = collector
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| hex(&s.trace_id) == trace_id)
            .cloned()
            .collect();
        let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
        if services.contains("clientele-ingest") && services.contains("clientele-profiles") {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "no trace covering both services after 20 s; spans of the trace: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Walk up from the profile service's spans: each must reach an ingest span through
    // parent links inside this trace, and the ingest root must hang off the caller's span.
    let by_id: HashMap<Vec<u8>, &Span> = spans.iter().map(|s| (s.span_id.clone(), s)).collect();
    let profile_spans: Vec<&Span> = spans
        .iter()
        .filter(|s| s.service == "clientele-profiles")
        .collect();
    assert!(
        profile_spans
            .iter()
            .any(|s| s.name.contains("BatchResolve")),
        "profile spans: {profile_spans:#?}"
    );
    for span in &profile_spans {
        let mut at = *span;
        let mut reached_ingest = false;
        for _ in 0..64 {
            match by_id.get(&at.parent_span_id) {
                Some(parent) => {
                    if parent.service == "clientele-ingest" {
                        reached_ingest = true;
                        break;
                    }
                    at = parent;
                }
                None => break,
            }
        }
        assert!(
            reached_ingest,
            "profile span `{}` is not under an ingest span: {spans:#?}",
            span.name
        );
    }
    let caller_span = [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7];
    assert!(
        spans
            .iter()
            .any(|s| s.service == "clientele-ingest" && s.parent_span_id == caller_span),
        "no ingest span is a child of the caller's span: {spans:#?}"
    );
}
