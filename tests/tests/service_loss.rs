//! Losing a service mid-story, in the compose topology (every service its own process): the
//! profile service crashes (SIGKILL) while events are flowing through ingest. Meanwhile
//! callers get UNAVAILABLE, both from profiles directly and from ingest, which cannot resolve
//! identities; nothing is half-written. After a restart the caller retries what was refused,
//! and in the end every acknowledged event is stored exactly once and counted exactly once in
//! the profiles' aggregates. Then the segmentation process is stopped (SIGTERM) and started
//! again, and scores the same profiles as before.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use clientele::generate::{self, GeneratorConfig};
use clientele_e2e::story::{expected_totals, recompute, stored_events, wait_for_totals};
use clientele_e2e::{Deployment, Service, TestDatabase};
use clientele_proto::v1 as pb;
use clientele_proto::v1::ingest_service_client::IngestServiceClient;
use clientele_proto::v1::profile_service_client::ProfileServiceClient;
use clientele_proto::v1::segmentation_service_client::SegmentationServiceClient;

const BATCH_EVENTS: usize = 200;

async fn send(
    ingest: &Service,
    events: &[pb::Event],
) -> Result<pb::IngestBatchResponse, tonic::Status> {
    IngestServiceClient::new(ingest.channel())
        .ingest_batch(pb::IngestBatchRequest {
            events: events.to_vec(),
        })
        .await
        .map(tonic::Response::into_inner)
}

fn accepted(reply: &pb::IngestBatchResponse) -> usize {
    reply
        .results
        .iter()
        .filter(|r| r.status == pb::EventStatus::Accepted as i32)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_service_mid_story_gives_unavailable_and_loses_nothing() {
    let db = TestDatabase::create().await;
    let deployment = Deployment::new(&db.url);
    let mut profiles = deployment.start("profiles", &[]).await;
    let ingest = deployment
        .start(
            "ingest",
            &[("CLIENTELE_ENDPOINTS__PROFILES", profiles.endpoint.as_str())],
        )
        .await;
    let mut segmentation = deployment
        .start(
            "segmentation",
            &[
                ("CLIENTELE_ENDPOINTS__PROFILES", profiles.endpoint.as_str()),
                ("CLIENTELE_ENDPOINTS__INGEST", ingest.endpoint.as_str()),
            ],
        )
        .await;

    let events: Vec<pb::Event> = generate::events(&GeneratorConfig::new(33, 80, 200)).collect();
    let batches: Vec<&[pb::Event]> = events.chunks(BATCH_EVENTS).collect();
    assert!(batches.len() >= 6, "{} events", events.len());
    let half = batches.len() / 2;
    let mut acknowledged = 0;
    for b in &batches[..half] {
        acknowledged += accepted(&send(&ingest, b).await.unwrap());
    }

    // The profile service crashes.
    profiles.kill();
    let direct = ProfileServiceClient::new(profiles.channel())
        .get_profile(pb::GetProfileRequest {
            profile_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(direct.code(), tonic::Code::Unavailable, "{direct:?}");
    let refused = send(&ingest, batches[half]).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    // Back up: the caller retries what was refused, then carries on.
    profiles.restart().await;
    let mut retried = None;
    for _ in 0..50 {
        match send(&ingest, batches[half]).await {
            Ok(r) => {
                retried = Some(r);
                break;
            }
            Err(e) if e.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("retry failed: {e:?}"),
        }
    }
    let retried = retried.expect("ingest recovers once profiles is back");
    // Nothing of the refused batch was written: the retry is accepted, not a duplicate.
    assert_eq!(accepted(&retried), batches[half].len());
    acknowledged += accepted(&retried);
    for b in &batches[half + 1..] {
        acknowledged += accepted(&send(&ingest, b).await.unwrap());
    }
    assert_eq!(acknowledged, events.len(), "every event acknowledged once");

    // Every acknowledged event is stored once and counted once.
    let (records, profile_ids) = stored_events(&ingest, events.len()).await;
    let unique: HashSet<&(String, String)> = records.iter().collect();
    assert_eq!(records.len(), events.len(), "stored records");
    assert_eq!(unique.len(), events.len(), "no duplicates");
    let expected = expected_totals(&events);
    let actual = wait_for_totals(&profiles, &profile_ids, &expected).await;
    assert_eq!(actual, expected);

    // Segmentation (which followed the profiles' changes feed through the crash) recomputes,
    // scores a profile, goes away (graceful stop), and comes back with the same answer.
    let run = recompute(&segmentation, "e2e-loss-1").await;
    assert!(run.total > 0, "{run:?}");
    let some_profile = profile_ids.iter().next().unwrap().clone();
    let score = |seg: &Service| {
        let mut client = SegmentationServiceClient::new(seg.channel());
        let id = some_profile.clone();
        async move {
            client
                .score_profile(pb::ScoreProfileRequest {
                    profile_id: id,
                    dry_run: true,
                })
                .await
        }
    };
    let before = score(&segmentation)
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(segmentation.terminate(), Some(0));
    let down = score(&segmentation).await.unwrap_err();
    assert_eq!(down.code(), tonic::Code::Unavailable);
    segmentation.restart().await;
    let after = score(&segmentation)
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    // The same scores and segment (recency_days itself moves with the clock).
    let scores = |p: &pb::ProfileSegments| {
        p.rfm.as_ref().map(|r| {
            (
                r.recency,
                r.frequency,
                r.monetary,
                r.segment,
                r.frequency_orders,
                r.monetary_value.clone(),
            )
        })
    };
    assert_eq!(scores(&before), scores(&after));
    assert_eq!(before.lifecycle, after.lifecycle);
    assert_eq!(before.memberships.len(), after.memberships.len());
    eprintln!(
        "service loss: {} events in {} batches, profiles killed after {half}; {} stored, \
         {} orders / {} refunds counted once",
        events.len(),
        batches.len(),
        records.len(),
        expected.orders,
        expected.refunds
    );
}
