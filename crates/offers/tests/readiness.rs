//! Readiness: the OfferService reports NOT_SERVING on the standard health service until its
//! feed consumers caught up with the feeds (or `offers.ready_timeout_secs` passed), while the
//! server serves from the start, so a single process serving the feeds too cannot deadlock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::{Engine, target};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const OFFERS: &str = "clientele.v1.OfferService";

async fn status(endpoint: &str, service: &str) -> ServingStatus {
    let channel = clientele_runtime::client::lazy_channel(endpoint).unwrap();
    let r = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

/// Polls the health of `service` until SERVING; returns how long it took.
async fn until_serving(endpoint: &str, service: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    while status(endpoint, service).await != ServingStatus::Serving {
        assert!(
            start.elapsed() < limit,
            "{service} not SERVING after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// As `clienteled --target all`: every service in one server, the offer consumers (started by
/// `setup::build`) reading the feeds from that same server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_serving_its_own_feeds_becomes_ready_after_catching_up() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let mut settings = support::stack_settings(&endpoint, dir.path());
    settings.offers.ready_timeout_secs = 120; // only the catch-up may make it ready here
    let e = Engine::Postgres;
    let profiles = clientele_profiles::setup::build(&settings, &target(e, dir.path(), "profiles"))
        .await
        .expect("profile service (is PostgreSQL running?)");
    let ingest = clientele_ingest::setup::build_without_background(
        &settings,
        &target(e, dir.path(), "ingest"),
    )
    .await
    .unwrap();
    let seg = clientele_segmentation::setup::build_without_background(
        &settings,
        &target(e, dir.path(), "segmentation"),
    )
    .await
    .unwrap();
    let experiments = clientele_experiments::setup::build_with_holdout(
        &settings,
        &target(e, dir.path(), "experiments"),
        clientele_offers::setup::holdout(&settings),
    )
    .await
    .unwrap();
    let offers = clientele_offers::setup::build(&settings, &target(e, dir.path(), "offers"))
        .await
        .unwrap();
    let ready = offers.readiness();
    assert!(!*ready.borrow(), "not ready before the consumers caught up");
    let mut mount = clientele_runtime::server::Mount::default();
    profiles.mount(&mut mount);
    ingest.mount(&mut mount);
    seg.service.mount(&mut mount);
    experiments.mount(&mut mount);
    offers.clone().mount(&mut mount);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        clientele_runtime::server::serve(&settings, mount, listener, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    // The server answers at once: the process itself is live, the other services are
    // SERVING; only the OfferService waits for its consumers, which read this same server.
    assert_eq!(status(&endpoint, "").await, ServingStatus::Serving);
    assert_eq!(
        status(&endpoint, "clientele.v1.ProfileService").await,
        ServingStatus::Serving
    );
    let took = until_serving(&endpoint, OFFERS, Duration::from_secs(60)).await;
    assert!(*offers.readiness().borrow());
    eprintln!("offers ready after {took:?}");
    let _ = stop.send(());
    let _ = server.await;
}

/// Feeds that cannot be read: after `offers.ready_timeout_secs` the service serves anyway.
/// (On SQLite, where the consumers always run: on PostgreSQL a replica that finds the feeds'
/// leader lock taken, e.g. by the test above, is ready at once, as it applies no feed.)
#[tokio::test]
async fn unreachable_feeds_serve_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = support::stack_settings("http://127.0.0.1:9", dir.path());
    settings.offers.ready_timeout_secs = 1;
    let offers =
        clientele_offers::setup::build(&settings, &target(Engine::Sqlite, dir.path(), "offers"))
            .await
            .unwrap();
    let mut ready = offers.readiness();
    assert!(!*ready.borrow());
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), ready.wait_for(|r| *r))
        .await
        .expect("ready after the timeout")
        .unwrap();
    assert!(start.elapsed() >= Duration::from_millis(900));
}

/// Consumers off (`offers.consumers = false`): nothing to catch up with, ready at once.
#[tokio::test]
async fn without_consumers_the_service_is_ready_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = support::stack_settings("http://127.0.0.1:9", dir.path());
    settings.offers.consumers = false;
    let offers =
        clientele_offers::setup::build(&settings, &target(Engine::Postgres, dir.path(), "offers"))
            .await
            .unwrap();
    assert!(*offers.readiness().borrow());
}

/// Another replica holds the feeds' leader lock: this one applies no feed, so it has nothing
/// to catch up with and is ready at once (not after the timeout).
#[tokio::test]
async fn a_follower_replica_is_ready_without_waiting_for_the_timeout() {
    use sqlx::Connection as _;
    sqlx::any::install_default_drivers();
    let mut leader = sqlx::AnyConnection::connect(&clientele_runtime::testing::postgres_url())
        .await
        .unwrap();
    // Blocks while another test of this run leads (it lets go when it ends).
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(clientele_runtime::leader::lock_key("offers.feeds"))
        .execute(&mut leader)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = support::stack_settings("http://127.0.0.1:9", dir.path());
    settings.offers.ready_timeout_secs = 120;
    let offers =
        clientele_offers::setup::build(&settings, &target(Engine::Postgres, dir.path(), "offers"))
            .await
            .unwrap();
    let mut ready = offers.readiness();
    tokio::time::timeout(Duration::from_secs(30), ready.wait_for(|r| *r))
        .await
        .expect("a follower is ready at once")
        .unwrap();
    drop(leader);
}
