//! OfferService with the real upstream services in process: eligibility by rule expression
//! and request attributes, loyalty rules at accrual (spend-qualified tiers, segment
//! multipliers, per-day caps from a programme file), and erasure from ProfileService's change
//! feed. Every test runs on PostgreSQL and on SQLite.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use chrono::{Duration, TimeZone, Utc};
use clientele_offers::catalogue::SegmentId;
use clientele_offers::earning::{CapPeriod, PeriodCap};
use clientele_offers::money::CurrencyCode;
use clientele_offers::program::Program;
use clientele_offers::tiers::QualifyingMetric;
use clientele_proto::v1 as pb;
use clientele_runtime::status::violated_field;
use support::{Engine, Served, offer, order, serve, serve_with};

fn value_i(i: i64) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::IntValue(i)),
    }
}

fn ruled(id: &str, rule: &str, priority: i32) -> pb::Offer {
    pb::Offer {
        eligibility: Some(pb::Eligibility {
            rule_expression: rule.into(),
            ..Default::default()
        }),
        priority,
        ..offer(id)
    }
}

async fn create(s: &Served, o: pb::Offer) -> Result<pb::Offer, tonic::Status> {
    s.client()
        .create_offer(pb::CreateOfferRequest { offer: Some(o) })
        .await
        .map(|r| r.into_inner().offer.unwrap())
}

async fn decide(
    s: &Served,
    profile_id: &str,
    attributes: &[(&str, pb::Value)],
) -> Result<pb::DecideResponse, tonic::Status> {
    s.client()
        .decide(pb::DecideRequest {
            profile_id: profile_id.into(),
            channel: pb::Channel::Web as i32,
            explain: true,
            dry_run: true,
            attributes: attributes
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.clone()))
                .collect(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

fn rejection<'a>(d: &'a pb::DecideResponse, offer_id: &str) -> &'a pb::OfferRejection {
    &d.rejected
        .iter()
        .find(|r| r.offer_id == offer_id)
        .unwrap_or_else(|| panic!("{offer_id} not rejected: {d:?}"))
        .rejections[0]
}

async fn rules_are_checked_at_definition_and_decide_explains_them(engine: Engine) {
    let s = serve(engine).await;
    // A typo is refused when the offer is defined, naming the field and the position.
    let err = create(&s, ruled("typo", "orders >= 3 and recncy_days < 30", 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        violated_field(&err).as_deref(),
        Some("offer.eligibility.rule_expression")
    );
    assert!(err.message().contains("1:17"), "{}", err.message());
    assert!(
        err.message().contains("byte offset 16"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("recency_days"), "{}", err.message());
    let err = create(&s, ruled("share", r#"category_share("books") > 0.5"#, 1))
        .await
        .unwrap_err();
    assert_eq!(
        violated_field(&err).as_deref(),
        Some("offer.eligibility.rule_expression")
    );

    create(
        &s,
        ruled(
            "big-cart",
            r#"trait("cart_value") >= 5000 and tier == "bronze""#,
            10,
        ),
    )
    .await
    .unwrap();
    create(&s, ruled("vip-trait", r#"trait("vip") == true"#, 5))
        .await
        .unwrap();
    create(&s, ruled("likely-churn", "p_alive < 0.3", 1))
        .await
        .unwrap();

    let pid = s.profile_id("rules-1").await;
    // Rule-targeted offers are targeted: they need personalisation consent.
    s.grant(&pid, pb::ConsentPurpose::Personalisation).await;
    s.profiles()
        .update_traits(pb::UpdateTraitsRequest {
            profile_id: pid.clone(),
            set: [(
                "vip".to_string(),
                pb::Value {
                    kind: Some(pb::value::Kind::BoolValue(true)),
                },
            )]
            .into(),
            remove: Vec::new(),
        })
        .await
        .unwrap();

    let d = decide(&s, &pid, &[("cart_value", value_i(6_000))])
        .await
        .unwrap();
    let ids: Vec<&str> = d
        .offers
        .iter()
        .map(|o| o.offer.as_ref().unwrap().offer_id.as_str())
        .collect();
    assert_eq!(ids, ["big-cart", "vip-trait"], "{d:?}");
    let reason = d.offers[0]
        .reasons
        .iter()
        .find(|r| r.code == pb::EligibilityReasonCode::RuleMatched as i32)
        .unwrap();
    assert!(reason.detail.contains("cart_value"), "{reason:?}");
    // No segmentation scores yet: p_alive is unknown, so the rule does not match and says why.
    let r = rejection(&d, "likely-churn");
    assert_eq!(r.code, pb::RejectionCode::RuleNotMatched as i32);
    assert!(r.detail.contains("p_alive"), "{r:?}");

    // The request's attribute decides: a small cart does not qualify.
    let d = decide(&s, &pid, &[("cart_value", value_i(100))])
        .await
        .unwrap();
    let r = rejection(&d, "big-cart");
    assert_eq!(r.code, pb::RejectionCode::RuleNotMatched as i32);
    assert!(r.detail.contains("false"), "{r:?}");

    // Attributes are validated, naming the key.
    let err = decide(&s, &pid, &[("Cart", value_i(1))]).await.unwrap_err();
    assert_eq!(violated_field(&err).as_deref(), Some("attributes[Cart]"));
}

/// Tiers by USD spend (silver from USD 100, ×2), a "vip" segment earning ×4, at most 200
/// points a day.
fn programme() -> Program {
    let mut p = Program::builtin();
    p.tiers.metric = QualifyingMetric::Spend {
        currency: CurrencyCode::new("USD").unwrap(),
    };
    p.tiers.tiers[1].threshold = 10_000;
    p.tiers.tiers[1].benefits.points_multiplier_bp = 20_000;
    p.tiers.tiers[2].threshold = 100_000;
    p.earning
        .segment_multipliers
        .insert(SegmentId::new("vip"), 40_000);
    p.earning.max_combined_multiplier_bp = 50_000;
    p.earning.caps = vec![PeriodCap {
        period: CapPeriod::Day,
        max_points: 200,
    }];
    p
}

fn order_at(customer: &str, n: usize, at: chrono::DateTime<Utc>, amount: i64) -> pb::Event {
    let mut e = order(customer, n, 0.0, amount);
    e.occurred_at = Some(clientele_runtime::time::timestamp(at.timestamp_micros()));
    e
}

async fn balance(s: &Served, pid: &str) -> pb::GetBalanceResponse {
    s.client()
        .get_balance(pb::GetBalanceRequest {
            profile_id: pid.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn spend_tiers_segment_multipliers_and_day_caps_apply_at_accrual(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("programme.toml");
    std::fs::write(&file, toml::to_string(&programme()).unwrap()).unwrap();
    let s = serve_with(engine, |settings| {
        settings.offers.program_file = Some(file.clone());
    })
    .await;
    let tiers = s
        .client()
        .list_tiers(pb::ListTiersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        tiers.rules.unwrap().qualifying_metric,
        pb::QualifyingMetric::Spend as i32
    );

    // Spend tiers: USD 150 makes silver (150 points is far below any points threshold), so
    // the next order earns ×2.
    s.ingest(vec![
        order("spender", 1, 2.0, 15_000),
        order("spender", 2, 1.0, 5_000),
    ])
    .await;
    // Day cap: two orders on one UTC day earn at most 200 points together.
    let day = Utc::now().date_naive() - Duration::days(1);
    let ten = Utc.from_utc_datetime(&day.and_hms_opt(10, 0, 0).unwrap());
    s.ingest(vec![
        order_at("capped", 1, ten, 15_000),
        order_at("capped", 2, ten + Duration::hours(1), 10_000),
    ])
    .await;
    s.sync().await;
    let spender = s.profile_id("spender").await;
    let b = balance(&s, &spender).await;
    assert_eq!(b.available_points, 150 + 2 * 50, "{b:?}");
    let tier = b.tier.unwrap();
    assert_eq!(tier.tier_id, "silver");
    assert_eq!(tier.qualifying_value, 20_000);
    let capped = s.profile_id("capped").await;
    assert_eq!(balance(&s, &capped).await.available_points, 200);

    // Segment multiplier: once segmentation puts the customer in "vip", orders earn ×4.
    s.seg()
        .define_segment(pb::DefineSegmentRequest {
            segment: Some(pb::Segment {
                segment_id: "vip".into(),
                display_name: "VIP".into(),
                definition: Some(pb::segment::Definition::Rule(pb::RuleDefinition {
                    expression: r#"orders >= 1 and trait("vip") == true"#.into(),
                })),
                ..Default::default()
            }),
            expected_version: 0,
        })
        .await
        .unwrap();
    s.ingest(vec![order("vip-1", 1, 3.0, 1_000)]).await;
    s.sync().await;
    let vip = s.profile_id("vip-1").await;
    s.profiles()
        .update_traits(pb::UpdateTraitsRequest {
            profile_id: vip.clone(),
            set: [(
                "vip".to_string(),
                pb::Value {
                    kind: Some(pb::value::Kind::BoolValue(true)),
                },
            )]
            .into(),
            remove: Vec::new(),
        })
        .await
        .unwrap();
    s.sync().await;
    s.recompute("vip-run").await;
    assert_eq!(balance(&s, &vip).await.available_points, 10);
    s.ingest(vec![order("vip-1", 2, 0.5, 2_000)]).await;
    s.sync().await;
    assert_eq!(balance(&s, &vip).await.available_points, 10 + 4 * 20);
    // Redelivery changes nothing (exactly once, same tier and caps on replay).
    s.consumers.catch_up().await.unwrap();
    assert_eq!(balance(&s, &vip).await.available_points, 90);
}

async fn erasure_removes_offers_points_and_tier_activity_once(engine: Engine) {
    let s = serve(engine).await;
    let mut c = s.client();
    create(&s, support::with_budget(offer("perk"), 5))
        .await
        .unwrap();
    s.ingest(vec![order("erase-me", 1, 1.0, 12_000)]).await;
    s.sync().await;
    let pid = s.profile_id("erase-me").await;
    c.issue_offer(pb::IssueOfferRequest {
        profile_id: pid.clone(),
        offer_id: "perk".into(),
        idempotency_key: "k1".into(),
        channel: pb::Channel::Web as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(balance(&s, &pid).await.available_points, 120);
    let store = s.offers.store().clone();
    assert_eq!(store.list_issued(&pid, 0, 100).await.unwrap().len(), 1);

    s.profiles()
        .erase_profile(pb::EraseProfileRequest {
            profile_id: pid.clone(),
            reason: "gdpr-art17 ticket 1".into(),
        })
        .await
        .unwrap();
    s.sync().await;

    assert!(store.is_erased(&pid).await.unwrap());
    assert!(store.list_issued(&pid, 0, 100).await.unwrap().is_empty());
    assert!(store.ledger(&pid).await.unwrap().1.is_empty());
    assert!(store.activity(&pid).await.unwrap().is_empty());
    let (per_offer, times) = store.profile_usage(&pid).await.unwrap();
    assert!(per_offer.is_empty() && times.is_empty());
    // The budget already spent stays spent.
    let o = c
        .get_offer(pb::GetOfferRequest {
            offer_id: "perk".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .offer
        .unwrap();
    assert_eq!(o.usage.unwrap().issued, 1);
    // Idempotent: the feed again, or a direct second erasure, finds nothing left.
    s.consumers.catch_up().await.unwrap();
    let again = store.erase_profile(&pid, None).await.unwrap();
    assert_eq!(again, clientele_offers::store::ErasureOutcome::default());
    let err = decide(&s, &pid, &[]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    // Others are untouched.
    s.ingest(vec![order("keep-me", 1, 1.0, 5_000)]).await;
    s.sync().await;
    let keep = s.profile_id("keep-me").await;
    assert_eq!(balance(&s, &keep).await.available_points, 50);
}

async fn update_mask_sets_one_eligibility_field_and_refuses_other_nested_paths(engine: Engine) {
    let s = serve(engine).await;
    let mut base = offer("upd");
    base.eligibility = Some(pb::Eligibility {
        tier_ids: vec!["gold".into()],
        channels: vec![pb::Channel::Web as i32],
        ..Default::default()
    });
    create(&s, base.clone()).await.unwrap();
    let update = |paths: &[&str], e: pb::Eligibility| pb::UpdateOfferRequest {
        offer: Some(pb::Offer {
            eligibility: Some(e),
            ..base.clone()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_string()).collect(),
        }),
        expected_version: 0,
    };
    let silver_only = pb::Eligibility {
        tier_ids: vec!["silver".into()],
        ..Default::default()
    };
    let o = s
        .client()
        .update_offer(update(&["eligibility.tier_ids"], silver_only.clone()))
        .await
        .unwrap()
        .into_inner()
        .offer
        .unwrap();
    let e = o.eligibility.unwrap();
    assert_eq!(e.tier_ids, ["silver"]);
    assert_eq!(e.channels, [pb::Channel::Web as i32], "other fields kept");
    assert_eq!(o.version, 2);

    for (paths, field) in [
        (&["budget.max_issued"][..], "update_mask.paths[0]"),
        (
            &["priority", "eligibility.nope"][..],
            "update_mask.paths[1]",
        ),
    ] {
        let err = s
            .client()
            .update_offer(update(paths, silver_only.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(violated_field(&err).as_deref(), Some(field), "{paths:?}");
    }
    let err = s
        .client()
        .update_offer(update(
            &["eligibility.rule_expression"],
            pb::Eligibility {
                rule_expression: "orders >>= 2".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        violated_field(&err).as_deref(),
        Some("offer.eligibility.rule_expression")
    );
}

fn email(address: &str) -> pb::IdentifierSet {
    pb::IdentifierSet {
        identifiers: vec![pb::Identifier {
            r#type: pb::IdentifierType::Email as i32,
            value: address.into(),
            namespace: String::new(),
        }],
    }
}

async fn resolve(s: &Served, identifiers: pb::IdentifierSet) -> String {
    s.profiles()
        .resolve(pb::ResolveRequest {
            identifiers: Some(identifiers),
        })
        .await
        .unwrap()
        .into_inner()
        .profile_id
}

async fn a_merge_from_the_profile_feed_moves_points_once_and_refunds_follow(engine: Engine) {
    let s = serve(engine).await;
    s.ingest(vec![order("m-old", 1, 2.0, 10_000)]).await;
    let mut second = order("m-new", 1, 1.0, 5_000);
    second.identifiers = Some(email("m-new@example.com"));
    s.ingest(vec![second]).await;
    s.sync().await;
    let old = s.profile_id("m-old").await;
    let new = resolve(&s, email("m-new@example.com")).await;
    assert_ne!(old, new);
    assert_eq!(balance(&s, &old).await.available_points, 100);
    assert_eq!(balance(&s, &new).await.available_points, 50);

    // One request naming both links them: the older profile survives.
    let mut both = support::ids("m-old");
    both.identifiers
        .extend(email("m-new@example.com").identifiers);
    assert_eq!(resolve(&s, both).await, old);
    s.sync().await;
    assert_eq!(balance(&s, &old).await.available_points, 150);
    assert_eq!(balance(&s, &new).await.available_points, 0);
    // The change read again (a redelivery) moves nothing.
    let store = s.offers.store().clone();
    store
        .set_cursor(clientele_offers::consumers::PROFILES_FEED, "0")
        .await
        .unwrap();
    s.consumers.catch_up().await.unwrap();
    assert_eq!(balance(&s, &old).await.available_points, 150);

    // A refund of the loser's order reverses its points from the survivor.
    let mut r = support::refund("m-new", "m-new-r1", "m-new-1", 2_500);
    r.identifiers = Some(email("m-new@example.com"));
    s.ingest(vec![r]).await;
    s.sync().await;
    assert_eq!(balance(&s, &old).await.available_points, 125);
    // The loser's order redelivered is not accrued again.
    let mut again = order("m-new", 1, 1.0, 5_000);
    again.identifiers = Some(email("m-new@example.com"));
    again.event_id = "m-new-o1-redelivered".into();
    s.ingest(vec![again]).await;
    s.sync().await;
    assert_eq!(balance(&s, &old).await.available_points, 125);
}

macro_rules! service_tests {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Engine::Postgres).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Engine::Sqlite).await;
                }
            )*
        }
    };
}

service_tests!(
    rules_are_checked_at_definition_and_decide_explains_them,
    spend_tiers_segment_multipliers_and_day_caps_apply_at_accrual,
    erasure_removes_offers_points_and_tier_activity_once,
    update_mask_sets_one_eligibility_field_and_refuses_other_nested_paths,
    a_merge_from_the_profile_feed_moves_points_once_and_refunds_follow,
);
