//! The gRPC upstream clients against the real services.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use clientele_offers::upstream::{ConsentSource, GrpcProfiles};
use clientele_proto::v1 as pb;
use support::{Engine, serve};

/// Many concurrent reads (batched into BatchGetProfiles) answer exactly as one read each:
/// consents per profile, unknown profiles as `None`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_profile_reads_are_batched_and_answer_as_single_reads() {
    let served = serve(Engine::Postgres).await;
    let mut known = Vec::new();
    for i in 0..40 {
        let id = served.profile_id(&format!("batch-{i}")).await;
        if i % 2 == 0 {
            served.grant(&id, pb::ConsentPurpose::Personalisation).await;
        }
        known.push(id);
    }
    let unknown: Vec<String> = (0..10).map(|_| support::profile_id()).collect();
    let client = GrpcProfiles::new(&served.endpoint, Some("admin-token")).unwrap();
    let all: Vec<String> = known
        .iter()
        .chain(&unknown)
        .chain(&known) // the same profile asked twice at once
        .cloned()
        .collect();
    let got = futures::future::join_all(all.iter().map(|id| client.profile(id))).await;
    for (id, batched) in all.iter().zip(got) {
        let batched = batched.unwrap();
        let single = client.profile(id).await.unwrap();
        assert_eq!(batched, single, "{id}");
        if let Some(i) = known.iter().position(|k| k == id) {
            let facts = batched.expect("known profile");
            assert_eq!(
                facts
                    .granted
                    .contains(&(pb::ConsentPurpose::Personalisation as i32)),
                i % 2 == 0
            );
        } else {
            assert!(batched.is_none(), "unknown profile {id}");
        }
    }
    // A malformed id does not fail the others read with it.
    let mut mixed: Vec<String> = known.iter().take(5).cloned().collect();
    mixed.push("not-a-uuid".into());
    let got = futures::future::join_all(mixed.iter().map(|id| client.profile(id))).await;
    for (id, r) in mixed.iter().zip(got) {
        if id == "not-a-uuid" {
            assert!(r.is_err() || r.unwrap().is_none());
        } else {
            assert!(r.unwrap().is_some(), "{id}");
        }
    }
}
