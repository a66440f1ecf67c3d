//! The profile service as its own process, exactly as deployed: PostgreSQL + Redis, settings
//! from the environment, health, metrics, SIGTERM, and data surviving a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clientele_e2e::{Deployment, TestDatabase};
use clientele_proto::v1 as pb;
use clientele_proto::v1::profile_service_client::ProfileServiceClient;

fn ids(pairs: &[(i32, &str)]) -> Option<pb::IdentifierSet> {
    Some(pb::IdentifierSet {
        identifiers: pairs
            .iter()
            .map(|(t, v)| pb::Identifier {
                r#type: *t,
                value: v.to_string(),
                namespace: String::new(),
            })
            .collect(),
    })
}

#[tokio::test]
async fn a_profile_service_process_serves_survives_restarts_and_stops_cleanly() {
    let db = TestDatabase::create().await;
    let deployment = Deployment::new(&db.url);
    let mut profiles = deployment.start("profiles", &[]).await;
    let mut client = ProfileServiceClient::new(profiles.channel());

    let anon = client
        .resolve(pb::ResolveRequest {
            identifiers: ids(&[(5, "cookie-e2e")]),
        })
        .await
        .unwrap()
        .into_inner();
    let known = client
        .resolve(pb::ResolveRequest {
            identifiers: ids(&[(2, "e2e@example.com"), (3, "+82 10-1234-5678")]),
        })
        .await
        .unwrap()
        .into_inner();
    let merged = client
        .resolve(pb::ResolveRequest {
            identifiers: ids(&[(5, "cookie-e2e"), (2, "E2E@example.com ")]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(merged.profile_id, anon.profile_id);
    assert_eq!(merged.merged_profile_ids, vec![known.profile_id.clone()]);

    // the merged-away id resolves to the survivor (read from PostgreSQL: aliases are never
    // cached); that read fills the cache under the survivor id, so both survivor reads come from Redis
    for id in [&known.profile_id, &anon.profile_id, &anon.profile_id] {
        let p = client
            .get_profile(pb::GetProfileRequest {
                profile_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .profile
            .unwrap();
        assert_eq!(p.profile_id, anon.profile_id);
        assert_eq!(p.identifiers.len(), 3);
    }
    let metrics = reqwest_metrics(profiles.metrics_port).await;
    assert!(metrics.contains("grpc_server_handled_total{code=\"0\",method=\"/clientele.v1.ProfileService/GetProfile\"} 3"), "{metrics}");
    // Reads fill Redis; a loaded machine may miss the first connection, so allow a few reads.
    let mut hit = false;
    for _ in 0..50 {
        client
            .get_profile(pb::GetProfileRequest {
                profile_id: anon.profile_id.clone(),
            })
            .await
            .unwrap();
        if reqwest_metrics(profiles.metrics_port)
            .await
            .contains("cache_requests_total{cache=\"profiles\",result=\"hit\"}")
        {
            hit = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(hit, "hot profile reads are served from Redis");

    // SIGTERM drains in-flight calls: a large batch sent just before it still completes
    let sets: Vec<pb::IdentifierSet> = (0..1000)
        .map(|i| ids(&[(1, &format!("drain-{i}")), (4, &format!("drain-dev-{i}"))]).unwrap())
        .collect();
    let mut batch_client = client.clone();
    let batch = tokio::spawn(async move {
        batch_client
            .batch_resolve(pb::BatchResolveRequest { sets })
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    assert_eq!(profiles.terminate(), Some(0));
    let batch = batch
        .await
        .unwrap()
        .expect("the in-flight batch completes during the drain");
    assert_eq!(batch.into_inner().results.len(), 1000);
    // callers then see UNAVAILABLE
    let mut client = ProfileServiceClient::new(profiles.channel());
    let err = client
        .get_profile(pb::GetProfileRequest {
            profile_id: anon.profile_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);

    // a restarted process finds everything acknowledged before
    profiles.restart().await;
    let mut client = ProfileServiceClient::new(profiles.channel());
    let again = client
        .resolve(pb::ResolveRequest {
            identifiers: ids(&[(3, "010-1234-5678")]),
        })
        .await;
    // the phone was written without a country code: the default region is US here, so it is a
    // different (invalid) number and is refused, naming the field
    assert_eq!(again.unwrap_err().code(), tonic::Code::InvalidArgument);
    let again = client
        .resolve(pb::ResolveRequest {
            identifiers: ids(&[(3, "+821012345678")]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.profile_id, anon.profile_id);
    assert!(!again.created);
}

/// Fetches the Prometheus text from the metrics port with a plain HTTP/1.1 request.
async fn reqwest_metrics(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}
