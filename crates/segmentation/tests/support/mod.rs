//! Test fixtures: ProfileService, IngestService and SegmentationService served together on an
//! ephemeral loopback port over a fresh PostgreSQL schema or a fresh SQLite folder; the
//! ingest outbox and the segmentation consumer are driven explicitly.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use clientele_proto::v1 as pb;
use clientele_runtime::db::DatabaseTarget;
use clientele_runtime::settings::TokenConfig;
use clientele_runtime::{Settings, testing};
use clientele_segmentation::consumer::Consumer;

#[derive(Debug, Clone, Copy)]
pub enum Engine {
    Postgres,
    Sqlite,
}

pub type Intercepted = tonic::service::interceptor::InterceptedService<
    tonic::transport::Channel,
    clientele_runtime::client::ClientInterceptor,
>;
pub type SegClient = pb::segmentation_service_client::SegmentationServiceClient<Intercepted>;
pub type IngestClient = pb::ingest_service_client::IngestServiceClient<Intercepted>;
pub type ProfileClient = pb::profile_service_client::ProfileServiceClient<Intercepted>;

pub struct Served {
    pub endpoint: String,
    pub ingest: clientele_ingest::IngestServiceImpl,
    pub consumer: Consumer,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

fn target(engine: Engine, dir: &std::path::Path, service: &str) -> DatabaseTarget {
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
    settings.identity.hash_secret = Some("segmentation-test-secret-0123456789".into());
    settings.endpoints.profiles = Some(endpoint.clone());
    settings.endpoints.ingest = Some(endpoint.clone());
    settings.database_max_connections = 5;
    settings
        .segmentation
        .currency_rates
        .insert("EUR".into(), 1.1);
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
    let built = clientele_segmentation::setup::build_without_background(
        &settings,
        &target(engine, dir.path(), "segmentation"),
    )
    .await
    .expect("segmentation service");
    let mut mount = clientele_runtime::server::Mount::default();
    profiles.mount(&mut mount);
    ingest.clone().mount(&mut mount);
    built.service.mount(&mut mount);
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
        consumer: built.consumer,
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
    pub fn seg(&self) -> SegClient {
        let (c, i) = self.channel();
        pb::segmentation_service_client::SegmentationServiceClient::with_interceptor(c, i)
    }
    pub fn ingest_client(&self) -> IngestClient {
        let (c, i) = self.channel();
        pb::ingest_service_client::IngestServiceClient::with_interceptor(c, i)
    }
    pub fn profiles(&self) -> ProfileClient {
        let (c, i) = self.channel();
        pb::profile_service_client::ProfileServiceClient::with_interceptor(c, i)
    }
    /// Delivers pending aggregates to ProfileService, then folds both feeds until caught up.
    pub async fn sync(&self) -> (usize, usize) {
        self.ingest.forwarder().drain().await.unwrap();
        self.consumer.catch_up().await.unwrap()
    }
    /// The profile id of `customer`.
    pub async fn profile_id(&self, customer: &str) -> String {
        self.profiles()
            .resolve(pb::ResolveRequest {
                identifiers: Some(ids(customer)),
            })
            .await
            .unwrap()
            .into_inner()
            .profile_id
    }
    /// Ingests events in batches of 500, asserting every one is accepted.
    pub async fn ingest(&self, events: Vec<pb::Event>) {
        let mut client = self.ingest_client();
        for chunk in events.chunks(500) {
            let r = client
                .ingest_batch(pb::IngestBatchRequest {
                    events: chunk.to_vec(),
                })
                .await
                .unwrap()
                .into_inner();
            for res in r.results {
                assert_eq!(
                    res.status,
                    pb::EventStatus::Accepted as i32,
                    "event not accepted: {res:?}"
                );
            }
        }
    }
    /// Starts a run and waits until it finishes; panics unless it succeeded.
    pub async fn recompute(&self, key: &str) -> pb::Recompute {
        let mut seg = self.seg();
        let run = seg
            .start_recompute(pb::StartRecomputeRequest {
                idempotency_key: key.into(),
                requested_by: "test".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .run
            .unwrap();
        for _ in 0..600 {
            let r = seg
                .get_recompute(pb::GetRecomputeRequest {
                    run_id: run.run_id.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .run
                .unwrap();
            if r.state == pb::RecomputeState::Succeeded as i32 {
                return r;
            }
            assert_ne!(
                r.state,
                pb::RecomputeState::Failed as i32,
                "run failed: {}",
                r.error_message
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("run did not finish");
    }
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

/// A fixed instant per test process so rebuilt events are equal.
fn base() -> i64 {
    static BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| chrono::Utc::now().timestamp_micros())
}

pub fn days_ago(days: f64) -> prost_types::Timestamp {
    #[allow(clippy::cast_possible_truncation)]
    let micros = (days * 86_400e6) as i64;
    clientele_runtime::time::timestamp(base() - micros - 60_000_000)
}

pub fn order(customer: &str, n: usize, days: f64, amount: i64, category: &str) -> pb::Event {
    pb::Event {
        event_id: format!("{customer}-o{n}"),
        source: "shop".into(),
        occurred_at: Some(days_ago(days)),
        identifiers: Some(ids(customer)),
        context: None,
        payload: Some(pb::event::Payload::OrderCompleted(pb::OrderCompleted {
            order_id: format!("{customer}-{n}"),
            total: Some(pb::Money {
                amount_minor: amount,
                currency: "USD".into(),
            }),
            channel: pb::Channel::Web as i32,
            line_items: vec![pb::LineItem {
                sku: "sku-1".into(),
                category: format!("{category}/misc"),
                quantity: 1,
                unit_price: Some(pb::Money {
                    amount_minor: amount,
                    currency: "USD".into(),
                }),
                name: String::new(),
            }],
            ..Default::default()
        })),
    }
}

pub fn page_view(customer: &str, n: usize, days: f64) -> pb::Event {
    pb::Event {
        event_id: format!("{customer}-v{n}"),
        source: "web".into(),
        occurred_at: Some(days_ago(days)),
        identifiers: Some(ids(customer)),
        context: None,
        payload: Some(pb::event::Payload::PageViewed(pb::PageViewed {
            url: "https://shop.example/".into(),
            ..Default::default()
        })),
    }
}
