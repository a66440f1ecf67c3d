//! The feed consumer end to end with the real ProfileService and IngestService in process on
//! PostgreSQL: purchases after a unit's first exposure convert (once, however often the feed
//! delivers them), purchases before do not, refunds reduce revenue, merged profiles are one
//! unit, and erasure anonymises without changing results.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use clientele_experiments::ExperimentStore;
use clientele_experiments::consumer::{Consumer, INGEST_FEED, PROFILES_FEED};
use clientele_experiments::events;
use clientele_experiments::model::ProfileChange;
use clientele_proto::v1 as pb;
use clientele_runtime::db::DatabaseTarget;
use clientele_runtime::testing;
use support::{binary_metric, experiment, revenue_metric, usd};

type Intercepted = tonic::service::interceptor::InterceptedService<
    tonic::transport::Channel,
    clientele_runtime::client::ClientInterceptor,
>;

/// Profile, Ingest and Experiment services on one ephemeral port; the experiment consumer is
/// driven by the test.
struct Stack {
    endpoint: String,
    store: std::sync::Arc<dyn ExperimentStore>,
    consumer: Consumer,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

fn pg(service: &str) -> DatabaseTarget {
    DatabaseTarget::Postgres {
        url: testing::postgres_url(),
        schema: testing::unique_schema(service),
    }
}

async fn stack() -> Stack {
    use clientele_runtime::Settings;
    use clientele_runtime::settings::TokenConfig;
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
        database_max_connections: 3,
        ..Default::default()
    };
    settings.identity.hash_secret = Some("experiments-test-secret-0123456789".into());
    settings.endpoints.profiles = Some(endpoint.clone());
    settings.endpoints.ingest = Some(endpoint.clone());
    let profiles = clientele_profiles::setup::build(&settings, &pg("profiles"))
        .await
        .expect("profile service (is PostgreSQL running?)");
    let ingest = clientele_ingest::setup::build_without_background(&settings, &pg("ingest"))
        .await
        .expect("ingest service");
    let (experiments, consumer) = clientele_experiments::setup::build_without_background(
        &settings,
        &pg("experiments"),
        clientele_experiments::setup::holdout(&settings),
    )
    .await
    .expect("experiment service");
    let store = experiments.store();
    let mut mount = clientele_runtime::server::Mount::default();
    profiles.mount(&mut mount);
    ingest.mount(&mut mount);
    experiments.mount(&mut mount);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        clientele_runtime::server::serve(&settings, mount, listener, async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Stack {
        endpoint,
        store,
        consumer,
        _stop: tx,
        _dir: dir,
    }
}

fn ids(customer: &str) -> pb::IdentifierSet {
    pb::IdentifierSet {
        identifiers: vec![pb::Identifier {
            r#type: pb::IdentifierType::CustomerId as i32,
            value: customer.into(),
            namespace: String::new(),
        }],
    }
}

fn ago(secs: i64) -> prost_types::Timestamp {
    clientele_runtime::time::timestamp(chrono::Utc::now().timestamp_micros() - secs * 1_000_000)
}

fn event(
    identifiers: pb::IdentifierSet,
    id: &str,
    at: prost_types::Timestamp,
    payload: pb::event::Payload,
) -> pb::Event {
    pb::Event {
        event_id: id.into(),
        source: "shop".into(),
        occurred_at: Some(at),
        identifiers: Some(identifiers),
        context: None,
        payload: Some(payload),
    }
}

fn order(customer: &str, order_id: &str, at: prost_types::Timestamp, amount: i64) -> pb::Event {
    event(
        ids(customer),
        &format!("ev-{order_id}"),
        at,
        pb::event::Payload::OrderCompleted(pb::OrderCompleted {
            order_id: order_id.into(),
            total: usd(amount),
            channel: pb::Channel::Web as i32,
            ..Default::default()
        }),
    )
}

fn refund(customer: &str, id: &str, order_id: &str, amount: i64) -> pb::Event {
    event(
        ids(customer),
        id,
        ago(1),
        pb::event::Payload::OrderRefunded(pb::OrderRefunded {
            order_id: order_id.into(),
            refund: usd(amount),
            r#type: pb::RefundType::Partial as i32,
            ..Default::default()
        }),
    )
}

/// An experiment everyone enters, with a binary purchase metric and a revenue guardrail,
/// both derived from ORDER_COMPLETED.
fn purchase_experiment(key: &str) -> pb::Experiment {
    let source = || {
        Some(pb::metric::Source::Event(pb::EventMetricSource {
            kind: pb::EventKind::OrderCompleted as i32,
            custom_event_name: String::new(),
        }))
    };
    pb::Experiment {
        primary_metric: Some(pb::Metric {
            source: source(),
            ..binary_metric(&format!("{key}-purchased"))
        }),
        guardrail_metrics: vec![pb::Metric {
            source: source(),
            ..revenue_metric(&format!("{key}-revenue"), "USD")
        }],
        ..experiment(key, &[0.5, 0.5])
    }
}

impl Stack {
    fn channel(&self) -> Intercepted {
        tonic::service::interceptor::InterceptedService::new(
            clientele_runtime::client::lazy_channel(&self.endpoint).unwrap(),
            clientele_runtime::client::ClientInterceptor::new(Some("admin-token")).unwrap(),
        )
    }
    fn experiments(&self) -> pb::experiment_service_client::ExperimentServiceClient<Intercepted> {
        pb::experiment_service_client::ExperimentServiceClient::new(self.channel())
    }
    fn profiles(&self) -> pb::profile_service_client::ProfileServiceClient<Intercepted> {
        pb::profile_service_client::ProfileServiceClient::new(self.channel())
    }
    fn ingest_client(&self) -> pb::ingest_service_client::IngestServiceClient<Intercepted> {
        pb::ingest_service_client::IngestServiceClient::new(self.channel())
    }

    async fn resolve(&self, identifiers: pb::IdentifierSet) -> String {
        self.profiles()
            .resolve(pb::ResolveRequest {
                identifiers: Some(identifiers),
            })
            .await
            .unwrap()
            .into_inner()
            .profile_id
    }

    async fn ingest(&self, events: Vec<pb::Event>) {
        let r = self
            .ingest_client()
            .ingest_batch(pb::IngestBatchRequest { events })
            .await
            .unwrap()
            .into_inner();
        for res in r.results {
            assert_eq!(res.status, pb::EventStatus::Accepted as i32, "{res:?}");
        }
    }

    async fn start(&self, e: pb::Experiment) {
        let key = e.key.clone();
        let mut c = self.experiments();
        c.create_experiment(pb::CreateExperimentRequest {
            experiment: Some(e),
        })
        .await
        .unwrap();
        c.start_experiment(pb::StartExperimentRequest { key })
            .await
            .unwrap();
    }

    /// Assigns the profile and logs its first exposure now; returns the variant.
    async fn expose(&self, key: &str, profile_id: &str) -> i32 {
        let mut c = self.experiments();
        let a = c
            .assign(pb::AssignRequest {
                experiment_key: key.into(),
                unit_id: profile_id.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .assignment
            .unwrap();
        assert!(a.in_experiment, "{a:?}");
        let logged = c
            .log_exposure(pb::LogExposureRequest {
                experiment_key: key.into(),
                unit_id: profile_id.into(),
                variant_index: a.variant_index,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(logged.first_exposure);
        a.variant_index
    }

    async fn results(&self, key: &str) -> pb::GetResultsResponse {
        self.experiments()
            .get_results(pb::GetResultsRequest {
                experiment_key: key.into(),
                metric_keys: vec![],
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Every record of the ingest log from the start, as the feed would redeliver them.
    async fn whole_feed(&self) -> Vec<events::EventFact> {
        let mut stream = self
            .ingest_client()
            .watch_events(pb::WatchEventsRequest {
                start: Some(pb::watch_events_request::Start::From(
                    pb::WatchStart::Earliest as i32,
                )),
                kinds: vec![],
                consumer: "test".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let wanted = events::wanted_keys([]);
        let mut facts = Vec::new();
        loop {
            let next =
                tokio::time::timeout(std::time::Duration::from_millis(500), stream.message()).await;
            let Ok(Ok(Some(msg))) = next else { break };
            match msg.kind {
                Some(pb::watch_events_response::Kind::Record(r)) => {
                    facts.extend(r.event.as_ref().and_then(|e| events::fact_of(e, &wanted)));
                }
                _ => break,
            }
        }
        facts
    }
}

/// (units, converted units, mean) of variant `v` of metric `m`.
fn figures(r: &pb::GetResultsResponse, m: usize, v: i32) -> (i64, i64, f64) {
    let x = r.metrics[m]
        .variants
        .iter()
        .find(|x| x.variant_index == v)
        .unwrap();
    (x.units, x.converted_units, x.mean)
}

#[tokio::test]
async fn a_purchase_after_exposure_converts_once_even_when_the_feed_redelivers() {
    let s = stack().await;
    s.start(purchase_experiment("checkout")).await;
    let ann = s.resolve(ids("ann")).await;
    let v = s.expose("checkout", &ann).await;
    s.ingest(vec![order(
        "ann",
        "ann-1",
        clientele_runtime::time::timestamp(chrono::Utc::now().timestamp_micros()),
        4_000,
    )])
    .await;
    s.consumer.catch_up().await.unwrap();
    let r = s.results("checkout").await;
    assert_eq!(figures(&r, 0, v), (1, 1, 1.0));
    assert_eq!(figures(&r, 1, v), (1, 1, 4_000.0));

    // The feed is at-least-once: the whole log delivered again changes nothing.
    let cursor = s.store.feed_cursor(INGEST_FEED).await.unwrap().unwrap();
    let again = s.whole_feed().await;
    assert!(!again.is_empty());
    let written = s
        .store
        .apply_events(INGEST_FEED, Some(&cursor), &cursor, &again)
        .await
        .unwrap();
    assert_eq!(written, 0);
    s.consumer.catch_up().await.unwrap();
    assert_eq!(s.results("checkout").await.metrics, r.metrics);
}

#[tokio::test]
async fn a_purchase_before_exposure_does_not_count() {
    let s = stack().await;
    s.start(purchase_experiment("early")).await;
    let bea = s.resolve(ids("bea")).await;
    // Bought an hour ago, exposed now.
    s.ingest(vec![order("bea", "bea-1", ago(3_600), 2_500)])
        .await;
    s.consumer.catch_up().await.unwrap();
    let v = s.expose("early", &bea).await;
    s.consumer.catch_up().await.unwrap();
    let r = s.results("early").await;
    assert_eq!(figures(&r, 0, v), (1, 0, 0.0));
    assert_eq!(figures(&r, 1, v), (1, 0, 0.0));
}

#[tokio::test]
async fn a_refund_reduces_the_revenue_of_its_order_but_not_the_conversion() {
    let s = stack().await;
    s.start(purchase_experiment("refunds")).await;
    let cal = s.resolve(ids("cal")).await;
    let v = s.expose("refunds", &cal).await;
    // The refund of the pre-exposure order must not reduce in-experiment revenue.
    s.ingest(vec![
        order("cal", "cal-old", ago(86_400), 9_000),
        order("cal", "cal-1", ago(0), 5_000),
    ])
    .await;
    s.ingest(vec![
        refund("cal", "cal-r1", "cal-1", 1_500),
        refund("cal", "cal-r0", "cal-old", 9_000),
    ])
    .await;
    s.consumer.catch_up().await.unwrap();
    let r = s.results("refunds").await;
    assert_eq!(figures(&r, 0, v), (1, 1, 1.0));
    assert_eq!(figures(&r, 1, v), (1, 1, 3_500.0));
}

#[tokio::test]
async fn purchases_of_a_merged_profile_count_for_the_unit_exposed_under_its_old_id() {
    let s = stack().await;
    s.start(purchase_experiment("merges")).await;
    let email = |e: &str| pb::IdentifierSet {
        identifiers: vec![pb::Identifier {
            r#type: pb::IdentifierType::Email as i32,
            value: e.into(),
            namespace: String::new(),
        }],
    };
    // Dan is known by customer id (older profile) and, separately, by email.
    let by_id = s.resolve(ids("dan")).await;
    let by_email = s.resolve(email("dan@example.com")).await;
    assert_ne!(by_id, by_email);
    let v = s.expose("merges", &by_email).await;
    // Both ids in one set: the email's profile merges into the older one.
    let mut both = ids("dan");
    both.identifiers
        .extend(email("dan@example.com").identifiers);
    let survivor = s.resolve(both).await;
    assert_eq!(survivor, by_id);
    s.ingest(vec![order("dan", "dan-1", ago(0), 7_000)]).await;
    s.consumer.catch_up().await.unwrap();
    let r = s.results("merges").await;
    assert_eq!(r.total_units, 1);
    assert_eq!(figures(&r, 1, v), (1, 1, 7_000.0));
}

#[tokio::test]
async fn erasure_anonymises_a_units_data_without_changing_results_and_is_idempotent() {
    let s = stack().await;
    s.start(purchase_experiment("erasure")).await;
    let eve = s.resolve(ids("eve")).await;
    let fay = s.resolve(ids("fay")).await;
    s.expose("erasure", &eve).await;
    s.expose("erasure", &fay).await;
    s.ingest(vec![
        order("eve", "eve-1", ago(0), 1_200),
        order("fay", "fay-1", ago(0), 800),
    ])
    .await;
    s.consumer.catch_up().await.unwrap();
    let before = s.results("erasure").await;
    assert_eq!(before.total_units, 2);

    s.profiles()
        .erase_profile(pb::EraseProfileRequest {
            profile_id: eve.clone(),
            reason: "gdpr-art17 test".into(),
        })
        .await
        .unwrap();
    s.consumer.catch_up().await.unwrap();
    let pair = ("erasure".to_owned(), eve.clone());
    assert!(
        s.store
            .exposures(std::slice::from_ref(&pair))
            .await
            .unwrap()
            .is_empty(),
        "the erased profile id must be gone"
    );
    let fay_pair = ("erasure".to_owned(), fay.clone());
    assert_eq!(s.store.exposures(&[fay_pair]).await.unwrap().len(), 1);
    let after = s.results("erasure").await;
    assert_eq!(after.metrics, before.metrics);
    assert_eq!(after.total_units, 2);

    // Replaying the erasure (redelivered change) finds nothing left and changes nothing.
    let cursor = s.store.feed_cursor(PROFILES_FEED).await.unwrap().unwrap();
    s.store
        .apply_profile_changes(
            PROFILES_FEED,
            Some(&cursor),
            &cursor,
            &[ProfileChange::Erased(eve.clone())],
            0,
        )
        .await
        .unwrap();
    assert_eq!(s.results("erasure").await.metrics, before.metrics);
}
