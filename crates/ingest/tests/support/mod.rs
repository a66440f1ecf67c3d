//! Test fixtures: ProfileService and IngestService served together on an ephemeral loopback
//! port, over a fresh PostgreSQL schema or a fresh SQLite folder; clients and event builders.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use clientele_ingest::IngestServiceImpl;
use clientele_proto::v1 as pb;
use clientele_runtime::db::DatabaseTarget;
use clientele_runtime::settings::TokenConfig;
use clientele_runtime::{Settings, testing};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

/// A tower wrapper around ProfileService's gRPC server that counts the BatchResolve calls
/// reaching it (so tests see which batches skipped identity resolution, without mocks).
#[derive(Clone)]
pub struct CountBatchResolve<S> {
    inner: S,
    calls: Arc<AtomicUsize>,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for CountBatchResolve<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for CountBatchResolve<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() == "/clientele.v1.ProfileService/BatchResolve" {
            self.calls.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.call(req)
    }
}

/// Which database a fixture uses.
#[derive(Debug, Clone, Copy)]
pub enum Engine {
    Postgres,
    Sqlite,
}

pub type Intercepted = tonic::service::interceptor::InterceptedService<
    tonic::transport::Channel,
    clientele_runtime::client::ClientInterceptor,
>;
pub type IngestClient = pb::ingest_service_client::IngestServiceClient<Intercepted>;
pub type ProfileClient = pb::profile_service_client::ProfileServiceClient<Intercepted>;

pub struct Served {
    pub endpoint: String,
    pub ingest: IngestServiceImpl,
    /// BatchResolve calls ProfileService has received.
    pub batch_resolves: Arc<AtomicUsize>,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

pub fn target(engine: Engine, dir: &std::path::Path, service: &str) -> DatabaseTarget {
    match engine {
        Engine::Postgres => DatabaseTarget::Postgres {
            url: testing::postgres_url(),
            schema: testing::unique_schema(service),
        },
        Engine::Sqlite => DatabaseTarget::Sqlite {
            path: dir.join(format!("{service}.db")),
        },
    }
}

pub async fn serve(engine: Engine) -> Served {
    serve_with(engine, |_| {}).await
}

/// Serves both services; `tweak` adjusts the settings first. The background forwarder is not
/// started: tests deliver the aggregate deltas explicitly with `served.ingest.forwarder().drain()`.
pub async fn serve_with(engine: Engine, tweak: impl FnOnce(&mut Settings)) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let mut settings = Settings {
        tokens: vec![TokenConfig {
            client: "admin".into(),
            token: "admin-token".into(),
            scopes: vec!["*".into()],
        }],
        service_token: Some("admin-token".into()),
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    settings.identity.hash_secret = Some("ingest-test-secret-0123456789".into());
    settings.endpoints.profiles = Some(endpoint.clone());
    settings.database_max_connections = 5;
    tweak(&mut settings);
    let profiles =
        clientele_profiles::setup::build(&settings, &target(engine, dir.path(), "profiles"))
            .await
            .expect("profile service (is PostgreSQL running?)");
    let ingest = clientele_ingest::setup::build_without_background(
        &settings,
        &target(engine, dir.path(), "ingest"),
    )
    .await
    .expect("ingest service");
    let mut mount = clientele_runtime::server::Mount::default();
    let batch_resolves = Arc::new(AtomicUsize::new(0));
    // As `ProfileServiceImpl::mount`, with BatchResolve calls counted.
    mount.add(
        "clientele.v1.ProfileService",
        CountBatchResolve {
            inner: pb::profile_service_server::ProfileServiceServer::new(profiles)
                .max_decoding_message_size(16 * 1024 * 1024),
            calls: batch_resolves.clone(),
        },
        clientele_profiles::service::METHOD_SCOPES,
    );
    ingest.clone().mount(&mut mount);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        clientele_runtime::server::serve(&settings, mount, listener, async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Served {
        endpoint,
        ingest,
        batch_resolves,
        _stop: tx,
        _dir: dir,
    }
}

impl Served {
    fn channel(
        &self,
    ) -> (
        tonic::transport::Channel,
        clientele_runtime::client::ClientInterceptor,
    ) {
        (
            clientele_runtime::client::lazy_channel(&self.endpoint).unwrap(),
            clientele_runtime::client::ClientInterceptor::new(Some("admin-token")).unwrap(),
        )
    }
    pub fn client(&self) -> IngestClient {
        let (c, i) = self.channel();
        pb::ingest_service_client::IngestServiceClient::with_interceptor(c, i)
    }
    pub fn profiles(&self) -> ProfileClient {
        let (c, i) = self.channel();
        pb::profile_service_client::ProfileServiceClient::with_interceptor(c, i)
    }
    /// Sends `events` in one IngestBatch and asserts every one was accepted.
    pub async fn ingest_accepted(&self, events: Vec<pb::Event>) {
        let r = self
            .client()
            .ingest_batch(pb::IngestBatchRequest { events })
            .await
            .unwrap()
            .into_inner()
            .results;
        assert!(
            r.iter()
                .all(|r| r.status == pb::EventStatus::Accepted as i32),
            "{r:?}"
        );
    }
    /// Delivers every pending aggregate delta.
    pub async fn drain(&self) {
        self.ingest.forwarder().drain().await.unwrap();
    }
    /// The aggregates of the profile `customer` resolves to.
    pub async fn aggregates(&self, customer: &str) -> (String, pb::ProfileAggregates) {
        let mut p = self.profiles();
        let id = p
            .resolve(pb::ResolveRequest {
                identifiers: Some(ids(customer)),
            })
            .await
            .unwrap()
            .into_inner()
            .profile_id;
        let prof = p
            .get_profile(pb::GetProfileRequest {
                profile_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .profile
            .unwrap();
        (id, prof.aggregates.unwrap())
    }
}

pub fn now_ts() -> prost_types::Timestamp {
    clientele_runtime::time::timestamp(chrono::Utc::now().timestamp_micros())
}

/// `secs` before a fixed instant taken once per test process (so rebuilt events are equal).
pub fn ts_minus(secs: i64) -> prost_types::Timestamp {
    static BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(|| chrono::Utc::now().timestamp_micros());
    clientele_runtime::time::timestamp(base - secs * 1_000_000)
}

pub fn ids(customer: &str) -> pb::IdentifierSet {
    pb::IdentifierSet {
        identifiers: vec![pb::Identifier {
            r#type: pb::IdentifierType::CustomerId as i32,
            value: customer.into(),
            namespace: String::new(),
        }],
    }
}

pub fn money(amount: i64, currency: &str) -> Option<pb::Money> {
    Some(pb::Money {
        amount_minor: amount,
        currency: currency.into(),
    })
}

pub fn event(id: &str, customer: &str, payload: pb::event::Payload) -> pb::Event {
    pb::Event {
        event_id: id.into(),
        source: "web".into(),
        occurred_at: Some(ts_minus(60)),
        identifiers: Some(ids(customer)),
        context: None,
        payload: Some(payload),
    }
}

pub fn order(id: &str, customer: &str, order_id: &str, amount: i64) -> pb::Event {
    event(
        id,
        customer,
        pb::event::Payload::OrderCompleted(pb::OrderCompleted {
            order_id: order_id.into(),
            total: money(amount, "USD"),
            channel: pb::Channel::Web as i32,
            ..Default::default()
        }),
    )
}

pub fn refund(id: &str, customer: &str, order_id: &str, amount: i64, full: bool) -> pb::Event {
    event(
        id,
        customer,
        pb::event::Payload::OrderRefunded(pb::OrderRefunded {
            order_id: order_id.into(),
            refund: money(amount, "USD"),
            r#type: if full {
                pb::RefundType::Full as i32
            } else {
                pb::RefundType::Partial as i32
            },
            ..Default::default()
        }),
    )
}

pub fn page_view(id: &str, customer: &str, url: &str) -> pb::Event {
    event(
        id,
        customer,
        pb::event::Payload::PageViewed(pb::PageViewed {
            url: url.into(),
            ..Default::default()
        }),
    )
}

pub fn statuses(results: &[pb::EventResult]) -> Vec<pb::EventStatus> {
    results
        .iter()
        .map(|r| pb::EventStatus::try_from(r.status).unwrap())
        .collect()
}

pub fn spend(a: &pb::ProfileAggregates, currency: &str) -> (i64, i64) {
    a.spend
        .iter()
        .find(|s| s.currency == currency)
        .map_or((0, 0), |s| (s.gross_minor, s.refunded_minor))
}

/// Declares each listed `async fn(Engine)` as a test on PostgreSQL and one on SQLite (not every
/// test binary that includes this module uses it).
#[allow(unused_macros)]
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Engine::Postgres).await; })*
        }
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Engine::Sqlite).await; })*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use both;
