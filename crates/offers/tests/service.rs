//! OfferService end to end with the real upstream services in process (Profile, Ingest,
//! Segmentation, Experiment): points from order events, consent, codes, triggers, and the
//! seeds' four segment strategies from events to segments to offers. Every test runs on
//! PostgreSQL and on SQLite.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};

use clientele_proto::v1 as pb;
use clientele_runtime::status::violated_field;
use support::{Engine, Served, eur, event, offer, order, refund, serve, usd};

fn decide_req(profile_id: &str, channel: pb::Channel) -> pb::DecideRequest {
    pb::DecideRequest {
        profile_id: profile_id.into(),
        channel: channel as i32,
        explain: true,
        dry_run: true,
        ..Default::default()
    }
}

fn issue_req(
    profile_id: &str,
    offer_id: &str,
    key: &str,
    channel: pb::Channel,
) -> pb::IssueOfferRequest {
    pb::IssueOfferRequest {
        profile_id: profile_id.into(),
        offer_id: offer_id.into(),
        idempotency_key: key.into(),
        channel: channel as i32,
        ..Default::default()
    }
}

fn targeted(id: &str, segment: &str, benefit: pb::offer::Benefit, priority: i32) -> pb::Offer {
    pb::Offer {
        benefit: Some(benefit),
        eligibility: Some(pb::Eligibility {
            include_segments: vec![pb::SegmentRef {
                segment_id: segment.into(),
                cluster_index: None,
            }],
            ..Default::default()
        }),
        priority,
        transactional: false,
        ..offer(id)
    }
}

async fn create(s: &Served, o: pb::Offer) -> pb::Offer {
    s.client()
        .create_offer(pb::CreateOfferRequest { offer: Some(o) })
        .await
        .unwrap()
        .into_inner()
        .offer
        .unwrap()
}

async fn bad_input_names_the_field(engine: Engine) {
    let s = serve(engine).await;
    let mut c = s.client();
    let err = c
        .redeem_points(pb::RedeemPointsRequest {
            profile_id: "not-a-uuid".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&err).as_deref(), Some("profile_id"));
    let mut o = offer("Bad Id");
    let err = c
        .create_offer(pb::CreateOfferRequest {
            offer: Some(o.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&err).as_deref(), Some("offer.offer_id"));
    o.offer_id = "ok".into();
    o.priority = 5000;
    let err = c
        .create_offer(pb::CreateOfferRequest { offer: Some(o) })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&err).as_deref(), Some("offer.priority"));
    let err = c
        .decide(pb::DecideRequest {
            profile_id: uuid::Uuid::new_v4().to_string(),
            channel: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&err).as_deref(), Some("channel"));
    let err = c
        .adjust_points(pb::AdjustPointsRequest {
            profile_id: uuid::Uuid::new_v4().to_string(),
            points: 10,
            reason: pb::AdjustmentReason::Goodwill as i32,
            note: String::new(),
            actor: "me".into(),
            idempotency_key: "k".into(),
            expires_at: None,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&err).as_deref(), Some("note"));
    // Unknown profiles are NOT_FOUND, through ProfileService.
    let err = c
        .get_balance(pb::GetBalanceRequest {
            profile_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

async fn orders_accrue_exactly_once_refunds_reverse_in_proportion_and_points_redeem(
    engine: Engine,
) {
    let s = serve(engine).await;
    s.ingest(vec![
        order("ann", 1, 1.0, 12_345),
        order("ann", 2, 0.5, 10_000),
    ])
    .await;
    s.sync().await;
    let pid = s.profile_id("ann").await;
    let mut c = s.client();
    let balance = |c: &mut support::OfferClient, pid: String| {
        let mut c = c.clone();
        async move {
            c.get_balance(pb::GetBalanceRequest { profile_id: pid })
                .await
                .unwrap()
                .into_inner()
        }
    };
    // 1 point per USD: 123 + 100.
    let b = balance(&mut c, pid.clone()).await;
    assert_eq!(b.available_points, 223);
    assert_eq!(b.batches.len(), 2);
    assert_eq!(b.tier.as_ref().unwrap().tier_id, "bronze");
    // The same order event delivered again (a retry with a new event id) accrues nothing.
    let mut again = order("ann", 1, 1.0, 12_345);
    again.event_id = "ann-o1-retry".into();
    s.ingest(vec![again]).await;
    s.sync().await;
    assert_eq!(balance(&mut c, pid.clone()).await.available_points, 223);
    // A 50 % refund of order 2 reverses 50 points.
    s.ingest(vec![refund("ann", "ann-r1", "ann-2", 5_000)])
        .await;
    s.sync().await;
    assert_eq!(balance(&mut c, pid.clone()).await.available_points, 173);
    // Redemption is idempotent by key and never overdraws.
    let redeem = |key: &str, points: i64| pb::RedeemPointsRequest {
        profile_id: pid.clone(),
        points,
        idempotency_key: key.into(),
        reference: "reward-1".into(),
        channel: pb::Channel::Web as i32,
        ..Default::default()
    };
    let first = c
        .redeem_points(redeem("k1", 100))
        .await
        .unwrap()
        .into_inner();
    let retry = c
        .redeem_points(redeem("k1", 100))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first.entry.as_ref().unwrap().entry_id,
        retry.entry.as_ref().unwrap().entry_id
    );
    assert_eq!(first.available_points, 73);
    let err = c.redeem_points(redeem("k1", 99)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    let err = c.redeem_points(redeem("k2", 74)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let entries = c
        .list_ledger_entries(pb::ListLedgerEntriesRequest {
            profile_id: pid.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let kinds: Vec<i32> = entries.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![
            pb::LedgerEntryKind::Redemption as i32,
            pb::LedgerEntryKind::EarnReversal as i32,
            pb::LedgerEntryKind::Earn as i32,
            pb::LedgerEntryKind::Earn as i32,
        ]
    );
    // An operator credit is an ADJUSTMENT (it does not count as earned points for tiers).
    c.adjust_points(pb::AdjustPointsRequest {
        profile_id: pid.clone(),
        points: 1_000,
        reason: pb::AdjustmentReason::Goodwill as i32,
        note: "sorry".into(),
        actor: "agent-7".into(),
        idempotency_key: "adj-1".into(),
        expires_at: None,
    })
    .await
    .unwrap();
    let b = balance(&mut c, pid.clone()).await;
    assert_eq!(b.available_points, 1_073);
    assert_eq!(b.tier.as_ref().unwrap().tier_id, "bronze");
}

async fn the_global_holdout_gets_only_exempt_offers_and_agrees_with_experiments(engine: Engine) {
    let s = support::serve_with(engine, |st| st.holdout.fraction = 0.5).await;
    let holdout = clientele_experiments::holdout::HoldoutConfig {
        enabled: true,
        fraction: 0.5,
        seed: clientele_runtime::Settings::default().holdout.seed,
        ..Default::default()
    };
    create(&s, offer("regular")).await;
    let mut exempt = offer("service-recovery");
    exempt.holdout_exempt = true;
    create(&s, exempt).await;
    let customers: Vec<String> = (0..12).map(|i| format!("h{i}")).collect();
    s.ingest(
        customers
            .iter()
            .enumerate()
            .map(|(i, c)| order(c, i, 1.0, 1_000))
            .collect(),
    )
    .await;
    s.sync().await;
    let mut held = 0;
    for c in &customers {
        let pid = s.profile_id(c).await;
        let d = s
            .client()
            .decide(decide_req(&pid, pb::Channel::Web))
            .await
            .unwrap()
            .into_inner();
        let experiments_say = s
            .experiments()
            .is_in_holdout(pb::IsInHoldoutRequest {
                unit_id: pid.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .in_holdout;
        assert_eq!(
            d.in_holdout, experiments_say,
            "same holdout as ExperimentService"
        );
        assert_eq!(d.in_holdout, holdout.contains(&pid));
        let ids: Vec<String> = d
            .offers
            .iter()
            .map(|o| o.offer.as_ref().unwrap().offer_id.clone())
            .collect();
        if d.in_holdout {
            held += 1;
            assert_eq!(ids, vec!["service-recovery".to_string()]);
            assert!(
                d.offers[0]
                    .reasons
                    .iter()
                    .any(|r| r.code == pb::EligibilityReasonCode::HoldoutExempt as i32)
            );
            let rejected = d.rejected.iter().find(|r| r.offer_id == "regular").unwrap();
            assert_eq!(
                rejected.rejections[0].code,
                pb::RejectionCode::GlobalHoldout as i32
            );
            let err = s
                .client()
                .issue_offer(issue_req(
                    &pid,
                    "regular",
                    &format!("k-{c}"),
                    pb::Channel::Web,
                ))
                .await
                .unwrap_err();
            assert!(
                err.message().starts_with("REJECTION_CODE_GLOBAL_HOLDOUT"),
                "{}",
                err.message()
            );
        } else {
            assert_eq!(ids.len(), 2);
        }
    }
    assert!(
        held > 0 && held < customers.len(),
        "both groups are represented ({held})"
    );
}

async fn marketing_offers_need_channel_consent_and_codes_redeem_once(engine: Engine) {
    let s = serve(engine).await;
    s.ingest(vec![order("bea", 1, 1.0, 5_000)]).await;
    s.sync().await;
    let pid = s.profile_id("bea").await;
    let mut c = s.client();
    let mut promo = offer("promo");
    promo.transactional = false;
    promo.per_profile_cap = Some(1);
    promo.benefit = Some(pb::offer::Benefit::BonusPoints(pb::BonusPoints {
        points: 500,
    }));
    create(&s, promo).await;
    // No email consent: rejected with the reason, and issuing fails with the code name.
    let d = c
        .decide(decide_req(&pid, pb::Channel::Email))
        .await
        .unwrap()
        .into_inner();
    assert!(d.offers.is_empty());
    assert_eq!(
        d.rejected[0].rejections[0].code,
        pb::RejectionCode::ConsentMissing as i32
    );
    let err = c
        .issue_offer(issue_req(&pid, "promo", "i1", pb::Channel::Email))
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("REJECTION_CODE_CONSENT_MISSING"),
        "{}",
        err.message()
    );
    s.grant(&pid, pb::ConsentPurpose::Email).await;
    // Decide reads consent from its read model, which the profile change feed refreshes
    // (IssueOffer reads it fresh).
    s.sync().await;
    let d = c
        .decide(decide_req(&pid, pb::Channel::Email))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.offers.len(), 1);
    let issued = c
        .issue_offer(issue_req(&pid, "promo", "i1", pb::Channel::Email))
        .await
        .unwrap()
        .into_inner()
        .issued
        .unwrap();
    assert_eq!(issued.code.len(), 12);
    let retry = c
        .issue_offer(issue_req(&pid, "promo", "i1", pb::Channel::Email))
        .await
        .unwrap()
        .into_inner()
        .issued
        .unwrap();
    assert_eq!(retry.issue_id, issued.issue_id);
    // The per-profile cap of 1 is reached.
    let err = c
        .issue_offer(issue_req(&pid, "promo", "i2", pb::Channel::Email))
        .await
        .unwrap_err();
    assert!(
        err.message()
            .starts_with("REJECTION_CODE_PROFILE_CAP_REACHED"),
        "{}",
        err.message()
    );
    // Redeem (lower case, hyphenated) credits the bonus once.
    let typed = format!("{}-{}", &issued.code[..6], &issued.code[6..]).to_lowercase();
    let redeem = |key: &str| pb::RedeemOfferRequest {
        code: typed.clone(),
        idempotency_key: key.into(),
        profile_id: pid.clone(),
        channel: pb::Channel::Web as i32,
        ..Default::default()
    };
    let r = c.redeem_offer(redeem("r1")).await.unwrap().into_inner();
    assert!(!r.replayed);
    assert!(
        c.redeem_offer(redeem("r1"))
            .await
            .unwrap()
            .into_inner()
            .replayed
    );
    let err = c.redeem_offer(redeem("r2")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let b = c
        .get_balance(pb::GetBalanceRequest {
            profile_id: pid.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.available_points, 50 + 500);
    let err = c
        .cancel_offer(pb::CancelOfferRequest {
            target: Some(pb::cancel_offer_request::Target::IssueId(
                issued.issue_id.clone(),
            )),
            reason: "late".into(),
            actor: "agent".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let o = c
        .get_offer(pb::GetOfferRequest {
            offer_id: "promo".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .offer
        .unwrap();
    assert_eq!(o.usage.as_ref().unwrap().redeemed, 1);
}

async fn cart_abandoned_trigger_issues_once_per_event(engine: Engine) {
    let s = serve(engine).await;
    s.ingest(vec![order("cal", 1, 3.0, 5_000)]).await;
    s.sync().await;
    let pid = s.profile_id("cal").await;
    let mut save = offer("cart-save");
    save.benefit = Some(pb::offer::Benefit::PercentageDiscount(
        pb::PercentageDiscount {
            percent_bps: 1000,
            ..Default::default()
        },
    ));
    create(&s, save).await;
    s.client()
        .create_trigger(pb::CreateTriggerRequest {
            trigger: Some(pb::Trigger {
                trigger_id: "cart".into(),
                offer_id: "cart-save".into(),
                channel: pb::Channel::App as i32,
                on: Some(pb::trigger::On::Event(pb::EventTrigger {
                    kind: pb::EventKind::CartAbandoned as i32,
                    custom_event_name: String::new(),
                    min_value: Some(usd(2_000)),
                })),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let cart = |id: &str, value: i64| {
        event(
            "cal",
            id,
            0.0,
            pb::event::Payload::CartAbandoned(pb::CartAbandoned {
                cart_id: id.into(),
                cart_value: Some(usd(value)),
                line_items: Vec::new(),
            }),
        )
    };
    s.ingest(vec![cart("cart-1", 4_500), cart("cart-small", 500)])
        .await;
    s.sync().await;
    s.sync().await;
    let wallet = s
        .client()
        .list_issued_offers(pb::ListIssuedOffersRequest {
            profile_id: pid.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .issued;
    assert_eq!(
        wallet.len(),
        1,
        "one firing for the one cart above the threshold"
    );
    assert_eq!(wallet[0].source, pb::IssueSource::Trigger as i32);
    assert_eq!(wallet[0].trigger_id, "cart");
    let t = s
        .client()
        .list_triggers(pb::ListTriggersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .triggers;
    assert_eq!(t[0].issued_count, 1);
}

async fn experiment_variants_get_their_offer_and_control_its_default(engine: Engine) {
    let s = serve(engine).await;
    let mut x = s.experiments();
    x.create_experiment(pb::CreateExperimentRequest {
        experiment: Some(pb::Experiment {
            key: "offer-test".into(),
            display_name: "Offer test".into(),
            hypothesis: "A richer offer converts more".into(),
            hash_attribute: "profile_id".into(),
            variants: ["control", "treatment_1"]
                .iter()
                .map(|k| pb::Variant {
                    key: (*k).into(),
                    name: (*k).into(),
                    weight: 0.5,
                })
                .collect(),
            coverage: 1.0,
            hash_version: 2,
            holdout: pb::HoldoutParticipation::Exclude as i32,
            primary_metric: Some(pb::Metric {
                key: "purchase".into(),
                name: "purchase".into(),
                r#type: pb::MetricType::Binary as i32,
                goal: pb::MetricGoal::Increase as i32,
                conversion_window: Some(prost_types::Duration {
                    seconds: 7 * 86_400,
                    nanos: 0,
                }),
                source: Some(pb::metric::Source::Recorded(pb::RecordedMetricSource {})),
                ..Default::default()
            }),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    x.start_experiment(pb::StartExperimentRequest {
        key: "offer-test".into(),
    })
    .await
    .unwrap();
    let gated = |id: &str, variant: &str| pb::Offer {
        experiment: Some(pb::OfferExperiment {
            experiment_key: "offer-test".into(),
            variant_keys: vec![variant.into()],
        }),
        ..offer(id)
    };
    create(&s, gated("rich-offer", "treatment_1")).await;
    create(&s, gated("default-offer", "control")).await;
    let customers: Vec<String> = (0..12).map(|i| format!("x{i}")).collect();
    s.ingest(
        customers
            .iter()
            .enumerate()
            .map(|(i, c)| order(c, i, 1.0, 1_000))
            .collect(),
    )
    .await;
    s.sync().await;
    let mut arms = BTreeSet::new();
    for c in &customers {
        let pid = s.profile_id(c).await;
        let a = x
            .assign(pb::AssignRequest {
                experiment_key: "offer-test".into(),
                unit_id: pid.clone(),
                profile_id: pid.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .assignment
            .unwrap();
        let d = s
            .client()
            .decide(decide_req(&pid, pb::Channel::Web))
            .await
            .unwrap()
            .into_inner();
        let ids: Vec<String> = d
            .offers
            .iter()
            .map(|o| o.offer.as_ref().unwrap().offer_id.clone())
            .collect();
        let (want, other, code) = if a.variant_index == 0 {
            (
                "default-offer",
                "rich-offer",
                pb::RejectionCode::ExperimentControl,
            )
        } else {
            (
                "rich-offer",
                "default-offer",
                pb::RejectionCode::OtherExperimentVariant,
            )
        };
        assert_eq!(
            ids,
            vec![want.to_string()],
            "{c} in variant {}",
            a.variant_key
        );
        let arm = d.offers[0].experiment.as_ref().unwrap();
        assert_eq!(arm.variant_key, a.variant_key);
        assert_eq!(arm.variant_index, a.variant_index);
        let rejected = d.rejected.iter().find(|r| r.offer_id == other).unwrap();
        assert_eq!(rejected.rejections[0].code, code as i32);
        arms.insert(a.variant_index);
    }
    assert_eq!(arms.len(), 2, "both arms are represented");
}

/// The seeds' customer base: champions, mid-value, new, lapsed big spenders, old one-timers.
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
            ));
        }
    }
    for c in 0..4 {
        let name = format!("lapsed{c}");
        for n in 0..6 {
            events.push(order(
                &name,
                n,
                300.0 + f64::from(c) * 5.0 + 24.0 * n as f64,
                23_000 + 1_500 * (n as i64 % 3),
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
            ));
        }
    }
    for c in 0..10 {
        events.push(order(
            &format!("new{c}"),
            0,
            5.0 + 2.0 * f64::from(c),
            2_000,
        ));
    }
    for c in 0..10 {
        events.push(order(
            &format!("old{c}"),
            0,
            200.0 + 30.0 * f64::from(c),
            1_500,
        ));
    }
    events
}

fn rfm(names: &[&str]) -> pb::segment::Definition {
    pb::segment::Definition::Rfm(pb::RfmDefinition {
        segment_names: names.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    })
}

async fn events_to_segments_to_the_offer_each_customer_receives(engine: Engine) {
    let s = serve(engine).await;
    // The four strategies as segments over the standard RFM names.
    let strategies = [
        ("vip", &["Champions"][..]),
        (
            "grow",
            &["Potential Loyalists", "Promising", "New Customers"][..],
        ),
        ("miss-you", &["About to Sleep", "Hibernating"][..]),
        ("win-back", &["At Risk", "Can't Lose Them"][..]),
    ];
    for (id, names) in strategies {
        s.seg()
            .define_segment(pb::DefineSegmentRequest {
                segment: Some(pb::Segment {
                    segment_id: id.into(),
                    display_name: id.into(),
                    definition: Some(rfm(names)),
                    ..Default::default()
                }),
                expected_version: 0,
            })
            .await
            .unwrap();
    }
    create(
        &s,
        targeted(
            "vip-experience",
            "vip",
            pb::offer::Benefit::Perk(pb::Perk {
                title: "Private styling session".into(),
                fulfilment_instructions: String::new(),
            }),
            100,
        ),
    )
    .await;
    create(
        &s,
        targeted(
            "next-purchase-10",
            "grow",
            pb::offer::Benefit::FixedDiscount(pb::FixedDiscount {
                amount: Some(eur(1_000)),
                min_basket: None,
            }),
            50,
        ),
    )
    .await;
    create(
        &s,
        targeted(
            "we-miss-you-15",
            "miss-you",
            pb::offer::Benefit::PercentageDiscount(pb::PercentageDiscount {
                percent_bps: 1500,
                ..Default::default()
            }),
            60,
        ),
    )
    .await;
    create(
        &s,
        targeted(
            "win-back-30",
            "win-back",
            pb::offer::Benefit::PercentageDiscount(pb::PercentageDiscount {
                percent_bps: 3000,
                ..Default::default()
            }),
            90,
        ),
    )
    .await;
    // Entering a win-back segment grants the win-back offer by e-mail.
    s.client()
        .create_trigger(pb::CreateTriggerRequest {
            trigger: Some(pb::Trigger {
                trigger_id: "win-back-on-entry".into(),
                offer_id: "win-back-30".into(),
                channel: pb::Channel::Email as i32,
                on: Some(pb::trigger::On::SegmentEntry(pb::SegmentEntryTrigger {
                    segment: Some(pb::SegmentRef {
                        segment_id: "win-back".into(),
                        cluster_index: None,
                    }),
                })),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    // Open the membership feed before anything changes.
    s.consumers.consume_memberships_once().await.unwrap();

    s.ingest(history()).await;
    s.sync().await;
    let mut customers: Vec<String> = Vec::new();
    for (prefix, n) in [
        ("champ", 8),
        ("lapsed", 4),
        ("mid", 10),
        ("new", 10),
        ("old", 10),
    ] {
        customers.extend((0..n).map(|i| format!("{prefix}{i}")));
    }
    let mut pids = BTreeMap::new();
    for c in &customers {
        let pid = s.profile_id(c).await;
        // Targeted offers need personalisation consent; e-mail consent for the trigger.
        s.grant(&pid, pb::ConsentPurpose::Personalisation).await;
        s.grant(&pid, pb::ConsentPurpose::Email).await;
        pids.insert(c.clone(), pid);
    }
    s.recompute("run-1").await;
    s.sync().await;

    let expected_offer = |rfm_name: &str| -> Option<&'static str> {
        match rfm_name {
            "Champions" => Some("vip-experience"),
            "Potential Loyalists" | "Promising" | "New Customers" => Some("next-purchase-10"),
            "About to Sleep" | "Hibernating" => Some("we-miss-you-15"),
            "At Risk" | "Can't Lose Them" => Some("win-back-30"),
            _ => None,
        }
    };
    let mut seen = BTreeSet::new();
    let mut win_back_profiles = Vec::new();
    for (customer, pid) in &pids {
        let segs = s
            .seg()
            .get_profile_segments(pb::GetProfileSegmentsRequest {
                profile_id: pid.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .profile
            .unwrap();
        let name = segs
            .rfm
            .as_ref()
            .map(|r| r.segment_name.clone())
            .unwrap_or_default();
        let d = s
            .client()
            .decide(decide_req(pid, pb::Channel::Web))
            .await
            .unwrap()
            .into_inner();
        let top = d
            .offers
            .first()
            .map(|o| o.offer.as_ref().unwrap().offer_id.clone());
        assert_eq!(
            top.as_deref(),
            expected_offer(&name),
            "{customer} is {name:?}: decided {top:?}, rejected {:?}",
            d.rejected
        );
        if let Some(top) = top {
            let ranked = &d.offers[0];
            assert!(
                ranked
                    .reasons
                    .iter()
                    .any(|r| r.code == pb::EligibilityReasonCode::SegmentMatched as i32)
            );
            seen.insert(top.clone());
            if top == "win-back-30" {
                win_back_profiles.push(pid.clone());
            }
        }
    }
    assert_eq!(
        seen,
        [
            "vip-experience",
            "next-purchase-10",
            "we-miss-you-15",
            "win-back-30"
        ]
        .into_iter()
        .map(String::from)
        .collect::<BTreeSet<_>>(),
        "all four strategies are exercised"
    );
    // The trigger issued exactly one win-back code to each entrant, and a re-run of the
    // consumers does not fire again.
    s.sync().await;
    for pid in &win_back_profiles {
        let wallet = s
            .client()
            .list_issued_offers(pb::ListIssuedOffersRequest {
                profile_id: pid.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .issued;
        assert_eq!(wallet.len(), 1, "one win-back code for {pid}");
        assert_eq!(wallet[0].offer_id, "win-back-30");
        assert_eq!(wallet[0].source, pb::IssueSource::Trigger as i32);
    }
    println!(
        "strategies: {} customers, win-back trigger issued {} codes",
        pids.len(),
        win_back_profiles.len()
    );
}

fn offer_ids(d: &pb::DecideResponse) -> Vec<String> {
    d.offers
        .iter()
        .map(|o| o.offer.as_ref().unwrap().offer_id.clone())
        .collect()
}

async fn a_segment_change_on_the_feed_changes_the_next_decide(engine: Engine) {
    let s = serve(engine).await;
    s.ingest(vec![
        order("sam", 1, 3.0, 2_000),
        order("sam", 2, 1.0, 2_000),
    ])
    .await;
    s.sync().await;
    let pid = s.profile_id("sam").await;
    s.grant(&pid, pb::ConsentPurpose::Personalisation).await;
    s.sync().await;
    create(
        &s,
        targeted(
            "regulars-perk",
            "regulars",
            pb::offer::Benefit::FreeShipping(pb::FreeShipping { min_basket: None }),
            10,
        ),
    )
    .await;
    let mut c = s.client();
    let before = c
        .decide(decide_req(&pid, pb::Channel::Web))
        .await
        .unwrap()
        .into_inner();
    assert!(offer_ids(&before).is_empty(), "{before:?}");
    s.seg()
        .define_segment(pb::DefineSegmentRequest {
            segment: Some(pb::Segment {
                segment_id: "regulars".into(),
                display_name: "Regulars".into(),
                definition: Some(pb::segment::Definition::Rule(pb::RuleDefinition {
                    expression: "orders >= 2".into(),
                })),
                ..Default::default()
            }),
            expected_version: 0,
        })
        .await
        .unwrap();
    s.recompute("regulars-run").await;
    // Until the membership change is applied, Decide answers from its read model.
    let stale = c
        .decide(decide_req(&pid, pb::Channel::Web))
        .await
        .unwrap()
        .into_inner();
    assert!(offer_ids(&stale).is_empty(), "{stale:?}");
    s.sync().await;
    let after = c
        .decide(decide_req(&pid, pb::Channel::Web))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(offer_ids(&after), ["regulars-perk"], "{after:?}");
}

async fn this_process_writes_show_in_the_next_decide_at_once(engine: Engine) {
    let s = serve(engine).await;
    s.ingest(vec![order("rob", 1, 1.0, 12_345)]).await;
    s.sync().await;
    let pid = s.profile_id("rob").await;
    s.grant(&pid, pb::ConsentPurpose::Personalisation).await;
    s.sync().await;
    let mut rich = offer("points-club");
    rich.transactional = false;
    rich.eligibility = Some(pb::Eligibility {
        rule_expression: "points_available >= 100".into(),
        ..Default::default()
    });
    create(&s, rich).await;
    let mut once = offer("once");
    once.transactional = false;
    once.per_profile_cap = Some(1);
    create(&s, once).await;
    let mut c = s.client();
    let d = c
        .decide(decide_req(&pid, pb::Channel::Web))
        .await
        .unwrap()
        .into_inner();
    let mut ids = offer_ids(&d);
    ids.sort();
    assert_eq!(ids, ["once", "points-club"], "{d:?}");
    // A points redemption by this process: the balance drops below the rule at once.
    c.redeem_points(pb::RedeemPointsRequest {
        profile_id: pid.clone(),
        points: 50,
        idempotency_key: "r1".into(),
        reference: "till-1".into(),
        channel: pb::Channel::Web as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    let d = c
        .decide(decide_req(&pid, pb::Channel::Web))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(offer_ids(&d), ["once"], "{d:?}");
    // An issued code uses up the per-profile cap at once.
    c.issue_offer(issue_req(&pid, "once", "i1", pb::Channel::Web))
        .await
        .unwrap();
    let d = c
        .decide(decide_req(&pid, pb::Channel::Web))
        .await
        .unwrap()
        .into_inner();
    assert!(offer_ids(&d).is_empty(), "{d:?}");
    assert!(
        d.rejected.iter().any(|r| r.offer_id == "once"
            && r.rejections
                .iter()
                .any(|x| x.code == pb::RejectionCode::ProfileCapReached as i32)),
        "{d:?}"
    );
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
    bad_input_names_the_field,
    orders_accrue_exactly_once_refunds_reverse_in_proportion_and_points_redeem,
    marketing_offers_need_channel_consent_and_codes_redeem_once,
    cart_abandoned_trigger_issues_once_per_event,
    experiment_variants_get_their_offer_and_control_its_default,
    the_global_holdout_gets_only_exempt_offers_and_agrees_with_experiments,
    events_to_segments_to_the_offer_each_customer_receives,
    a_segment_change_on_the_feed_changes_the_next_decide,
    this_process_writes_show_in_the_next_decide_at_once,
);
