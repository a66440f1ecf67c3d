//! The definition cache of Assign and BatchAssign (see `clientele_experiments::cache`) on
//! PostgreSQL: this process's writes are seen by the next Assign, another process's writes
//! within the staleness bound, a stopped experiment stops assigning, and exposed units keep
//! their variant.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use clientele_experiments::ExperimentServiceImpl;
use clientele_proto::v1 as pb;
use clientele_proto::v1::experiment_service_server::ExperimentService;
use support::{cached_fixture, experiment, unit_ids};
use tonic::Request;

/// Longer than any test, so only an invalidation can make a cached definition fresh.
const LONG: Duration = Duration::from_secs(600);

async fn set_weights(service: &ExperimentServiceImpl, key: &str, weights: &[f64]) {
    service
        .update_experiment(Request::new(pb::UpdateExperimentRequest {
            experiment: Some(experiment(key, weights)),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["variants".into()],
            }),
            expected_version: 0,
        }))
        .await
        .unwrap();
}

async fn stop(service: &ExperimentServiceImpl, key: &str) {
    service
        .stop_experiment(Request::new(pb::StopExperimentRequest {
            key: key.into(),
            reason: "done".into(),
            ..pb::StopExperimentRequest::default()
        }))
        .await
        .unwrap();
}

async fn batch(service: &ExperimentServiceImpl, key: &str, unit: &str) -> pb::Assignment {
    service
        .batch_assign(Request::new(pb::BatchAssignRequest {
            experiment_keys: vec![key.into()],
            unit_ids: unit_ids("profile_id", unit),
            ..pb::BatchAssignRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .assignments
        .remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_update_through_this_process_is_seen_by_the_next_assign() {
    let f = cached_fixture(LONG).await;
    f.create_and_start(experiment("ramp", &[1.0, 0.0])).await;
    assert_eq!(f.assign("ramp", "u1").await.variant_index, 0);
    assert_eq!(batch(&f.service, "ramp", "u1").await.variant_index, 0);
    set_weights(&f.service, "ramp", &[0.0, 1.0]).await;
    assert_eq!(f.assign("ramp", "u1").await.variant_index, 1);
    assert_eq!(batch(&f.service, "ramp", "u1").await.variant_index, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stop_through_this_process_stops_the_next_assign() {
    let f = cached_fixture(LONG).await;
    f.create_and_start(experiment("halt", &[0.5, 0.5])).await;
    assert!(f.assign("halt", "u1").await.in_experiment);
    assert!(batch(&f.service, "halt", "u1").await.in_experiment);
    stop(&f.service, "halt").await;
    let a = f.assign("halt", "u1").await;
    assert!(!a.in_experiment);
    assert_eq!(a.reason, pb::AssignmentReason::NotRunning as i32);
    assert!(!batch(&f.service, "halt", "u1").await.in_experiment);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_by_another_process_is_served_stale_only_within_the_bound() {
    // With a long bound the peer's change is not seen yet: the cache is what Assign reads.
    let f = cached_fixture(LONG).await;
    f.create_and_start(experiment("peer", &[1.0, 0.0])).await;
    assert_eq!(f.assign("peer", "u1").await.variant_index, 0);
    set_weights(&f.peer().await, "peer", &[0.0, 1.0]).await;
    assert_eq!(f.assign("peer", "u1").await.variant_index, 0);

    // With a short bound it is seen once the bound has passed.
    let bound = Duration::from_millis(300);
    let f = cached_fixture(bound).await;
    f.create_and_start(experiment("peer", &[1.0, 0.0])).await;
    assert_eq!(f.assign("peer", "u1").await.variant_index, 0);
    assert_eq!(batch(&f.service, "peer", "u1").await.variant_index, 0);
    set_weights(&f.peer().await, "peer", &[0.0, 1.0]).await;
    tokio::time::sleep(bound).await;
    assert_eq!(f.assign("peer", "u1").await.variant_index, 1);
    assert_eq!(batch(&f.service, "peer", "u1").await.variant_index, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_experiment_stopped_by_another_process_stops_assigning_within_the_bound() {
    let bound = Duration::from_millis(300);
    let f = cached_fixture(bound).await;
    f.create_and_start(experiment("halt", &[0.5, 0.5])).await;
    assert!(f.assign("halt", "u1").await.in_experiment);
    assert!(batch(&f.service, "halt", "u1").await.in_experiment);
    stop(&f.peer().await, "halt").await;
    tokio::time::sleep(bound).await;
    let a = f.assign("halt", "u1").await;
    assert_eq!(a.reason, pb::AssignmentReason::NotRunning as i32);
    assert!(!batch(&f.service, "halt", "u1").await.in_experiment);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exposed_units_keep_their_variant_through_cached_definitions() {
    let f = cached_fixture(LONG).await;
    f.create_and_start(experiment("sticky", &[1.0, 0.0])).await;
    assert_eq!(f.expose("sticky", "exposed", None).await, Some(0));
    set_weights(&f.service, "sticky", &[0.0, 1.0]).await;
    assert_eq!(f.assign("sticky", "exposed").await.variant_index, 0);
    assert_eq!(
        batch(&f.service, "sticky", "exposed").await.variant_index,
        0
    );
    assert_eq!(f.assign("sticky", "fresh").await.variant_index, 1);
    // Exposed after the definition was cached, the unit is sticky at once.
    assert_eq!(f.expose("sticky", "fresh", None).await, Some(1));
    set_weights(&f.service, "sticky", &[1.0, 0.0]).await;
    assert_eq!(f.assign("sticky", "fresh").await.variant_index, 1);
    assert_eq!(f.assign("sticky", "new").await.variant_index, 0);
}
