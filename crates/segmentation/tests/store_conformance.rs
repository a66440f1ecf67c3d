//! The store conformance suite: every test runs against PostgreSQL and against SQLite, so the
//! embedded default behaves exactly like production.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clientele_proto::v1 as pb;
use clientele_runtime::db::{self, DatabaseTarget};
use clientele_runtime::testing;
use clientele_segmentation::scoring::RunModel;
use clientele_segmentation::store::{
    Fact, MemberRow, ProfileEvent, RunPublication, RunRecord, ScoreRow, SegmentationStore,
    SqlSegmentationStore, StoreError,
};
use clientele_segmentation::{POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};

const T0: i64 = 1_700_000_000_000_000;
const DAY: i64 = 86_400_000_000;

#[derive(Debug, Clone, Copy)]
enum Engine {
    Postgres,
    Sqlite,
}

struct Fixture {
    store: SqlSegmentationStore,
    _dir: tempfile::TempDir,
}

async fn fixture(engine: Engine) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let target = match engine {
        Engine::Postgres => DatabaseTarget::Postgres {
            url: testing::postgres_url(),
            schema: testing::unique_schema("segmentation"),
        },
        Engine::Sqlite => DatabaseTarget::Sqlite {
            path: dir.path().join("segmentation.db"),
        },
    };
    let database = db::open(
        &target,
        4,
        &POSTGRES_MIGRATIONS,
        &SQLITE_MIGRATIONS,
        "segmentation",
    )
    .await
    .expect("database (is PostgreSQL running?)");
    // PostgreSQL publishes runs over the native COPY path, as the service does.
    let store = match &target {
        DatabaseTarget::Postgres { url, schema } => {
            SqlSegmentationStore::connect_postgres(database, url, schema, 2)
                .await
                .unwrap()
        }
        DatabaseTarget::Sqlite { .. } => SqlSegmentationStore::new(database),
    };
    Fixture { store, _dir: dir }
}

fn order(profile: &str, id: &str, at: i64, amount: i64) -> Fact {
    Fact::Order {
        profile_id: profile.into(),
        order_id: id.into(),
        placed_at: at,
        amount_minor: amount,
        discount_minor: 0,
        converted: true,
        lines: vec![("books".into(), amount)],
    }
}

fn rule_segment(id: &str, expression: &str) -> pb::Segment {
    pb::Segment {
        segment_id: id.into(),
        display_name: id.into(),
        definition: Some(pb::segment::Definition::Rule(pb::RuleDefinition {
            expression: expression.into(),
        })),
        ..Default::default()
    }
}

fn run(id: &str, key: &str) -> RunRecord {
    RunRecord {
        run_id: id.into(),
        idempotency_key: key.into(),
        requested_by: "test".into(),
        state: pb::RecomputeState::Pending as i32,
        phase: 0,
        processed: 0,
        total: 0,
        created_at: T0,
        start_time: None,
        finish_time: None,
        error_message: String::new(),
        data_as_of: None,
        outputs: None,
        changes_cursor: String::new(),
        model: None,
    }
}

fn member(segment: &str, profile: &str) -> MemberRow {
    MemberRow {
        segment_id: segment.into(),
        profile_id: profile.into(),
        cluster_index: -1,
        distance: None,
        entered_at: 0,
    }
}

fn publication(run_id: &str, members: Vec<MemberRow>, now: i64) -> RunPublication {
    RunPublication {
        run_id: run_id.into(),
        scores: vec![ScoreRow {
            profile_id: "p1".into(),
            rfm: Some((5, 4, 3)),
            rfm_name: Some("Champions".into()),
            frequency: Some(3),
            monetary_minor: Some(900),
            ..Default::default()
        }],
        members,
        segments: vec![("vip".into(), 1)],
        outputs: pb::RecomputeOutputs::default(),
        model: RunModel::default(),
        now,
        retained_runs: 10,
    }
}

macro_rules! conformance {
    ($engine:expr) => {
        use super::*;

        #[tokio::test]
        async fn events_are_folded_once_and_refunds_apply_to_later_orders() {
            let f = fixture($engine).await;
            let s = &f.store;
            let facts = vec![
                Fact::Refund {
                    profile_id: "p1".into(),
                    refund_key: "web/r1".into(),
                    order_id: "o1".into(),
                    amount_minor: 300,
                    full: false,
                },
                order("p1", "o1", T0, 1000),
                order("p1", "o1", T0 + DAY, 5000),
                Fact::Engagement {
                    profile_id: "p1".into(),
                    at: T0,
                    kind: "page_viewed".into(),
                },
            ];
            let touched = s
                .apply_events("ingest", None, "log:4", &facts)
                .await
                .unwrap();
            assert!(touched.contains("p1"));
            // A second consumer that read after the old cursor cannot apply the batch again.
            let again = s.apply_events("ingest", None, "log:4", &facts).await;
            assert!(matches!(again, Err(StoreError::CursorMoved(_))));
            assert_eq!(
                s.feed_cursor("ingest").await.unwrap().as_deref(),
                Some("log:4")
            );
            let data = s.load_profiles(&["p1".into()], T0 + DAY).await.unwrap();
            assert_eq!(data.len(), 1);
            assert_eq!(data[0].orders.len(), 1, "the first order event wins");
            assert_eq!(data[0].orders[0].amount_minor, 1000);
            assert_eq!(data[0].orders[0].refunded_minor, 300);
            assert_eq!(data[0].orders[0].lines, vec![("books".to_owned(), 1000)]);
            assert_eq!(data[0].engagement.get("page_viewed"), Some(&1));
        }

        #[tokio::test]
        async fn segment_versions_follow_changes_and_deleted_ids_are_never_reused() {
            let f = fixture($engine).await;
            let s = &f.store;
            let kind = pb::SegmentKind::Rule as i32;
            let (a, created) = s
                .define_segment(&rule_segment("vip", "orders > 1"), kind, 0, T0)
                .await
                .unwrap();
            assert!(created);
            assert_eq!(a.version, 1);
            let (b, created) = s
                .define_segment(&rule_segment("vip", "orders > 1"), kind, 1, T0)
                .await
                .unwrap();
            assert!(!created);
            assert_eq!(b.version, 1, "an unchanged definition keeps its version");
            let (c, _) = s
                .define_segment(&rule_segment("vip", "orders > 2"), kind, 0, T0)
                .await
                .unwrap();
            assert_eq!(c.version, 2);
            let stale = s
                .define_segment(&rule_segment("vip", "orders > 3"), kind, 1, T0)
                .await;
            assert!(matches!(
                stale,
                Err(StoreError::VersionMismatch { actual: 2, .. })
            ));
            let create_with_version = s
                .define_segment(&rule_segment("new", "orders > 3"), kind, 4, T0)
                .await;
            assert!(matches!(
                create_with_version,
                Err(StoreError::VersionMismatch { actual: 0, .. })
            ));
            s.delete_segment("vip", T0).await.unwrap();
            assert!(
                s.delete_segment("vip", T0).await.unwrap().is_empty(),
                "idempotent"
            );
            let reuse = s
                .define_segment(&rule_segment("vip", "orders > 1"), kind, 0, T0)
                .await;
            assert!(matches!(reuse, Err(StoreError::SegmentDeleted(_))));
            assert!(matches!(
                s.delete_segment("never", T0).await,
                Err(StoreError::SegmentNotFound(_))
            ));
            assert!(s.live_segments().await.unwrap().is_empty());
        }

        #[tokio::test]
        async fn at_most_one_run_is_active_and_keys_are_idempotent() {
            let f = fixture($engine).await;
            let s = &f.store;
            let r1 = "00000000-0000-4000-8000-000000000001";
            let (a, created) = s.start_run(&run(r1, "k1")).await.unwrap();
            assert!(created);
            assert_eq!(a.state, pb::RecomputeState::Pending as i32);
            let (b, created) = s
                .start_run(&run("00000000-0000-4000-8000-000000000002", "k2"))
                .await
                .unwrap();
            assert!(!created);
            assert_eq!(b.run_id, r1, "the active run is returned");
            s.fail_run(r1, "boom", T0).await.unwrap();
            let (c, created) = s
                .start_run(&run("00000000-0000-4000-8000-000000000003", "k1"))
                .await
                .unwrap();
            assert!(!created);
            assert_eq!(c.run_id, r1, "the key's run is returned");
            assert_eq!(c.error_message, "boom");
            let (d, created) = s
                .start_run(&run("00000000-0000-4000-8000-000000000004", "k4"))
                .await
                .unwrap();
            assert!(created);
            assert_eq!(s.fail_interrupted_runs(T0).await.unwrap(), 1);
            assert_eq!(
                s.get_run(&d.run_id).await.unwrap().state,
                pb::RecomputeState::Failed as i32
            );
            assert!(matches!(
                s.get_run("nope").await,
                Err(StoreError::RunNotFound(_))
            ));
        }

        #[tokio::test]
        async fn publishing_runs_diffs_memberships_into_ordered_changes() {
            let f = fixture($engine).await;
            let s = &f.store;
            let kind = pb::SegmentKind::Rule as i32;
            s.define_segment(&rule_segment("vip", "orders > 1"), kind, 0, T0)
                .await
                .unwrap();
            let r1 = "00000000-0000-4000-8000-000000000001";
            s.start_run(&run(r1, "k1")).await.unwrap();
            let done = s
                .publish_run(publication(
                    r1,
                    vec![member("vip", "p1"), member("vip", "p2")],
                    T0 + 1,
                ))
                .await
                .unwrap();
            assert_eq!(done.state, pb::RecomputeState::Succeeded as i32);
            assert_eq!(done.outputs.as_ref().unwrap().entered, 2);
            assert_eq!(done.changes_cursor, "mc:2");
            let r2 = "00000000-0000-4000-8000-000000000002";
            s.start_run(&run(r2, "k2")).await.unwrap();
            let done = s
                .publish_run(publication(
                    r2,
                    vec![member("vip", "p2"), member("vip", "p3")],
                    T0 + 2,
                ))
                .await
                .unwrap();
            let out = done.outputs.unwrap();
            assert_eq!((out.entered, out.exited), (1, 1));
            let changes = s.changes_after(0, 100).await.unwrap();
            let seqs: Vec<i64> = changes.iter().map(|c| c.seq).collect();
            assert_eq!(seqs, vec![1, 2, 3, 4]);
            assert_eq!(changes[3].profile_id, "p1");
            assert_eq!(
                changes[3].change_type,
                pb::MembershipChangeType::Exited as i32
            );
            assert_eq!(changes[3].run_id, r2);
            assert_eq!(s.latest_run().await.unwrap().unwrap().run_id, r2);
            assert_eq!(s.run_member_count(r1, "vip", None).await.unwrap(), 2);
            let page = s.run_members(r2, "vip", None, "p2", 10).await.unwrap();
            assert_eq!(page, vec![("p3".to_owned(), -1)]);
            let sizes = s.segment_sizes(&["vip".into()]).await.unwrap();
            assert_eq!(sizes.get("vip"), Some(&2));
            let summary = s.run_summary(r1, "vip", None).await.unwrap();
            assert_eq!((summary.size, summary.scored, summary.revenue), (2, 1, 900));
            assert_eq!(s.run_totals(r1).await.unwrap(), (1, 900));
        }

        #[tokio::test]
        async fn the_rescore_read_returns_what_the_separate_reads_return() {
            let f = fixture($engine).await;
            let s = &f.store;
            let facts = vec![
                order("p1", "o1", T0, 1000),
                order("p1", "o2", T0 + DAY, 500),
                Fact::Refund {
                    profile_id: "p1".into(),
                    refund_key: "web/r1".into(),
                    order_id: "o1".into(),
                    amount_minor: 300,
                    full: false,
                },
                Fact::Engagement {
                    profile_id: "p1".into(),
                    at: T0 + DAY,
                    kind: "email_opened".into(),
                },
                Fact::Seen {
                    profile_id: "p2".into(),
                    at: T0,
                },
            ];
            s.apply_events("ingest", None, "log:1", &facts)
                .await
                .unwrap();
            let ids: Vec<String> = vec!["p2".into(), "p1".into(), "nobody".into()];
            let as_of = T0 + 2 * DAY;
            let before = s.rescore_read(&ids, as_of).await.unwrap();
            assert_eq!(before.latest_run, None);
            assert_eq!(before.profiles, s.load_profiles(&ids, as_of).await.unwrap());
            assert_eq!(before.profiles.len(), 2);
            assert!(before.previous.is_empty());
            s.define_segment(
                &rule_segment("vip", "orders > 1"),
                pb::SegmentKind::Rule as i32,
                0,
                T0,
            )
            .await
            .unwrap();
            let r1 = "00000000-0000-4000-8000-000000000001";
            s.start_run(&run(r1, "k1")).await.unwrap();
            let mut p = publication(r1, vec![member("vip", "p1")], T0 + 1);
            p.scores[0].lifecycle = Some(2);
            p.scores[0].lifecycle_since = Some(T0);
            s.publish_run(p).await.unwrap();
            let lifecycles = s.run_lifecycles(r1).await.unwrap();
            assert_eq!(lifecycles.len(), 1);
            assert_eq!(lifecycles.get("p1"), Some(&(2, T0)));
            let after = s.rescore_read(&ids, as_of).await.unwrap();
            assert_eq!(after.latest_run.as_deref(), Some(r1));
            assert_ne!(after.segments_stamp, before.segments_stamp);
            let prev = after.previous.get("p1").copied().unwrap();
            assert_eq!((prev.lifecycle, prev.lifecycle_since), (Some(2), Some(T0)));
            assert!(!after.previous.contains_key("p2"));
            // Real-time scores take precedence over the run's.
            let score = ScoreRow {
                profile_id: "p1".into(),
                lifecycle: Some(3),
                ..Default::default()
            };
            s.apply_realtime(
                r1,
                std::slice::from_ref(&score),
                &["vip".into()],
                &[],
                T0 + 5,
            )
            .await
            .unwrap();
            let prev = s.rescore_read(&ids, as_of).await.unwrap().previous["p1"];
            assert_eq!(
                (prev.lifecycle, prev.lifecycle_since, prev.scored_at),
                (Some(3), None, T0 + 5)
            );
        }

        #[tokio::test]
        async fn loading_every_profile_returns_what_loading_them_by_id_returns() {
            let f = fixture($engine).await;
            let s = &f.store;
            let mut facts = vec![
                order("p1", "o1", T0, 1000),
                order("p1", "o2", T0 + DAY, 500),
                Fact::Order {
                    profile_id: "odd\\id\twith\nescapes".into(),
                    order_id: "o\t1".into(),
                    placed_at: T0,
                    amount_minor: 700,
                    discount_minor: 20,
                    converted: true,
                    lines: vec![("books".into(), 300), ("home\\garden".into(), 400)],
                },
                Fact::Refund {
                    profile_id: "p1".into(),
                    refund_key: "web/r1".into(),
                    order_id: "o1".into(),
                    amount_minor: 300,
                    full: false,
                },
                Fact::Refund {
                    profile_id: "p1".into(),
                    refund_key: "web/r2".into(),
                    order_id: "o2".into(),
                    amount_minor: 500,
                    full: true,
                },
                Fact::Engagement {
                    profile_id: "p1".into(),
                    at: T0 + DAY,
                    kind: "email_opened".into(),
                },
                Fact::Seen {
                    profile_id: "p2".into(),
                    at: T0,
                },
            ];
            facts.push(Fact::Order {
                profile_id: "p3".into(),
                order_id: "o9".into(),
                placed_at: T0,
                amount_minor: 10,
                discount_minor: 0,
                converted: true,
                lines: Vec::new(),
            });
            s.apply_events("ingest", None, "log:1", &facts)
                .await
                .unwrap();
            let as_of = T0 + 2 * DAY;
            let all = s.load_all_profiles(as_of).await.unwrap();
            let ids: Vec<String> = all.iter().map(|d| d.profile_id.clone()).collect();
            assert_eq!(ids.len(), 4);
            assert_eq!(all, s.load_profiles(&ids, as_of).await.unwrap());
            let odd = all
                .iter()
                .find(|d| d.profile_id.starts_with("odd"))
                .unwrap();
            assert_eq!(odd.profile_id, "odd\\id\twith\nescapes");
            assert_eq!(odd.orders[0].lines.len(), 2);
            let p1 = all.iter().find(|d| d.profile_id == "p1").unwrap();
            assert_eq!(p1.orders.len(), 2);
            assert_eq!(
                (p1.orders[0].refunded_minor, p1.orders[1].fully_refunded),
                (300, true)
            );
            assert_eq!(p1.engagement.get("email_opened"), Some(&1));
        }

        #[tokio::test]
        async fn publishing_a_cluster_move_logs_the_exit_before_the_entry_then_the_exits() {
            let f = fixture($engine).await;
            let s = &f.store;
            s.define_segment(
                &rule_segment("vip", "orders > 1"),
                pb::SegmentKind::Rule as i32,
                0,
                T0,
            )
            .await
            .unwrap();
            let with = |profile: &str, cluster: i64| MemberRow {
                cluster_index: cluster,
                distance: Some(0.5),
                ..member("vip", profile)
            };
            let r1 = "00000000-0000-4000-8000-000000000001";
            s.start_run(&run(r1, "k1")).await.unwrap();
            s.publish_run(publication(
                r1,
                vec![with("p1", 0), with("p2", 1), with("p3", 2)],
                T0 + 1,
            ))
            .await
            .unwrap();
            let r2 = "00000000-0000-4000-8000-000000000002";
            s.start_run(&run(r2, "k2")).await.unwrap();
            let done = s
                .publish_run(publication(
                    r2,
                    vec![with("p4", 0), with("p2", 2), with("p3", 2)],
                    T0 + 2,
                ))
                .await
                .unwrap();
            let out = done.outputs.unwrap();
            assert_eq!((out.entered, out.exited), (2, 2));
            use pb::MembershipChangeType as C;
            let got: Vec<(String, i64, i32)> = s
                .changes_after(3, 100)
                .await
                .unwrap()
                .into_iter()
                .map(|c| (c.profile_id, c.cluster_index, c.change_type))
                .collect();
            assert_eq!(
                got,
                vec![
                    ("p4".to_owned(), 0, C::Entered as i32),
                    ("p2".to_owned(), 1, C::Exited as i32),
                    ("p2".to_owned(), 2, C::Entered as i32),
                    ("p1".to_owned(), 0, C::Exited as i32),
                ]
            );
            let now = s.memberships_of(&["p2".into(), "p3".into()]).await.unwrap();
            let entered: Vec<(i64, i64)> = now
                .iter()
                .map(|m| (m.cluster_index, m.entered_at))
                .collect();
            assert_eq!(entered, vec![(2, T0 + 2), (2, T0 + 1)]);
            assert_eq!(s.run_member_count(r2, "vip", None).await.unwrap(), 3);
            assert_eq!(s.run_member_count(r2, "vip", Some(2)).await.unwrap(), 2);
        }

        #[tokio::test]
        async fn a_realtime_cluster_move_appends_the_exit_before_the_entry() {
            let f = fixture($engine).await;
            let s = &f.store;
            s.define_segment(
                &rule_segment("vip", "orders > 1"),
                pb::SegmentKind::Rule as i32,
                0,
                T0,
            )
            .await
            .unwrap();
            s.define_segment(
                &rule_segment("big", "orders > 5"),
                pb::SegmentKind::Rule as i32,
                0,
                T0,
            )
            .await
            .unwrap();
            let score = ScoreRow {
                profile_id: "p1".into(),
                ..Default::default()
            };
            let segs: Vec<String> = vec!["vip".into(), "big".into()];
            let mut vip = member("vip", "p1");
            vip.cluster_index = 0;
            s.apply_realtime(
                "r",
                std::slice::from_ref(&score),
                &segs,
                &[vip.clone(), member("big", "p1")],
                T0,
            )
            .await
            .unwrap();
            vip.cluster_index = 1;
            let changes = s
                .apply_realtime("r", std::slice::from_ref(&score), &segs, &[vip], T0 + 1)
                .await
                .unwrap();
            use pb::MembershipChangeType as C;
            let got: Vec<(&str, i64, i32)> = changes
                .iter()
                .map(|c| (c.segment_id.as_str(), c.cluster_index, c.change_type))
                .collect();
            assert_eq!(
                got,
                vec![
                    ("vip", 0, C::Exited as i32),
                    ("vip", 1, C::Entered as i32),
                    ("big", -1, C::Exited as i32)
                ]
            );
            assert!(changes.windows(2).all(|w| w[0].seq < w[1].seq));
            assert_eq!(s.changes_after(2, 10).await.unwrap(), changes);
            let now = s.memberships_of(&["p1".into()]).await.unwrap();
            assert_eq!(now.len(), 1);
            assert_eq!((now[0].cluster_index, now[0].entered_at), (1, T0 + 1));
        }

        #[tokio::test]
        async fn a_runs_members_stay_as_published_through_realtime_moves_merges_and_deletion() {
            let f = fixture($engine).await;
            let s = &f.store;
            let kind = pb::SegmentKind::Rule as i32;
            for id in ["vip", "big"] {
                s.define_segment(&rule_segment(id, "orders > 1"), kind, 0, T0)
                    .await
                    .unwrap();
            }
            let members = |s: &'static str, ps: &[(&str, i64)]| -> Vec<MemberRow> {
                ps.iter()
                    .map(|(p, c)| MemberRow {
                        cluster_index: *c,
                        ..member(s, p)
                    })
                    .collect()
            };
            let list = |v: &[(&str, i64)]| -> Vec<(String, i64)> {
                v.iter().map(|(p, c)| ((*p).to_owned(), *c)).collect()
            };
            let r1 = "00000000-0000-4000-8000-000000000001";
            s.start_run(&run(r1, "k1")).await.unwrap();
            let mut p1 = publication(r1, members("vip", &[("p1", 0), ("p2", 0), ("p3", 1)]), T0);
            p1.members.extend(members("big", &[("p1", -1)]));
            p1.segments = vec![("vip".into(), 1), ("big".into(), 1)];
            s.publish_run(p1).await.unwrap();
            // Between runs: p1 leaves vip, p2 moves cluster, p4 enters and leaves again.
            let score = |p: &str| ScoreRow {
                profile_id: p.into(),
                ..Default::default()
            };
            let vip = vec!["vip".to_owned()];
            s.apply_realtime("r", &[score("p1")], &vip, &[], T0 + 1)
                .await
                .unwrap();
            s.apply_realtime(
                "r",
                &[score("p2")],
                &vip,
                &members("vip", &[("p2", 1)]),
                T0 + 1,
            )
            .await
            .unwrap();
            s.apply_realtime(
                "r",
                &[score("p4")],
                &vip,
                &members("vip", &[("p4", 0)]),
                T0 + 1,
            )
            .await
            .unwrap();
            s.apply_realtime(
                "r",
                &[score("p4")],
                &vip,
                &members("vip", &[("p4", 1)]),
                T0 + 1,
            )
            .await
            .unwrap();
            s.apply_realtime("r", &[score("p4")], &vip, &[], T0 + 1)
                .await
                .unwrap();
            // p3 is merged into p2.
            s.apply_profile_events(
                "profiles",
                None,
                "1",
                &[ProfileEvent::Merged {
                    survivor: "p2".into(),
                    merged: vec!["p3".into()],
                }],
                T0 + 1,
            )
            .await
            .unwrap();
            let r1_vip = list(&[("p1", 0), ("p2", 0), ("p3", 1)]);
            assert_eq!(
                s.run_members(r1, "vip", None, "", 10).await.unwrap(),
                r1_vip
            );
            assert_eq!(s.run_member_count(r1, "vip", Some(0)).await.unwrap(), 2);
            let now = s
                .memberships_of(&["p1".into(), "p2".into(), "p4".into()])
                .await
                .unwrap();
            let now: Vec<(&str, &str, i64)> = now
                .iter()
                .map(|m| {
                    (
                        m.profile_id.as_str(),
                        m.segment_id.as_str(),
                        m.cluster_index,
                    )
                })
                .collect();
            assert_eq!(now, vec![("p1", "big", -1), ("p2", "vip", 1)]);

            // The next run diffs against the current memberships: only p5 enters.
            let r2 = "00000000-0000-4000-8000-000000000002";
            s.start_run(&run(r2, "k2")).await.unwrap();
            let mut p2 = publication(r2, members("vip", &[("p2", 1), ("p5", 0)]), T0 + 2);
            p2.members.extend(members("big", &[("p1", -1)]));
            p2.segments = vec![("vip".into(), 1), ("big".into(), 1)];
            let done = s.publish_run(p2).await.unwrap();
            let out = done.outputs.unwrap();
            assert_eq!((out.entered, out.exited), (1, 0));
            assert_eq!(
                s.run_members(r1, "vip", None, "", 10).await.unwrap(),
                r1_vip
            );
            assert_eq!(
                s.run_members(r2, "vip", None, "", 10).await.unwrap(),
                list(&[("p2", 1), ("p5", 0)])
            );
            let mut rows = s
                .run_member_rows(r1, &["vip".into(), "big".into()])
                .await
                .unwrap();
            rows.sort();
            assert_eq!(rows.len(), 4);
            assert_eq!(rows[0], ("p1".into(), "big".into(), -1));

            // Deleting vip keeps it in both runs' snapshots.
            s.delete_segment("vip", T0 + 3).await.unwrap();
            assert_eq!(
                s.segment_sizes(&["vip".into()]).await.unwrap().get("vip"),
                None
            );
            assert_eq!(s.run_member_count(r1, "vip", None).await.unwrap(), 3);
            assert_eq!(s.run_member_count(r2, "vip", None).await.unwrap(), 2);

            // Erasure forgets the person in every retained snapshot.
            s.apply_profile_events(
                "profiles",
                Some("1"),
                "2",
                &[ProfileEvent::Erased("p1".into())],
                T0 + 3,
            )
            .await
            .unwrap();
            assert_eq!(s.run_member_count(r1, "vip", None).await.unwrap(), 2);
            assert_eq!(s.run_member_count(r2, "big", None).await.unwrap(), 0);

            // A run beyond retained_runs answers nothing any more.
            let r3 = "00000000-0000-4000-8000-000000000003";
            s.start_run(&run(r3, "k3")).await.unwrap();
            let mut p3 = publication(r3, members("big", &[("p2", -1)]), T0 + 4);
            p3.segments = vec![("big".into(), 1)];
            p3.retained_runs = 1;
            s.publish_run(p3).await.unwrap();
            assert_eq!(s.run_member_count(r1, "vip", None).await.unwrap(), 0);
            assert_eq!(s.run_member_count(r2, "vip", None).await.unwrap(), 0);
            assert_eq!(
                s.run_members(r3, "big", None, "", 10).await.unwrap(),
                list(&[("p2", -1)])
            );
            // A segment the run did not evaluate has no members in it.
            assert_eq!(s.run_member_count(r3, "vip", None).await.unwrap(), 0);
        }

        #[tokio::test]
        async fn a_run_that_scored_nobody_stays_retained_until_pruned() {
            let f = fixture($engine).await;
            let s = &f.store;
            let ids: Vec<String> = (1..=3)
                .map(|i| format!("00000000-0000-4000-8000-00000000000{i}"))
                .collect();
            for (i, id) in ids.iter().enumerate() {
                s.start_run(&run(id, &format!("k{i}"))).await.unwrap();
                let mut p = publication(id, Vec::new(), T0 + 1 + i64::try_from(i).unwrap());
                p.scores.clear();
                p.retained_runs = 2;
                s.publish_run(p).await.unwrap();
            }
            assert!(
                !s.run_retained(&ids[0]).await.unwrap(),
                "beyond retained_runs"
            );
            assert!(s.run_retained(&ids[1]).await.unwrap(), "empty but retained");
            assert!(s.run_retained(&ids[2]).await.unwrap());
        }

        #[tokio::test]
        async fn merges_move_facts_to_the_survivor_and_erasure_forgets_everything() {
            let f = fixture($engine).await;
            let s = &f.store;
            s.apply_events(
                "ingest",
                None,
                "log:2",
                &[order("a", "o1", T0, 100), order("b", "o2", T0, 200)],
            )
            .await
            .unwrap();
            s.define_segment(
                &rule_segment("vip", "orders > 0"),
                pb::SegmentKind::Rule as i32,
                0,
                T0,
            )
            .await
            .unwrap();
            let r1 = "00000000-0000-4000-8000-000000000001";
            s.start_run(&run(r1, "k1")).await.unwrap();
            s.publish_run(publication(
                r1,
                vec![member("vip", "a"), member("vip", "b")],
                T0,
            ))
            .await
            .unwrap();
            let (touched, changes) = s
                .apply_profile_events(
                    "profiles",
                    None,
                    "7",
                    &[ProfileEvent::Merged {
                        survivor: "a".into(),
                        merged: vec!["b".into()],
                    }],
                    T0,
                )
                .await
                .unwrap();
            assert!(touched.contains("a"));
            assert_eq!(changes.len(), 1);
            assert_eq!(changes[0].profile_id, "b");
            assert_eq!(
                changes[0].reason,
                pb::MembershipChangeReason::ProfileMerged as i32
            );
            assert_eq!(s.resolve_profile("b").await.unwrap().as_deref(), Some("a"));
            // A late event of the merged id lands on the survivor.
            s.apply_events(
                "ingest",
                Some("log:2"),
                "log:3",
                &[order("b", "o3", T0, 300)],
            )
            .await
            .unwrap();
            let data = s.load_profiles(&["a".into()], T0 + DAY).await.unwrap();
            assert_eq!(data[0].orders.len(), 3);
            let (_, changes) = s
                .apply_profile_events(
                    "profiles",
                    Some("7"),
                    "8",
                    &[ProfileEvent::Erased("a".into())],
                    T0,
                )
                .await
                .unwrap();
            assert_eq!(
                changes[0].reason,
                pb::MembershipChangeReason::ProfileErased as i32
            );
            assert_eq!(s.resolve_profile("a").await.unwrap(), None);
            assert!(s.load_profiles(&["a".into()], T0).await.unwrap().is_empty());
            assert_eq!(s.run_member_count(r1, "vip", None).await.unwrap(), 0);
        }

        #[tokio::test]
        async fn realtime_updates_replace_only_the_evaluated_segments() {
            let f = fixture($engine).await;
            let s = &f.store;
            let kind = pb::SegmentKind::Rule as i32;
            s.define_segment(&rule_segment("vip", "orders > 1"), kind, 0, T0)
                .await
                .unwrap();
            s.define_segment(&rule_segment("big", "orders > 5"), kind, 0, T0)
                .await
                .unwrap();
            s.apply_events("ingest", None, "log:1", &[order("p1", "o1", T0, 100)])
                .await
                .unwrap();
            let score = ScoreRow {
                profile_id: "p1".into(),
                ..Default::default()
            };
            let c1 = s
                .apply_realtime(
                    "r",
                    std::slice::from_ref(&score),
                    &["vip".into(), "big".into()],
                    &[member("vip", "p1"), member("big", "p1")],
                    T0,
                )
                .await
                .unwrap();
            assert_eq!(c1.len(), 2);
            let c2 = s
                .apply_realtime(
                    "r",
                    std::slice::from_ref(&score),
                    &["vip".into()],
                    &[],
                    T0 + 1,
                )
                .await
                .unwrap();
            assert_eq!(c2.len(), 1);
            assert_eq!(c2[0].segment_id, "vip");
            assert_eq!(c2[0].reason, pb::MembershipChangeReason::Realtime as i32);
            let now: Vec<String> = s
                .memberships_of(&["p1".into()])
                .await
                .unwrap()
                .into_iter()
                .map(|m| m.segment_id)
                .collect();
            assert_eq!(now, vec!["big".to_owned()]);
            let (row, run, at) = s.profile_scores("p1").await.unwrap().unwrap();
            assert_eq!(
                (row.profile_id.as_str(), run.as_str(), at),
                ("p1", "r", T0 + 1)
            );
        }
    };
}

mod postgres {
    conformance!(Engine::Postgres);

    use sqlx::Connection as _;

    /// The membership indexes of `schema`, by name.
    async fn member_indexes(conn: &mut sqlx::PgConnection, schema: &str) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT indexname::text FROM pg_indexes WHERE schemaname = $1 \
             AND tablename = 'seg_memberships' ORDER BY indexname",
        )
        .bind(schema)
        .fetch_all(conn)
        .await
        .unwrap()
    }

    /// A first run loads its memberships with the indexes dropped and rebuilt; the table ends
    /// up as migrated. With a reader holding the table past the lock timeout, the run loads
    /// through the indexes instead, with the same result.
    #[tokio::test]
    async fn a_bulk_first_publication_rebuilds_the_membership_indexes_or_waits_for_none() {
        for busy in [false, true] {
            let url = testing::postgres_url();
            let schema = testing::unique_schema("segmentation");
            let target = DatabaseTarget::Postgres {
                url: url.clone(),
                schema: schema.clone(),
            };
            let database = db::open(&target, 4, &POSTGRES_MIGRATIONS, &SQLITE_MIGRATIONS, "seg")
                .await
                .unwrap();
            let s = SqlSegmentationStore::connect_postgres(database, &url, &schema, 2)
                .await
                .unwrap();
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            let migrated = member_indexes(&mut conn, &schema).await;
            assert_eq!(
                migrated,
                [
                    "seg_memberships_by_profile",
                    "seg_memberships_closed",
                    "seg_memberships_pkey"
                ]
            );
            let kind = pb::SegmentKind::Rule as i32;
            s.define_segment(&rule_segment("vip", "orders > 1"), kind, 0, T0)
                .await
                .unwrap();
            let mut reader = sqlx::PgConnection::connect(&url).await.unwrap();
            if busy {
                sqlx::query("BEGIN").execute(&mut reader).await.unwrap();
                sqlx::query(&format!("SELECT 1 FROM {schema}.seg_memberships LIMIT 1"))
                    .execute(&mut reader)
                    .await
                    .unwrap();
            }
            let r1 = "00000000-0000-4000-8000-000000000001";
            s.start_run(&run(r1, "k1")).await.unwrap();
            let done = s
                .publish_run(publication(
                    r1,
                    vec![member("vip", "p1"), member("vip", "p2")],
                    T0 + 1,
                ))
                .await
                .unwrap();
            if busy {
                sqlx::query("COMMIT").execute(&mut reader).await.unwrap();
            }
            assert_eq!(done.outputs.as_ref().unwrap().entered, 2);
            assert_eq!(done.changes_cursor, "mc:2");
            assert_eq!(
                member_indexes(&mut conn, &schema).await,
                migrated,
                "busy: {busy}"
            );
            assert_eq!(s.run_member_count(r1, "vip", None).await.unwrap(), 2);
            let after = s.changes_after(0, 10).await.unwrap();
            let seqs: Vec<i64> = after.iter().map(|c| c.seq).collect();
            assert_eq!(seqs, [1, 2]);
            // The next change takes the next sequence number.
            s.delete_segment("vip", T0 + 2).await.unwrap();
            let after = s.changes_after(2, 10).await.unwrap();
            assert_eq!(after.iter().map(|c| c.seq).collect::<Vec<_>>(), [3, 4]);
        }
    }
}

mod sqlite {
    conformance!(Engine::Sqlite);
}
