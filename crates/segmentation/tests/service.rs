//! SegmentationService end to end with real upstream services: ProfileService and
//! IngestService in process, a realistic small customer base ingested as events, the consumer
//! folding the feeds, batch runs and real-time re-scoring. Every test runs on PostgreSQL and
//! on SQLite.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};

use clientele_proto::v1 as pb;
use clientele_runtime::status::violated_field;
use support::{Engine, Served, order, page_view, serve};

fn segment(id: &str, def: pb::segment::Definition) -> pb::DefineSegmentRequest {
    pb::DefineSegmentRequest {
        segment: Some(pb::Segment {
            segment_id: id.into(),
            display_name: id.into(),
            definition: Some(def),
            ..Default::default()
        }),
        expected_version: 0,
    }
}

fn rule(expression: &str) -> pb::segment::Definition {
    pb::segment::Definition::Rule(pb::RuleDefinition {
        expression: expression.into(),
    })
}

fn lifecycle(states: &[pb::LifecycleState]) -> pb::segment::Definition {
    pb::segment::Definition::Lifecycle(pb::LifecycleDefinition {
        states: states.iter().map(|s| *s as i32).collect(),
    })
}

fn rfm_names(names: &[&str]) -> pb::segment::Definition {
    pb::segment::Definition::Rfm(pb::RfmDefinition {
        segment_names: names.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    })
}

/// 40 customers with distinct behaviours:
/// * champ0..7: six orders of 175.00–250.00 over the last ~120 days, the latest a day ago;
/// * lapsed0..1: six orders of 230.00–260.00 between 300 and 420 days ago;
/// * mid0..9: two or three orders of 40–60.00 within 30–150 days;
/// * new0..9: one order of 20.00 within the last 5–25 days;
/// * old0..9: one order of 15.00 between 200 and 500 days ago.
fn history() -> Vec<pb::Event> {
    let mut events = Vec::new();
    for c in 0..8 {
        let name = format!("champ{c}");
        for (n, d) in [1.0, 20.0, 40.0, 60.0, 90.0, 120.0].iter().enumerate() {
            events.push(order(
                &name,
                n,
                d + f64::from(c) * 0.1,
                [18_000, 22_500, 19_000, 24_000, 21_000, 17_500][n] + 300 * i64::from(c),
                "apparel",
            ));
        }
        events.push(page_view(&name, 0, 2.0));
    }
    for c in 0..2 {
        let name = format!("lapsed{c}");
        for n in 0..6 {
            events.push(order(
                &name,
                n,
                300.0 + f64::from(c) * 5.0 + 24.0 * n as f64,
                23_000 + 1_500 * (n as i64 % 3),
                "home",
            ));
        }
    }
    for c in 0..10 {
        let name = format!("mid{c}");
        let orders = 2 + c % 2;
        for n in 0..orders {
            events.push(order(
                &name,
                n,
                30.0 + f64::from(c as u32) * 10.0 + 15.0 * n as f64,
                4_000 + 200 * c as i64,
                "books",
            ));
        }
    }
    for c in 0..10 {
        events.push(order(
            &format!("new{c}"),
            0,
            5.0 + 2.0 * f64::from(c),
            2_000,
            "books",
        ));
    }
    for c in 0..10 {
        events.push(order(
            &format!("old{c}"),
            0,
            200.0 + 30.0 * f64::from(c),
            1_500,
            "toys",
        ));
    }
    events
}

async fn setup_base(s: &Served) {
    s.ingest(history()).await;
    let (events, _) = s.sync().await;
    assert!(
        events >= 100,
        "the consumer folded the history ({events} events)"
    );
}

async fn members(s: &Served, id: &str, cluster: Option<i32>) -> (Vec<String>, usize) {
    use futures::StreamExt;
    let mut stream = s
        .seg()
        .list_segment_members(pb::ListSegmentMembersRequest {
            segment: Some(pb::SegmentRef {
                segment_id: id.into(),
                cluster_index: cluster,
            }),
            run_id: String::new(),
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        chunks += 1;
        assert!(chunk.members.len() <= 2);
        out.extend(chunk.members.into_iter().map(|m| m.profile_id));
    }
    (out, chunks)
}

async fn profile(s: &Served, customer: &str) -> pb::ProfileSegments {
    let id = s.profile_id(customer).await;
    s.seg()
        .get_profile_segments(pb::GetProfileSegmentsRequest { profile_id: id })
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap()
}

macro_rules! service_tests {
    ($engine:expr) => {
        use super::*;

        #[tokio::test]
        async fn a_batch_run_scores_rfm_lifecycle_clusters_rules_and_value_then_orders_move_profiles_in_real_time() {
            let s = serve($engine).await;
            setup_base(&s).await;
            let mut seg = s.seg();
            // Traits for the rule segment, through ProfileService.
            let mut vips = BTreeSet::new();
            for c in 0..3 {
                let id = s.profile_id(&format!("champ{c}")).await;
                s.profiles()
                    .update_traits(pb::UpdateTraitsRequest {
                        profile_id: id.clone(),
                        set: [("vip".to_owned(), pb::Value { kind: Some(pb::value::Kind::BoolValue(true)) })].into(),
                        remove: vec![],
                    })
                    .await
                    .unwrap();
                vips.insert(id);
            }
            s.sync().await;
            for req in [
                segment("champions", rfm_names(&["Champions"])),
                segment("slipping", rfm_names(&["At Risk", "Can't Lose Them"])),
                segment("active", lifecycle(&[pb::LifecycleState::Active])),
                segment("gone", lifecycle(&[pb::LifecycleState::Lapsed, pb::LifecycleState::Churned])),
                segment("vip-regulars", rule(r#"orders >= 5 and trait("vip") == true"#)),
                segment(
                    "behaviour",
                    pb::segment::Definition::Cluster(pb::ClusterDefinition {
                        k: 3,
                        method: pb::ClusteringMethod::Kmeans as i32,
                        features: vec![
                            pb::ClusterFeature::RecencyDays as i32,
                            pb::ClusterFeature::Frequency as i32,
                            pb::ClusterFeature::Monetary as i32,
                        ],
                        scaling: pb::FeatureScaling::Standard as i32,
                        log1p_features: vec![pb::ClusterFeature::Frequency as i32, pb::ClusterFeature::Monetary as i32],
                        seed: 7,
                        ..Default::default()
                    }),
                ),
                segment(
                    "valuable",
                    pb::segment::Definition::PredictedValue(pb::PredictedValueDefinition {
                        top_fraction: Some(0.25),
                        ..Default::default()
                    }),
                ),
            ] {
                assert!(seg.define_segment(req).await.unwrap().into_inner().created);
            }
            let run1 = s.recompute("run-1").await;
            let out = run1.outputs.clone().unwrap();
            assert_eq!(out.rfm.as_ref().unwrap().scored_customers, 40);
            assert_eq!(out.rfm.as_ref().unwrap().recency_day_boundaries.len(), 4);
            let pv = out.predicted_value.as_ref().expect("CLV models fitted");
            assert!(pv.bgnbd_r > 0.0 && pv.gamma_gamma_q > 1.0);
            let cluster = &out.clusters[0];
            assert_eq!(cluster.clusters.len(), 3);
            assert_eq!(cluster.clusters.iter().map(|c| c.size).sum::<i64>(), 40);
            assert!((-1.0..=1.0).contains(&cluster.silhouette));
            assert!(cluster.stability_ari > 0.5, "k-means is stable across seeds: {}", cluster.stability_ari);
            assert_eq!(cluster.clusters[0].centroid.len(), 3);

            // Champions: recent, frequent, big spenders.
            let champions = members(&s, "champions", None).await.0;
            for c in 0..8 {
                let id = s.profile_id(&format!("champ{c}")).await;
                assert!(champions.contains(&id), "champ{c} is a Champion");
            }
            let p = profile(&s, "champ0").await;
            assert_eq!(p.rfm.as_ref().unwrap().segment, pb::RfmSegment::Champions as i32);
            assert_eq!(p.rfm.as_ref().unwrap().recency, 5);
            assert_eq!(p.lifecycle.as_ref().unwrap().state, pb::LifecycleState::Active as i32);
            let predicted = p.predicted.as_ref().unwrap();
            assert!(predicted.clv.as_ref().unwrap().amount_minor > 0);
            assert!((0.0..=1.0).contains(&predicted.p_alive));
            assert!(p.memberships.iter().any(|m| m.segment_id == "behaviour" && m.cluster_index.is_some()));
            // The lapsed big spenders slip.
            for c in 0..2 {
                let p = profile(&s, &format!("lapsed{c}")).await;
                let name = &p.rfm.as_ref().unwrap().segment_name;
                assert!(name == "At Risk" || name == "Can't Lose Them", "lapsed{c} is {name}");
                assert_eq!(p.lifecycle.as_ref().unwrap().state, pb::LifecycleState::Lapsed as i32);
                assert!(p.memberships.iter().any(|m| m.segment_id == "slipping"));
            }
            assert_eq!(profile(&s, "new3").await.lifecycle.unwrap().state, pb::LifecycleState::New as i32);
            // The rule segment: exactly the VIPs with >= 5 orders, streamed two per chunk.
            let (vip_members, chunks) = members(&s, "vip-regulars", None).await;
            assert_eq!(vip_members.into_iter().collect::<BTreeSet<_>>(), vips);
            assert_eq!(chunks, 2);
            // 80/20: champions hold far more revenue than their share of customers.
            let summary = seg
                .get_segment_summary(pb::GetSegmentSummaryRequest {
                    segment: Some(pb::SegmentRef { segment_id: "champions".into(), cluster_index: None }),
                    run_id: String::new(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(summary.size, 8);
            assert!((summary.share_of_customers - 0.2).abs() < 1e-9);
            assert!(summary.revenue_share > 0.5, "revenue share {}", summary.revenue_share);
            assert!((summary.mean_recency_score - 5.0).abs() < 1e-9);
            assert!(summary.mean_predicted_clv.unwrap().amount_minor > 0);

            // Real time: a long-gone one-time customer orders again.
            let old = s.profile_id("old5").await;
            let before = profile(&s, "old5").await;
            assert!(before.memberships.iter().any(|m| m.segment_id == "gone"));
            let mut watch = seg
                .watch_membership_changes(pb::WatchMembershipChangesRequest {
                    start: Some(pb::watch_membership_changes_request::Start::AfterCursor(run1.changes_cursor.clone())),
                    segments: vec![],
                    types: vec![],
                })
                .await
                .unwrap()
                .into_inner();
            s.ingest(vec![order("old5", 1, 0.0, 30_000, "toys")]).await;
            s.sync().await;
            let after = profile(&s, "old5").await;
            assert_eq!(after.lifecycle.as_ref().unwrap().state, pb::LifecycleState::Active as i32);
            assert!(after.memberships.iter().any(|m| m.segment_id == "active"));
            assert!(!after.memberships.iter().any(|m| m.segment_id == "gone"));
            let mut seen = BTreeMap::new();
            while seen.len() < 2 {
                let msg = tokio::time::timeout(std::time::Duration::from_secs(10), watch.message())
                    .await
                    .expect("membership change delivered")
                    .unwrap()
                    .unwrap();
                if let Some(pb::watch_membership_changes_response::Kind::Change(c)) = msg.kind
                    && c.profile_id == old
                    && ["gone", "active"].contains(&c.segment.as_ref().unwrap().segment_id.as_str())
                {
                    assert_eq!(c.reason, pb::MembershipChangeReason::Realtime as i32);
                    seen.insert(c.segment.unwrap().segment_id, c.r#type);
                }
            }
            assert_eq!(seen["gone"], pb::MembershipChangeType::Exited as i32);
            assert_eq!(seen["active"], pb::MembershipChangeType::Entered as i32);

            // A second run, and the flows between the two.
            let run2 = s.recompute("run-2").await;
            let flows = seg
                .get_segment_flows(pb::GetSegmentFlowsRequest {
                    from_run_id: run1.run_id.clone(),
                    to_run_id: run2.run_id.clone(),
                    dimension: Some(pb::FlowDimension {
                        dimension: Some(pb::flow_dimension::Dimension::LifecycleStates(true)),
                    }),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(flows.cells.iter().map(|c| c.profiles).sum::<i64>(), 40);
            let to_active = flows.cells.iter().find(|c| {
                matches!(c.from.as_ref().and_then(|g| g.group.clone()), Some(pb::flow_group::Group::LifecycleState(s)) if s == pb::LifecycleState::Lapsed as i32 || s == pb::LifecycleState::Churned as i32)
                    && matches!(c.to.as_ref().and_then(|g| g.group.clone()), Some(pb::flow_group::Group::LifecycleState(s)) if s == pb::LifecycleState::Active as i32)
            });
            assert!(to_active.is_some_and(|c| c.profiles >= 1), "old5 flowed back to active: {:?}", flows.cells);
            let rfm_flows = seg
                .get_segment_flows(pb::GetSegmentFlowsRequest {
                    from_run_id: run1.run_id.clone(),
                    to_run_id: run2.run_id.clone(),
                    dimension: Some(pb::FlowDimension {
                        dimension: Some(pb::flow_dimension::Dimension::RfmSegments(true)),
                    }),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(rfm_flows.cells.iter().map(|c| c.profiles).sum::<i64>(), 40);
            // Backwards is refused.
            let err = seg
                .get_segment_flows(pb::GetSegmentFlowsRequest {
                    from_run_id: run2.run_id.clone(),
                    to_run_id: run1.run_id.clone(),
                    dimension: Some(pb::FlowDimension {
                        dimension: Some(pb::flow_dimension::Dimension::RfmSegments(true)),
                    }),
                })
                .await
                .unwrap_err();
            assert_eq!(violated_field(&err).as_deref(), Some("to_run_id"));
            let runs = seg
                .list_recomputes(pb::ListRecomputesRequest { states: vec![], page_size: 1, page_token: String::new() })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(runs.runs[0].run_id, run2.run_id);
            assert!(!runs.next_page_token.is_empty());
        }

        #[tokio::test]
        async fn bad_segment_definitions_name_the_field_and_rule_errors_the_position() {
            let s = serve($engine).await;
            let mut seg = s.seg();
            let err = seg
                .define_segment(segment("typo", rule("orders >= 3 and\n  recncy_days < 30")))
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert_eq!(violated_field(&err).as_deref(), Some("segment.rule.expression"));
            assert!(err.message().contains("2:3"), "{}", err.message());
            assert!(err.message().contains("recency_days"), "suggests the feature: {}", err.message());
            let err = seg.define_segment(segment("syntax", rule("orders >= "))).await.unwrap_err();
            assert_eq!(violated_field(&err).as_deref(), Some("segment.rule.expression"));
            assert!(err.message().contains("1:"), "{}", err.message());
            let err = seg.define_segment(segment("x", rfm_names(&["Champs"]))).await.unwrap_err();
            assert_eq!(violated_field(&err).as_deref(), Some("segment.rfm.segment_names[0]"));
            let err = seg
                .define_segment(segment("x", pb::segment::Definition::Cluster(pb::ClusterDefinition {
                    k: 1,
                    method: pb::ClusteringMethod::Kmeans as i32,
                    features: vec![1, 2],
                    ..Default::default()
                })))
                .await
                .unwrap_err();
            assert_eq!(violated_field(&err).as_deref(), Some("segment.cluster.k"));
            let err = seg.define_segment(segment("Bad Id", lifecycle(&[pb::LifecycleState::New]))).await.unwrap_err();
            assert_eq!(violated_field(&err).as_deref(), Some("segment.segment_id"));
            let err = seg.define_segment(segment("x", lifecycle(&[]))).await.unwrap_err();
            assert_eq!(violated_field(&err).as_deref(), Some("segment.lifecycle.states"));
            let err = seg
                .define_segment(segment("x", pb::segment::Definition::PredictedValue(pb::PredictedValueDefinition {
                    min_clv: Some(pb::Money { amount_minor: 1, currency: "EUR".into() }),
                    ..Default::default()
                })))
                .await
                .unwrap_err();
            assert_eq!(violated_field(&err).as_deref(), Some("segment.predicted_value.min_clv.currency"));
            // Rules may only reference existing non-RULE segments.
            let err = seg.define_segment(segment("r", rule(r#"segment("nope")"#))).await.unwrap_err();
            assert_eq!(violated_field(&err).as_deref(), Some("segment.rule.expression"));
            // Nothing was written.
            let list = seg
                .list_segments(pb::ListSegmentsRequest::default())
                .await
                .unwrap()
                .into_inner();
            assert!(list.segments.is_empty());
        }

        #[tokio::test]
        async fn segment_crud_versions_and_precise_errors() {
            let s = serve($engine).await;
            let mut seg = s.seg();
            let created = seg
                .define_segment(segment("new", lifecycle(&[pb::LifecycleState::New])))
                .await
                .unwrap()
                .into_inner();
            assert!(created.created);
            assert_eq!(created.segment.as_ref().unwrap().kind, pb::SegmentKind::Lifecycle as i32);
            let mut req = segment("new", lifecycle(&[pb::LifecycleState::New, pb::LifecycleState::Active]));
            req.expected_version = 1;
            let updated = seg.define_segment(req.clone()).await.unwrap().into_inner();
            assert_eq!(updated.segment.unwrap().version, 2);
            let err = seg.define_segment(req).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::Aborted);
            seg.define_segment(segment("vip", rule(r#"segment("new") and orders > 1"#))).await.unwrap();
            let page = seg
                .list_segments(pb::ListSegmentsRequest { kinds: vec![], page_size: 1, page_token: String::new() })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(page.segments[0].segment_id, "new");
            let page2 = seg
                .list_segments(pb::ListSegmentsRequest { kinds: vec![], page_size: 1, page_token: page.next_page_token })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(page2.segments[0].segment_id, "vip");
            assert!(page2.next_page_token.is_empty());
            seg.delete_segment(pb::DeleteSegmentRequest { segment_id: "vip".into() }).await.unwrap();
            seg.delete_segment(pb::DeleteSegmentRequest { segment_id: "vip".into() }).await.unwrap();
            let err = seg.get_segment(pb::GetSegmentRequest { segment_id: "vip".into() }).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::NotFound);
            let err = seg.define_segment(segment("vip", rule("orders > 1"))).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::FailedPrecondition);
            let err = seg.delete_segment(pb::DeleteSegmentRequest { segment_id: "never".into() }).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::NotFound);
            // Scoring before any run is a precondition failure; unknown profiles are NOT_FOUND.
            s.ingest(vec![order("solo", 0, 3.0, 1_000, "books")]).await;
            s.sync().await;
            let id = s.profile_id("solo").await;
            let err = seg.score_profile(pb::ScoreProfileRequest { profile_id: id.clone(), dry_run: false }).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::FailedPrecondition);
            let err = seg
                .get_profile_segments(pb::GetProfileSegmentsRequest { profile_id: uuid::Uuid::new_v4().to_string() })
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::NotFound);
            let err = seg.get_profile_segments(pb::GetProfileSegmentsRequest { profile_id: "x".into() }).await.unwrap_err();
            assert_eq!(violated_field(&err).as_deref(), Some("profile_id"));
            let err = seg
                .start_recompute(pb::StartRecomputeRequest { idempotency_key: String::new(), requested_by: "t".into() })
                .await
                .unwrap_err();
            assert_eq!(violated_field(&err).as_deref(), Some("idempotency_key"));
            // After a run, ScoreProfile works; a dry run reports without writing.
            s.recompute("r1").await;
            let dry = seg
                .score_profile(pb::ScoreProfileRequest { profile_id: id.clone(), dry_run: true })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(dry.profile.unwrap().lifecycle.unwrap().state, pb::LifecycleState::New as i32);
            assert!(dry.changes.is_empty());
            let again = s
                .seg()
                .start_recompute(pb::StartRecomputeRequest { idempotency_key: "r1".into(), requested_by: "t".into() })
                .await
                .unwrap()
                .into_inner();
            assert!(!again.created, "same key, same run");
            let config = seg.get_scoring_config(pb::GetScoringConfigRequest {}).await.unwrap().into_inner().config.unwrap();
            assert_eq!(config.reporting_currency, "USD");
            assert_eq!(config.rfm_name_rules.len(), 11);
            let err = seg
                .watch_membership_changes(pb::WatchMembershipChangesRequest {
                    start: Some(pb::watch_membership_changes_request::Start::AfterCursor("mc:999999".into())),
                    segments: vec![],
                    types: vec![],
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::OutOfRange);
        }
    };
}

mod postgres {
    service_tests!(Engine::Postgres);
}

mod sqlite {
    service_tests!(Engine::Sqlite);
}
