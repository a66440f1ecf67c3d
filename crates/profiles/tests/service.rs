//! ProfileService behaviour over a real gRPC connection: validation, auth, the Redis cache
//! (including Redis going away), erasure of cached copies and the changes feed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use clientele_profiles::ProfileStore;
use clientele_proto::v1 as pb;
use clientele_runtime::cache::RedisCache;
use clientele_runtime::status::violated_field;
use clientele_runtime::testing;
use support::{Engine, client, fixture, id, serve, set};
use tonic::Code;

fn redis_cache(url: &str, prefix: &str) -> Arc<RedisCache> {
    Arc::new(RedisCache::new(
        url,
        prefix.to_string(),
        Duration::from_secs(60),
        Duration::from_millis(200),
        "profiles",
    ))
}

#[tokio::test]
async fn bad_input_names_the_field_and_writes_nothing() {
    let f = fixture(Engine::Postgres, 5).await;
    let s = serve(f.service()).await;
    let mut c = client(&s.endpoint, Some("admin-token"));

    let err = c
        .resolve(pb::ResolveRequest {
            identifiers: set(vec![id(1, "cust-ok"), id(2, "not-an-email")]),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        violated_field(&err).as_deref(),
        Some("identifiers.identifiers[1].value")
    );
    // nothing was written for the valid identifier either
    let r = c
        .resolve(pb::ResolveRequest {
            identifiers: set(vec![id(1, "cust-ok")]),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.created);

    let cases: Vec<(pb::ResolveRequest, &str)> = vec![
        (
            pb::ResolveRequest { identifiers: None },
            "identifiers.identifiers",
        ),
        (
            pb::ResolveRequest {
                identifiers: set(vec![id(42, "x")]),
            },
            "identifiers.identifiers[0].type",
        ),
        (
            pb::ResolveRequest {
                identifiers: set(vec![id(3, "12")]),
            },
            "identifiers.identifiers[0].value",
        ),
        (
            pb::ResolveRequest {
                identifiers: set(vec![id(1, &"x".repeat(300))]),
            },
            "identifiers.identifiers[0].value",
        ),
        (
            pb::ResolveRequest {
                identifiers: set((0..33).map(|i| id(1, &format!("c{i}"))).collect()),
            },
            "identifiers.identifiers",
        ),
    ];
    for (req, field) in cases {
        let err = c.resolve(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert_eq!(violated_field(&err).as_deref(), Some(field));
    }

    let batch = c
        .batch_resolve(pb::BatchResolveRequest {
            sets: vec![
                pb::IdentifierSet {
                    identifiers: vec![id(1, "batch-new")],
                },
                pb::IdentifierSet {
                    identifiers: vec![id(2, "@@")],
                },
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_field(&batch).as_deref(),
        Some("sets[1].identifiers[0].value")
    );

    let long = pb::Value {
        kind: Some(pb::value::Kind::StringValue("x".repeat(2000))),
    };
    let err = c
        .update_traits(pb::UpdateTraitsRequest {
            profile_id: r.profile_id.clone(),
            set: [("bio".to_string(), long)].into(),
            remove: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&err).as_deref(), Some("set[\"bio\"]"));

    let err = c
        .get_profile(pb::GetProfileRequest {
            profile_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&err).as_deref(), Some("profile_id"));
    let missing = "00000000-0000-7000-8000-000000000001";
    let err = c
        .get_profile(pb::GetProfileRequest {
            profile_id: missing.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains(missing));
}

#[tokio::test]
async fn a_feed_needs_strictly_increasing_positions_on_every_delta() {
    let f = fixture(Engine::Postgres, 5).await;
    let s = serve(f.service()).await;
    let mut c = client(&s.endpoint, Some("admin-token"));
    let p = c
        .resolve(pb::ResolveRequest {
            identifiers: set(vec![id(1, "feed-cust")]),
        })
        .await
        .unwrap()
        .into_inner()
        .profile_id;
    let delta = |key: &str, pos: i64| pb::AggregateDelta {
        idempotency_key: key.into(),
        profile_id: p.clone(),
        occurred_at: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        orders: 1,
        feed_position: pos,
        ..Default::default()
    };
    let request = |feed: &str, deltas: Vec<pb::AggregateDelta>| pb::ApplyAggregatesRequest {
        deltas,
        feed: feed.into(),
    };
    let cases = vec![
        (
            request("log", vec![delta("a", 1), delta("b", 2), delta("c", 0)]),
            "deltas[2].feed_position",
        ),
        (
            request("log", vec![delta("a", 1), delta("b", 3), delta("c", 3)]),
            "deltas[2].feed_position",
        ),
        (
            request("log", vec![delta("a", 2), delta("b", 1)]),
            "deltas[1].feed_position",
        ),
        (
            request("log", vec![delta("a", -1)]),
            "deltas[0].feed_position",
        ),
        (
            request("", vec![delta("a", 0), delta("b", 7)]),
            "deltas[1].feed_position",
        ),
        (request(&"f".repeat(129), vec![delta("a", 1)]), "feed"),
        (request("", Vec::new()), "deltas"),
    ];
    for (req, field) in cases {
        let err = c.apply_aggregates(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert_eq!(violated_field(&err).as_deref(), Some(field));
    }
    assert_eq!(
        c.get_profile(pb::GetProfileRequest {
            profile_id: p.clone()
        })
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap()
        .aggregates
        .unwrap_or_default()
        .order_count,
        0,
        "a refused request writes nothing"
    );
    // a position probe (no deltas) of a feed never applied
    let probe = c
        .apply_aggregates(request("log", Vec::new()))
        .await
        .unwrap();
    assert_eq!(probe.into_inner().feed_position, 0);
    // a valid feed request counts, and its redelivery does not
    for expected in [(2, 0), (0, 2)] {
        let out = c
            .apply_aggregates(request("log", vec![delta("a", 4), delta("b", 9)]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((out.applied, out.duplicates), expected);
    }
    let probe = c
        .apply_aggregates(request("log", Vec::new()))
        .await
        .unwrap();
    assert_eq!(probe.into_inner().feed_position, 9);
}

#[tokio::test]
async fn calls_need_a_token_with_the_right_scope_but_health_and_reflection_do_not() {
    let f = fixture(Engine::Sqlite, 5).await;
    let s = serve(f.service()).await;
    let get = || pb::GetProfileRequest {
        profile_id: "00000000-0000-7000-8000-000000000001".into(),
    };

    let err = client(&s.endpoint, None)
        .get_profile(get())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = client(&s.endpoint, Some("wrong"))
        .get_profile(get())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = client(&s.endpoint, Some("reader-token"))
        .erase_profile(pb::EraseProfileRequest {
            profile_id: "00000000-0000-7000-8000-000000000001".into(),
            reason: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // a reader may read (NOT_FOUND, not a refusal)
    let err = client(&s.endpoint, Some("reader-token"))
        .get_profile(get())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let channel = clientele_runtime::client::lazy_channel(&s.endpoint).unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "clientele.v1.ProfileService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"clientele.v1.ProfileService".to_string()),
        "{names:?}"
    );
}

#[tokio::test]
async fn writes_invalidate_the_redis_copy_of_a_hot_profile() {
    let f = fixture(Engine::Postgres, 5).await;
    let prefix = testing::unique_prefix();
    let cache = redis_cache(&testing::redis_url(), &prefix);
    let s = serve(f.service_with(cache)).await;
    let mut c = client(&s.endpoint, Some("admin-token"));
    let pid = c
        .resolve(pb::ResolveRequest {
            identifiers: set(vec![id(1, "hot")]),
        })
        .await
        .unwrap()
        .into_inner()
        .profile_id;
    let first = c
        .get_profile(pb::GetProfileRequest {
            profile_id: pid.clone(),
        })
        .await
        .unwrap();
    let redis = redis::Client::open(testing::redis_url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{prefix}{pid}");
    let cached: Option<Vec<u8>> = redis::cmd("HGET")
        .arg(&key)
        .arg("d")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(cached.is_some(), "a read fills the cache");

    c.update_traits(pb::UpdateTraitsRequest {
        profile_id: pid.clone(),
        set: [(
            "vip".to_string(),
            pb::Value {
                kind: Some(pb::value::Kind::BoolValue(true)),
            },
        )]
        .into(),
        remove: vec![],
    })
    .await
    .unwrap();
    let after = c
        .get_profile(pb::GetProfileRequest {
            profile_id: pid.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let after = after.profile.unwrap();
    assert!(
        after.traits.contains_key("vip"),
        "the write is visible at once"
    );
    assert!(after.version > first.into_inner().profile.unwrap().version);

    c.erase_profile(pb::EraseProfileRequest {
        profile_id: pid.clone(),
        reason: "test".into(),
    })
    .await
    .unwrap();
    let cached: Option<Vec<u8>> = redis::cmd("HGET")
        .arg(&key)
        .arg("d")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(cached.is_none(), "erasure removes the cached copy");
    let err = c
        .get_profile(pb::GetProfileRequest { profile_id: pid })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn reads_and_writes_go_on_when_redis_goes_down() {
    let port = free_port();
    let mut redis_server = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--bind",
            "127.0.0.1",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server must be installed (see README)");
    let url = format!("redis://127.0.0.1:{port}");
    for _ in 0..50 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let f = fixture(Engine::Postgres, 5).await;
    let s = serve(f.service_with(redis_cache(&url, "outage:"))).await;
    let mut c = client(&s.endpoint, Some("admin-token"));
    let pid = c
        .resolve(pb::ResolveRequest {
            identifiers: set(vec![id(1, "outage")]),
        })
        .await
        .unwrap()
        .into_inner()
        .profile_id;
    c.get_profile(pb::GetProfileRequest {
        profile_id: pid.clone(),
    })
    .await
    .unwrap();

    redis_server.kill().unwrap();
    redis_server.wait().unwrap();

    for _ in 0..3 {
        let p = c
            .get_profile(pb::GetProfileRequest {
                profile_id: pid.clone(),
            })
            .await;
        assert!(p.is_ok(), "reads go on from the database: {p:?}");
    }
    c.update_traits(pb::UpdateTraitsRequest {
        profile_id: pid.clone(),
        set: [(
            "during_outage".to_string(),
            pb::Value {
                kind: Some(pb::value::Kind::IntValue(1)),
            },
        )]
        .into(),
        remove: vec![],
    })
    .await
    .unwrap();
    let p = c
        .get_profile(pb::GetProfileRequest { profile_id: pid })
        .await
        .unwrap()
        .into_inner();
    assert!(p.profile.unwrap().traits.contains_key("during_outage"));
}

#[tokio::test]
async fn watch_changes_streams_past_and_new_changes() {
    let f = fixture(Engine::Sqlite, 5).await;
    let s = serve(f.service()).await;
    let mut c = client(&s.endpoint, Some("admin-token"));
    let a = c
        .resolve(pb::ResolveRequest {
            identifiers: set(vec![id(1, "w-a")]),
        })
        .await
        .unwrap()
        .into_inner()
        .profile_id;
    let mut stream = c
        .watch_changes(pb::WatchChangesRequest {
            after_sequence: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(
        (first.profile_id.as_str(), first.kind),
        (a.as_str(), pb::ProfileChangeKind::Created as i32)
    );
    let b = c
        .resolve(pb::ResolveRequest {
            identifiers: set(vec![id(1, "w-b")]),
        })
        .await
        .unwrap()
        .into_inner()
        .profile_id;
    let second = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.profile_id, b);
    assert!(second.sequence > first.sequence);
}

async fn resolve_new(c: &mut support::Client, value: &str) -> String {
    c.resolve(pb::ResolveRequest {
        identifiers: set(vec![id(1, value)]),
    })
    .await
    .unwrap()
    .into_inner()
    .profile_id
}

async fn erase(c: &mut support::Client, profile_id: &str) {
    c.erase_profile(pb::EraseProfileRequest {
        profile_id: profile_id.to_string(),
        reason: "test".into(),
    })
    .await
    .unwrap();
}

async fn next(stream: &mut tonic::Streaming<pb::ProfileChange>) -> pb::ProfileChange {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a change within 5 s")
        .unwrap()
        .unwrap()
}

/// A filtered watch: only erasures arrive, and a page that ends on another kind sends a
/// progress marker whose sequence resumes the feed after everything already looked at.
async fn check_a_filtered_watch(engine: Engine) {
    let f = fixture(engine, 5).await;
    let s = serve(f.service()).await;
    let mut c = client(&s.endpoint, Some("admin-token"));
    let a = resolve_new(&mut c, "kf-a").await;
    let b = resolve_new(&mut c, "kf-b").await;
    erase(&mut c, &a).await;
    let erasures_only = |after_sequence| pb::WatchChangesRequest {
        after_sequence,
        kinds: vec![pb::ProfileChangeKind::Erased as i32],
    };

    let mut stream = c
        .watch_changes(erasures_only(0))
        .await
        .unwrap()
        .into_inner();
    let erased_a = next(&mut stream).await;
    assert_eq!(
        (erased_a.profile_id.as_str(), erased_a.kind),
        (a.as_str(), pb::ProfileChangeKind::Erased as i32),
        "the two creations before it are not sent"
    );
    // A creation only: the stream says how far it looked, and nothing else.
    resolve_new(&mut c, "kf-c").await;
    let marker = next(&mut stream).await;
    assert_eq!(marker.kind, pb::ProfileChangeKind::Unspecified as i32);
    assert!(marker.profile_id.is_empty());
    assert!(marker.sequence > erased_a.sequence);
    let all: Vec<i64> = f
        .store
        .changes_after(0, 100)
        .await
        .unwrap()
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(
        all.last(),
        Some(&marker.sequence),
        "the marker is the newest change"
    );
    drop(stream);

    // Resuming from the marker: the next erasure is the first thing sent.
    erase(&mut c, &b).await;
    let mut stream = c
        .watch_changes(erasures_only(marker.sequence))
        .await
        .unwrap()
        .into_inner();
    let erased_b = next(&mut stream).await;
    assert_eq!(
        (erased_b.profile_id.as_str(), erased_b.kind),
        (b.as_str(), pb::ProfileChangeKind::Erased as i32)
    );

    let err = c
        .watch_changes(pb::WatchChangesRequest {
            after_sequence: 0,
            kinds: vec![0],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violated_field(&err).as_deref(), Some("kinds"));
}

#[tokio::test]
async fn a_watch_for_erasures_gets_erasures_and_markers_only_postgres() {
    check_a_filtered_watch(Engine::Postgres).await;
}

#[tokio::test]
async fn a_watch_for_erasures_gets_erasures_and_markers_only_sqlite() {
    check_a_filtered_watch(Engine::Sqlite).await;
}

#[tokio::test]
async fn export_returns_everything_held_about_the_person() {
    let f = fixture(Engine::Postgres, 5).await;
    let s = serve(f.service()).await;
    let mut c = client(&s.endpoint, Some("admin-token"));
    let pid = c
        .resolve(pb::ResolveRequest {
            identifiers: set(vec![id(1, "exp"), id(2, "Exp@Example.com")]),
        })
        .await
        .unwrap()
        .into_inner()
        .profile_id;
    c.set_consent(pb::SetConsentRequest {
        profile_id: pid.clone(),
        consent: Some(pb::Consent {
            purpose: pb::ConsentPurpose::Email as i32,
            status: pb::ConsentStatus::Granted as i32,
            decided_at: None,
            source: "web.signup".into(),
        }),
    })
    .await
    .unwrap();
    let json = c
        .export_profile(pb::ExportProfileRequest {
            profile_id: pid.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .json;
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["profile"]["id"], pid.as_str());
    assert_eq!(doc["profile"]["identifiers"].as_array().unwrap().len(), 2);
    assert_eq!(doc["consent_history"][0]["source"], "web.signup");
    assert!(
        !json.to_lowercase().contains("exp@example.com"),
        "raw emails are never held"
    );
}
