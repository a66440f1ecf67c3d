//! Benchmark of the pure offer decision on a realistic catalogue of 200 offers.
//!
//! Goal: well under 100 µs per decision.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hint::black_box;

use chrono::{Duration, TimeZone, Utc};
use clientele_offers::catalogue::{
    Budget, BudgetUsage, Catalogue, Channel, ConsentPurpose, Eligibility, ExperimentArm,
    ExperimentId, FrequencyCap, LifecycleState, Offer, OfferExperiment, OfferId, OfferKind,
    SegmentId,
};
use clientele_offers::decision::{CustomerContext, RequestContext, decide};
use clientele_offers::tiers::TierId;
use clientele_offers::{CurrencyCode, Money};
use criterion::{Criterion, criterion_group, criterion_main};

const SEGMENTS: [&str; 10] = [
    "champions",
    "loyal",
    "potential-loyalists",
    "new-customers",
    "promising",
    "need-attention",
    "about-to-sleep",
    "at-risk",
    "cant-lose-them",
    "hibernating",
];
const TIERS: [&str; 4] = ["bronze", "silver", "gold", "vip"];
const LIFECYCLE: [&str; 4] = ["new", "active", "lapsing", "lapsed"];

fn catalogue() -> Catalogue {
    let eur = CurrencyCode::new("EUR").expect("valid code");
    let start = Utc
        .with_ymd_and_hms(2025, 1, 1, 0, 0, 0)
        .single()
        .expect("valid date");
    let offers = (0..200usize)
        .map(|i| {
            let kind = match i % 7 {
                0 => OfferKind::PercentageDiscount {
                    basis_points: 500 + (i as u32 % 4) * 500,
                },
                1 => OfferKind::FixedDiscount {
                    amount: Money::new(500 + (i as i64 % 5) * 500, eur),
                },
                2 => OfferKind::BonusPoints {
                    points: 100 + i as i64,
                },
                3 => OfferKind::PointsMultiplier {
                    multiplier_bp: 20_000,
                },
                4 => OfferKind::FreeShipping,
                5 => OfferKind::Perk {
                    description: format!("perk {i}"),
                },
                _ => OfferKind::Coupon {
                    code: format!("SAVE{i}"),
                },
            };
            let mut eligibility = Eligibility::default();
            if i % 5 != 0 {
                eligibility.segments_in = (0..1 + i % 3)
                    .map(|k| SegmentId::new(SEGMENTS[(i + k * 3) % SEGMENTS.len()]))
                    .collect();
            }
            if i % 6 == 0 {
                eligibility.segments_out = BTreeSet::from([SegmentId::new(SEGMENTS[(i + 1) % 10])]);
            }
            if i % 4 == 0 {
                eligibility.tiers = TIERS[i % 2..].iter().map(|t| TierId::new(*t)).collect();
            }
            if i % 9 == 0 {
                eligibility.lifecycle_states =
                    BTreeSet::from([LifecycleState::new(LIFECYCLE[i % 4])]);
            }
            if i % 8 == 0 {
                eligibility.rule = Some(format!("rule-{}", i % 3));
            }
            Offer {
                id: OfferId::new(format!("offer-{i:03}")),
                name: format!("Offer {i}"),
                kind,
                eligibility,
                channels: if i % 3 == 0 {
                    BTreeSet::from([Channel::Email, Channel::App])
                } else {
                    BTreeSet::new()
                },
                marketing: i % 10 != 0,
                valid_from: start,
                valid_until: (i % 11 == 0).then(|| start + Duration::days(90)),
                priority: (i % 10) as i32,
                expected_value_minor: (i as i64 * 37) % 5_000,
                per_customer_cap: (i % 2 == 0).then_some(3),
                budget: (i % 4 == 1).then_some(Budget::Count {
                    max_issuances: 10_000,
                }),
                experiment: (i % 25 == 0).then(|| OfferExperiment {
                    experiment: ExperimentId::new("exp-1"),
                    arms: BTreeSet::from([ExperimentArm::Variant("b".into())]),
                }),
            }
        })
        .collect();
    Catalogue::new(
        offers,
        Some(FrequencyCap {
            max_offers: 5,
            window_hours: 24 * 7,
        }),
    )
    .expect("valid catalogue")
}

fn bench_decide(c: &mut Criterion) {
    let catalogue = catalogue();
    let now = Utc
        .with_ymd_and_hms(2025, 6, 1, 12, 0, 0)
        .single()
        .expect("valid date");
    let customer = CustomerContext {
        segments: BTreeSet::from([SegmentId::new("at-risk"), SegmentId::new("loyal")]),
        tier: Some(TierId::new("gold")),
        lifecycle: Some(LifecycleState::new("lapsing")),
        consents: BTreeSet::from([
            ConsentPurpose::EmailMarketing,
            ConsentPurpose::Personalisation,
        ]),
        in_global_holdout: false,
        issued_per_offer: (0..20)
            .map(|i| (OfferId::new(format!("offer-{:03}", i * 7)), 2))
            .collect(),
        recent_issuances: vec![now - Duration::days(2), now - Duration::days(20)],
        experiment_arms: BTreeMap::from([(
            ExperimentId::new("exp-1"),
            ExperimentArm::Variant("b".into()),
        )]),
    };
    let usage: HashMap<OfferId, BudgetUsage> = (0..200)
        .filter(|i| i % 4 == 1)
        .map(|i| {
            (
                OfferId::new(format!("offer-{i:03}")),
                BudgetUsage {
                    issued: 5_000,
                    spent_minor: 0,
                },
            )
        })
        .collect();
    let rules = |rule: &str| rule != "rule-2";
    for explain in [false, true] {
        let request = RequestContext {
            now,
            channel: Channel::Email,
            max_offers: 3,
            explain_rejections: explain,
            budget_usage: &usage,
            rules: &rules,
        };
        // Sanity: the benchmark exercises a real selection, not a catalogue that rejects everyone.
        assert_eq!(decide(&catalogue, &customer, &request).offers.len(), 3);
        let name = if explain {
            "decide_200_offers_explained"
        } else {
            "decide_200_offers"
        };
        c.bench_function(name, |b| {
            b.iter(|| {
                decide(
                    black_box(&catalogue),
                    black_box(&customer),
                    black_box(&request),
                )
            })
        });
    }
}

criterion_group!(benches, bench_decide);
criterion_main!(benches);
