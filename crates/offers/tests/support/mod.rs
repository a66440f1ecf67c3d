//! Test fixtures: an offer store on a fresh PostgreSQL schema or SQLite file, and builders.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use clientele_offers::{OfferStore, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS, SqlOfferStore};
use clientele_proto::v1 as pb;
use clientele_runtime::db::{self, DatabaseTarget};
use clientele_runtime::testing;

/// Which database a fixture uses.
#[derive(Debug, Clone, Copy)]
pub enum Engine {
    Postgres,
    Sqlite,
}

pub struct StoreFixture {
    pub store: Arc<dyn OfferStore>,
    _dir: Option<tempfile::TempDir>,
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

/// A store with a small pool (the shared PostgreSQL has 100 connections for everyone).
pub async fn store(engine: Engine) -> StoreFixture {
    store_with_pool(engine, 2).await
}

/// A store with `pool` connections.
pub async fn store_with_pool(engine: Engine, pool: u32) -> StoreFixture {
    let dir = tempfile::tempdir().unwrap();
    let database = db::open(
        &target(engine, dir.path(), "offers"),
        pool,
        &POSTGRES_MIGRATIONS,
        &SQLITE_MIGRATIONS,
        "offers",
    )
    .await
    .expect("test database (is PostgreSQL running? see README)");
    StoreFixture {
        store: Arc::new(SqlOfferStore::new(database)),
        _dir: Some(dir),
    }
}

/// Serialises the contention tests within this process so their pools stay within the
/// server's connection limit; each still runs 50 writers over 10 connections in parallel.
pub static CONTENTION: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn eur(amount_minor: i64) -> pb::Money {
    pb::Money {
        amount_minor,
        currency: "EUR".into(),
    }
}

/// An ACTIVE, untargeted, transactional perk offer valid from 2020 with 30-day codes.
pub fn offer(id: &str) -> pb::Offer {
    pb::Offer {
        offer_id: id.into(),
        display_name: format!("Offer {id}"),
        benefit: Some(pb::offer::Benefit::Perk(pb::Perk {
            title: "A perk".into(),
            fulfilment_instructions: String::new(),
        })),
        starts_at: Some(prost_types::Timestamp {
            seconds: 1_577_836_800,
            nanos: 0,
        }),
        code_validity: Some(prost_types::Duration {
            seconds: 30 * 86_400,
            nanos: 0,
        }),
        expected_value: Some(eur(100)),
        transactional: true,
        ..Default::default()
    }
}

pub fn with_budget(mut o: pb::Offer, max_issued: i64) -> pb::Offer {
    o.budget = Some(pb::Budget {
        limit: Some(pb::budget::Limit::MaxIssued(max_issued)),
    });
    o
}

pub fn profile_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub type Intercepted = tonic::service::interceptor::InterceptedService<
    tonic::transport::Channel,
    clientele_runtime::client::ClientInterceptor,
>;
pub type OfferClient = pb::offer_service_client::OfferServiceClient<Intercepted>;
pub type IngestClient = pb::ingest_service_client::IngestServiceClient<Intercepted>;
pub type ProfileClient = pb::profile_service_client::ProfileServiceClient<Intercepted>;
pub type SegClient = pb::segmentation_service_client::SegmentationServiceClient<Intercepted>;

/// The real Profile, Ingest, Segmentation, Experiment and Offer services served together on
/// one ephemeral loopback port; feed consumers are driven by the test (`sync`).
pub struct Served {
    pub endpoint: String,
    pub ingest: clientele_ingest::IngestServiceImpl,
    pub seg_consumer: clientele_segmentation::consumer::Consumer,
    pub offers: clientele_offers::OfferServiceImpl,
    pub consumers: clientele_offers::consumers::Consumers,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

pub async fn serve(engine: Engine) -> Served {
    serve_with(engine, |_| {}).await
}

/// Settings of a test stack whose every service is at `endpoint` (one process), with an
/// admin token of every scope and its data under `dir`.
pub fn stack_settings(endpoint: &str, dir: &std::path::Path) -> clientele_runtime::Settings {
    use clientele_runtime::Settings;
    use clientele_runtime::settings::TokenConfig;
    let mut settings = Settings {
        tokens: vec![TokenConfig {
            client: "admin".into(),
            token: "admin-token".into(),
            scopes: vec!["*".into()],
        }],
        service_token: Some("admin-token".into()),
        data_dir: dir.to_path_buf(),
        ..Default::default()
    };
    settings.identity.hash_secret = Some("offers-test-secret-0123456789".into());
    for e in [
        &mut settings.endpoints.profiles,
        &mut settings.endpoints.ingest,
        &mut settings.endpoints.segmentation,
        &mut settings.endpoints.experiments,
        &mut settings.endpoints.offers,
    ] {
        *e = Some(endpoint.to_string());
    }
    settings.database_max_connections = 3;
    settings
}

/// Serves the stack; `tweak` adjusts the settings first.
pub async fn serve_with(
    engine: Engine,
    tweak: impl FnOnce(&mut clientele_runtime::Settings),
) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let mut settings = stack_settings(&endpoint, dir.path());
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
    let seg = clientele_segmentation::setup::build_without_background(
        &settings,
        &target(engine, dir.path(), "segmentation"),
    )
    .await
    .expect("segmentation service");
    // As clienteled builds it: both services derive the holdout from `settings.holdout`.
    let experiments = clientele_experiments::setup::build_with_holdout(
        &settings,
        &target(engine, dir.path(), "experiments"),
        clientele_offers::setup::holdout(&settings),
    )
    .await
    .expect("experiment service");
    let (offers, consumers) = clientele_offers::setup::build_without_background(
        &settings,
        &target(engine, dir.path(), "offers"),
    )
    .await
    .expect("offer service");
    let mut mount = clientele_runtime::server::Mount::default();
    profiles.mount(&mut mount);
    ingest.clone().mount(&mut mount);
    seg.service.mount(&mut mount);
    experiments.mount(&mut mount);
    offers.clone().mount(&mut mount);
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
        seg_consumer: seg.consumer,
        offers,
        consumers,
        _stop: tx,
        _dir: dir,
    }
}

impl Served {
    fn channel(&self) -> Intercepted {
        tonic::service::interceptor::InterceptedService::new(
            clientele_runtime::client::lazy_channel(&self.endpoint).unwrap(),
            clientele_runtime::client::ClientInterceptor::new(Some("admin-token")).unwrap(),
        )
    }
    pub fn client(&self) -> OfferClient {
        pb::offer_service_client::OfferServiceClient::new(self.channel())
    }
    pub fn ingest_client(&self) -> IngestClient {
        pb::ingest_service_client::IngestServiceClient::new(self.channel())
    }
    pub fn profiles(&self) -> ProfileClient {
        pb::profile_service_client::ProfileServiceClient::new(self.channel())
    }
    pub fn experiments(
        &self,
    ) -> pb::experiment_service_client::ExperimentServiceClient<Intercepted> {
        pb::experiment_service_client::ExperimentServiceClient::new(self.channel())
    }
    pub fn seg(&self) -> SegClient {
        pb::segmentation_service_client::SegmentationServiceClient::new(self.channel())
    }
    /// Delivers aggregates, folds the feeds into segmentation and runs the offer consumers.
    pub async fn sync(&self) -> (usize, usize) {
        self.ingest.forwarder().drain().await.unwrap();
        self.seg_consumer.catch_up().await.unwrap();
        self.consumers.catch_up().await.unwrap()
    }
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
    pub async fn grant(&self, profile_id: &str, purpose: pb::ConsentPurpose) {
        self.profiles()
            .set_consent(pb::SetConsentRequest {
                profile_id: profile_id.into(),
                consent: Some(pb::Consent {
                    purpose: purpose as i32,
                    status: pb::ConsentStatus::Granted as i32,
                    decided_at: None,
                    source: "test".into(),
                }),
            })
            .await
            .unwrap();
    }
    /// Ingests events, asserting every one is accepted.
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
                assert_eq!(res.status, pb::EventStatus::Accepted as i32, "{res:?}");
            }
        }
    }
    /// Starts a segmentation run and waits for it to succeed.
    pub async fn recompute(&self, key: &str) {
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
                return;
            }
            assert_ne!(
                r.state,
                pb::RecomputeState::Failed as i32,
                "{}",
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

fn base() -> i64 {
    static BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| chrono::Utc::now().timestamp_micros())
}

pub fn days_ago(days: f64) -> prost_types::Timestamp {
    #[allow(clippy::cast_possible_truncation)]
    let micros = (days * 86_400e6) as i64;
    clientele_runtime::time::timestamp(base() - micros - 60_000_000)
}

pub fn usd(amount_minor: i64) -> pb::Money {
    pb::Money {
        amount_minor,
        currency: "USD".into(),
    }
}

pub fn event(customer: &str, id: &str, days: f64, payload: pb::event::Payload) -> pb::Event {
    pb::Event {
        event_id: id.into(),
        source: "shop".into(),
        occurred_at: Some(days_ago(days)),
        identifiers: Some(ids(customer)),
        context: None,
        payload: Some(payload),
    }
}

pub fn order(customer: &str, n: usize, days: f64, amount: i64) -> pb::Event {
    event(
        customer,
        &format!("{customer}-o{n}"),
        days,
        pb::event::Payload::OrderCompleted(pb::OrderCompleted {
            order_id: format!("{customer}-{n}"),
            total: Some(usd(amount)),
            channel: pb::Channel::Web as i32,
            line_items: vec![pb::LineItem {
                sku: "sku-1".into(),
                category: "apparel/misc".into(),
                quantity: 1,
                unit_price: Some(usd(amount)),
                name: String::new(),
            }],
            ..Default::default()
        }),
    )
}

pub fn refund(customer: &str, id: &str, order_id: &str, amount: i64) -> pb::Event {
    event(
        customer,
        id,
        0.0,
        pb::event::Payload::OrderRefunded(pb::OrderRefunded {
            order_id: order_id.into(),
            refund: Some(usd(amount)),
            r#type: pb::RefundType::Partial as i32,
            ..Default::default()
        }),
    )
}
