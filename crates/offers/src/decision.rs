//! Which offers a customer may receive now, ranked, with reasons.
//!
//! [`decide`] is pure: everything it needs — the customer's segments, consents,
//! past issuances, experiment assignments, the holdout flag and the offers'
//! budget usage — is passed in. It neither reserves budget nor records
//! issuances; the store does both atomically afterwards (see
//! [`crate::catalogue`] for the budget rule and [`Decision`] for what to record).
//!
//! # Checks, in order
//!
//! 1. Global holdout: a customer in the holdout gets nothing (every offer is
//!    rejected with [`RejectionReason::GlobalHoldout`]).
//! 2. Per offer: validity window, channel, consent, segments in/out, tier,
//!    lifecycle state, per-customer cap, budget, experiment arm, then the rule
//!    (last, as it is the most expensive). Without `explain_rejections` the
//!    first failing check ends the offer's evaluation; with it, all failing
//!    checks are reported.
//! 3. Ranking of eligible offers: **priority descending, then expected value
//!    descending, then offer id ascending** (deterministic).
//! 4. Selection: the top `min(max_offers, frequency slots left)` offers. The
//!    frequency cap counts the customer's issuances in the rolling window
//!    `(now − window, now]`; eligible offers beyond the remaining slots are
//!    rejected with [`RejectionReason::FrequencyCapped`], those beyond
//!    `max_offers` with [`RejectionReason::RankedBelowLimit`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::catalogue::{
    BudgetUsage, Catalogue, Channel, ConsentPurpose, ExperimentArm, ExperimentId, LifecycleState,
    Offer, OfferId, SegmentId,
};
use crate::tiers::TierId;

/// The result of evaluating an offer's rule for the customer being decided. Only
/// [`RuleOutcome::Held`] qualifies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RuleOutcome {
    /// The rule is true.
    Held,
    /// The rule is false.
    NotHeld,
    /// The rule depends on a value the customer does not have (why, in English).
    Unknown(String),
    /// The rule could not be evaluated (why, in English); treated as false.
    Error(String),
}

/// Evaluates a rule (an expression of the rules crate) for the customer being decided.
/// Implemented for any `Fn(&str) -> bool` (true = held, false = not held).
pub trait RuleEvaluator {
    /// The outcome of `rule` for this customer.
    fn evaluate(&self, rule: &str) -> RuleOutcome;
}

impl<F: Fn(&str) -> bool> RuleEvaluator for F {
    fn evaluate(&self, rule: &str) -> RuleOutcome {
        if self(rule) {
            RuleOutcome::Held
        } else {
            RuleOutcome::NotHeld
        }
    }
}

/// What is known about the customer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerContext {
    /// Segments the customer is in.
    pub segments: BTreeSet<SegmentId>,
    /// Loyalty tier.
    pub tier: Option<TierId>,
    /// Lifecycle state.
    pub lifecycle: Option<LifecycleState>,
    /// Consents currently granted.
    pub consents: BTreeSet<ConsentPurpose>,
    /// Whether the customer is in the global holdout (decided by the caller).
    pub in_global_holdout: bool,
    /// Issuances of each offer to this customer so far (for per-customer caps).
    pub issued_per_offer: HashMap<OfferId, u32>,
    /// Times of issuances of any offer to this customer, covering at least the
    /// frequency-cap window (for the frequency cap).
    pub recent_issuances: Vec<DateTime<Utc>>,
    /// The customer's arm in each running experiment (from the experiments crate).
    pub experiment_arms: BTreeMap<ExperimentId, ExperimentArm>,
}

/// The request being decided.
pub struct RequestContext<'a> {
    /// Decision time.
    pub now: DateTime<Utc>,
    /// Delivery channel.
    pub channel: Channel,
    /// Maximum offers to return.
    pub max_offers: usize,
    /// Whether to report why ineligible offers were rejected.
    pub explain_rejections: bool,
    /// Current budget usage per offer; missing = nothing used yet.
    pub budget_usage: &'a HashMap<OfferId, BudgetUsage>,
    /// Evaluates [`crate::catalogue::Eligibility::rule`] for this customer.
    pub rules: &'a dyn RuleEvaluator,
}

impl fmt::Debug for RequestContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestContext")
            .field("now", &self.now)
            .field("channel", &self.channel)
            .field("max_offers", &self.max_offers)
            .field("explain_rejections", &self.explain_rejections)
            .field("budget_usage", &self.budget_usage)
            .finish_non_exhaustive()
    }
}

/// Why an offer qualified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QualificationReason {
    /// No targeting: everyone qualifies.
    OpenToAll,
    /// The customer is in this required segment.
    InSegment(SegmentId),
    /// The customer's tier is allowed.
    TierMatched(TierId),
    /// The customer's lifecycle state is allowed.
    LifecycleMatched(LifecycleState),
    /// The rule held.
    RuleHeld(String),
    /// The customer granted this required consent.
    ConsentGranted(ConsentPurpose),
    /// The customer's experiment arm receives this offer.
    ExperimentArm {
        /// Experiment.
        experiment: ExperimentId,
        /// Arm.
        arm: ExperimentArm,
    },
}

/// Why an offer was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectionReason {
    /// The customer is in the global holdout.
    GlobalHoldout,
    /// Not valid at the decision time.
    OutsideWindow {
        /// Start.
        valid_from: DateTime<Utc>,
        /// End.
        valid_until: Option<DateTime<Utc>>,
    },
    /// The offer is not delivered on this channel.
    ChannelNotSupported {
        /// The requested channel.
        channel: Channel,
    },
    /// A required consent is missing.
    NoConsent {
        /// The missing purpose.
        purpose: ConsentPurpose,
    },
    /// The customer is in none of the required segments.
    NotInSegment {
        /// Required segments (any of).
        required: Vec<SegmentId>,
    },
    /// The customer is in an excluded segment.
    Excluded {
        /// The excluding segment.
        segment: SegmentId,
    },
    /// The customer's tier is not allowed.
    TierNotEligible {
        /// The customer's tier.
        tier: Option<TierId>,
    },
    /// The customer's lifecycle state is not allowed.
    LifecycleNotEligible {
        /// The customer's state.
        state: Option<LifecycleState>,
    },
    /// The per-customer cap is reached.
    CapReached {
        /// The cap.
        cap: u32,
        /// Issued so far.
        issued: u32,
    },
    /// One more issuance would exceed the global budget.
    BudgetExhausted,
    /// The customer is in the experiment's control group and control does not get this offer.
    ExperimentControl {
        /// Experiment.
        experiment: ExperimentId,
    },
    /// The customer is in another variant of the experiment.
    OtherExperimentVariant {
        /// Experiment.
        experiment: ExperimentId,
        /// The customer's arm.
        arm: ExperimentArm,
    },
    /// The caller supplied no assignment for the offer's experiment.
    NoExperimentAssignment {
        /// Experiment.
        experiment: ExperimentId,
    },
    /// The targeting rule did not hold.
    RuleNotSatisfied {
        /// The rule.
        rule: String,
    },
    /// The targeting rule depends on a value the customer does not have.
    RuleUnknown {
        /// The rule.
        rule: String,
        /// What is missing.
        detail: String,
    },
    /// The targeting rule could not be evaluated; treated as not holding.
    RuleFailed {
        /// The rule.
        rule: String,
        /// Why.
        detail: String,
    },
    /// The customer's frequency cap leaves no room for this offer.
    FrequencyCapped {
        /// Cap.
        max_offers: u32,
        /// Window in hours.
        window_hours: u32,
        /// Issuances already in the window.
        issued_in_window: u32,
    },
    /// Eligible, but ranked below the requested number of offers.
    RankedBelowLimit {
        /// 0-based rank among eligible offers.
        rank: usize,
        /// The request's `max_offers`.
        limit: usize,
    },
}

/// An offer selected for the customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EligibleOffer {
    /// The offer.
    pub offer_id: OfferId,
    /// 0-based rank (0 = best).
    pub rank: usize,
    /// Its priority.
    pub priority: i32,
    /// Its expected value in minor units.
    pub expected_value_minor: i64,
    /// Why it qualified.
    pub reasons: Vec<QualificationReason>,
}

/// An offer not selected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedOffer {
    /// The offer.
    pub offer_id: OfferId,
    /// Why (all failing checks when explaining; otherwise not reported at all).
    pub reasons: Vec<RejectionReason>,
}

/// Result of [`decide`].
///
/// To issue, the store records each selected offer for the customer (feeding
/// `issued_per_offer` and `recent_issuances` next time) and reserves budget,
/// re-checking per-customer cap, frequency cap and budget in the same
/// transaction, because concurrent decisions may have selected the same slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Selected offers, best first.
    pub offers: Vec<EligibleOffer>,
    /// Rejected offers with reasons; empty unless `explain_rejections`.
    pub rejected: Vec<RejectedOffer>,
    /// The customer is in the global holdout; nothing was offered.
    pub holdout: bool,
    /// Issuances still allowed by the frequency cap (`None` = no cap).
    pub frequency_slots_left: Option<u32>,
}

/// Decides which offers of `catalogue` the customer may receive; see the
/// [module docs](self) for the order of checks, ranking and selection.
pub fn decide(
    catalogue: &Catalogue,
    customer: &CustomerContext,
    request: &RequestContext<'_>,
) -> Decision {
    let explain = request.explain_rejections;
    let (issued_in_window, slots_left) = match catalogue.frequency_cap {
        Some(cap) => {
            let since = request.now - Duration::hours(i64::from(cap.window_hours));
            let issued = customer
                .recent_issuances
                .iter()
                .filter(|t| **t > since && **t <= request.now)
                .count();
            let issued = u32::try_from(issued).unwrap_or(u32::MAX);
            (issued, Some(cap.max_offers.saturating_sub(issued)))
        }
        None => (0, None),
    };

    if customer.in_global_holdout {
        return Decision {
            offers: Vec::new(),
            rejected: if explain {
                catalogue
                    .offers
                    .iter()
                    .map(|o| RejectedOffer {
                        offer_id: o.id.clone(),
                        reasons: vec![RejectionReason::GlobalHoldout],
                    })
                    .collect()
            } else {
                Vec::new()
            },
            holdout: true,
            frequency_slots_left: slots_left,
        };
    }

    let mut eligible: Vec<(&Offer, Vec<QualificationReason>)> = Vec::new();
    let mut rejected = Vec::new();
    let mut failures = Vec::new();
    for offer in &catalogue.offers {
        failures.clear();
        let reasons = evaluate(offer, customer, request, &mut failures);
        if failures.is_empty() {
            eligible.push((offer, reasons));
        } else if explain {
            rejected.push(RejectedOffer {
                offer_id: offer.id.clone(),
                reasons: std::mem::take(&mut failures),
            });
        }
    }

    eligible.sort_unstable_by(|(a, _), (b, _)| {
        b.priority
            .cmp(&a.priority)
            .then(b.expected_value_minor.cmp(&a.expected_value_minor))
            .then_with(|| a.id.cmp(&b.id))
    });

    let slots = slots_left.map_or(usize::MAX, |s| s as usize);
    let take = request.max_offers.min(slots);
    let mut offers = Vec::with_capacity(take.min(eligible.len()));
    for (rank, (offer, reasons)) in eligible.into_iter().enumerate() {
        if rank < take {
            offers.push(EligibleOffer {
                offer_id: offer.id.clone(),
                rank,
                priority: offer.priority,
                expected_value_minor: offer.expected_value_minor,
                reasons,
            });
        } else if explain {
            let reason = match catalogue.frequency_cap {
                Some(cap) if rank >= slots => RejectionReason::FrequencyCapped {
                    max_offers: cap.max_offers,
                    window_hours: cap.window_hours,
                    issued_in_window,
                },
                _ => RejectionReason::RankedBelowLimit {
                    rank,
                    limit: request.max_offers,
                },
            };
            rejected.push(RejectedOffer {
                offer_id: offer.id.clone(),
                reasons: vec![reason],
            });
        } else {
            break;
        }
    }

    Decision {
        offers,
        rejected,
        holdout: false,
        frequency_slots_left: slots_left,
    }
}

/// Runs the per-offer checks. Pushes failures into `failures` (stopping at
/// the first unless explaining) and returns the qualification reasons, which
/// are only meaningful when `failures` stays empty.
fn evaluate(
    offer: &Offer,
    customer: &CustomerContext,
    request: &RequestContext<'_>,
    failures: &mut Vec<RejectionReason>,
) -> Vec<QualificationReason> {
    let explain = request.explain_rejections;
    let mut reasons = Vec::new();
    macro_rules! fail {
        ($reason:expr) => {{
            failures.push($reason);
            if !explain {
                return reasons;
            }
        }};
    }

    if !offer.is_valid_at(request.now) {
        fail!(RejectionReason::OutsideWindow {
            valid_from: offer.valid_from,
            valid_until: offer.valid_until,
        });
    }
    if !offer.channels.is_empty() && !offer.channels.contains(&request.channel) {
        fail!(RejectionReason::ChannelNotSupported {
            channel: request.channel,
        });
    }
    for purpose in offer.required_consents(request.channel) {
        if customer.consents.contains(&purpose) {
            reasons.push(QualificationReason::ConsentGranted(purpose));
        } else {
            fail!(RejectionReason::NoConsent { purpose });
        }
    }

    let e = &offer.eligibility;
    if !e.is_targeted() {
        reasons.push(QualificationReason::OpenToAll);
    }
    if !e.segments_in.is_empty() {
        match e
            .segments_in
            .iter()
            .find(|s| customer.segments.contains(*s))
        {
            Some(s) => reasons.push(QualificationReason::InSegment(s.clone())),
            None => fail!(RejectionReason::NotInSegment {
                required: e.segments_in.iter().cloned().collect(),
            }),
        }
    }
    if let Some(s) = e
        .segments_out
        .iter()
        .find(|s| customer.segments.contains(*s))
    {
        fail!(RejectionReason::Excluded { segment: s.clone() });
    }
    if !e.tiers.is_empty() {
        match &customer.tier {
            Some(t) if e.tiers.contains(t) => {
                reasons.push(QualificationReason::TierMatched(t.clone()))
            }
            tier => fail!(RejectionReason::TierNotEligible { tier: tier.clone() }),
        }
    }
    if !e.lifecycle_states.is_empty() {
        match &customer.lifecycle {
            Some(l) if e.lifecycle_states.contains(l) => {
                reasons.push(QualificationReason::LifecycleMatched(l.clone()));
            }
            state => fail!(RejectionReason::LifecycleNotEligible {
                state: state.clone(),
            }),
        }
    }
    if let Some(cap) = offer.per_customer_cap {
        let issued = customer
            .issued_per_offer
            .get(&offer.id)
            .copied()
            .unwrap_or(0);
        if issued >= cap {
            fail!(RejectionReason::CapReached { cap, issued });
        }
    }
    if let Some(budget) = &offer.budget {
        let usage = request
            .budget_usage
            .get(&offer.id)
            .copied()
            .unwrap_or_default();
        if budget.would_exceed(&usage) {
            fail!(RejectionReason::BudgetExhausted);
        }
    }
    if let Some(exp) = &offer.experiment {
        match customer.experiment_arms.get(&exp.experiment) {
            None => fail!(RejectionReason::NoExperimentAssignment {
                experiment: exp.experiment.clone(),
            }),
            Some(arm) if exp.arms.contains(arm) => {
                reasons.push(QualificationReason::ExperimentArm {
                    experiment: exp.experiment.clone(),
                    arm: arm.clone(),
                })
            }
            Some(ExperimentArm::Control) => fail!(RejectionReason::ExperimentControl {
                experiment: exp.experiment.clone(),
            }),
            Some(arm) => fail!(RejectionReason::OtherExperimentVariant {
                experiment: exp.experiment.clone(),
                arm: arm.clone(),
            }),
        }
    }
    if let Some(rule) = &e.rule {
        match request.rules.evaluate(rule) {
            RuleOutcome::Held => reasons.push(QualificationReason::RuleHeld(rule.clone())),
            RuleOutcome::NotHeld => fail!(RejectionReason::RuleNotSatisfied { rule: rule.clone() }),
            RuleOutcome::Unknown(detail) => fail!(RejectionReason::RuleUnknown {
                rule: rule.clone(),
                detail,
            }),
            RuleOutcome::Error(detail) => fail!(RejectionReason::RuleFailed {
                rule: rule.clone(),
                detail,
            }),
        }
    }
    reasons
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::catalogue::{Budget, Eligibility, FrequencyCap, OfferExperiment, OfferKind};
    use crate::money::{CurrencyCode, Money};

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 6, 1, 12, 0, 0).unwrap()
    }

    fn eur(minor: i64) -> Money {
        Money::new(minor, CurrencyCode::new("EUR").unwrap())
    }

    fn segments(ids: &[&str]) -> BTreeSet<SegmentId> {
        ids.iter().map(|s| SegmentId::new(*s)).collect()
    }

    fn offer(id: &str, kind: OfferKind, priority: i32, value: i64, segments_in: &[&str]) -> Offer {
        Offer {
            id: OfferId::new(id),
            name: id.into(),
            kind,
            eligibility: Eligibility {
                segments_in: segments(segments_in),
                ..Eligibility::default()
            },
            channels: BTreeSet::new(),
            marketing: true,
            valid_from: Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap(),
            valid_until: None,
            priority,
            expected_value_minor: value,
            per_customer_cap: None,
            budget: None,
            experiment: None,
        }
    }

    fn customer(segs: &[&str]) -> CustomerContext {
        CustomerContext {
            segments: segments(segs),
            consents: BTreeSet::from([
                ConsentPurpose::EmailMarketing,
                ConsentPurpose::Personalisation,
            ]),
            ..CustomerContext::default()
        }
    }

    fn request<'a>(
        usage: &'a HashMap<OfferId, BudgetUsage>,
        rules: &'a dyn RuleEvaluator,
        channel: Channel,
    ) -> RequestContext<'a> {
        RequestContext {
            now: now(),
            channel,
            max_offers: 3,
            explain_rejections: true,
            budget_usage: usage,
            rules,
        }
    }

    fn no_rules(_: &str) -> bool {
        false
    }

    fn reasons_for<'d>(d: &'d Decision, id: &str) -> &'d [RejectionReason] {
        &d.rejected
            .iter()
            .find(|r| r.offer_id.0 == id)
            .unwrap()
            .reasons
    }

    /// The product brief's four segment strategies, as catalogue data.
    fn strategy_catalogue() -> Catalogue {
        let mut sitewide = offer(
            "sitewide-15pct",
            OfferKind::PercentageDiscount {
                basis_points: 1_500,
            },
            20,
            1_500,
            &[],
        );
        // Champions buy anyway: no blanket discounts for them.
        sitewide.eligibility.segments_out = segments(&["champions"]);
        Catalogue::new(
            vec![
                offer(
                    "champions-backstage-experience",
                    OfferKind::Perk {
                        description: "Invitation to the spring collection preview".into(),
                    },
                    100,
                    5_000,
                    &["champions"],
                ),
                offer(
                    "next-purchase-10pct",
                    OfferKind::PercentageDiscount {
                        basis_points: 1_000,
                    },
                    50,
                    1_000,
                    &["potential-loyalists", "promising", "new-customers"],
                ),
                offer(
                    "we-miss-you-500-points",
                    OfferKind::BonusPoints { points: 500 },
                    60,
                    500,
                    &["about-to-sleep", "hibernating"],
                ),
                offer(
                    "win-back-20-eur",
                    OfferKind::FixedDiscount { amount: eur(2_000) },
                    90,
                    2_000,
                    &["at-risk", "cant-lose-them"],
                ),
                sitewide,
                offer(
                    "newsletter-free-shipping",
                    OfferKind::FreeShipping,
                    10,
                    500,
                    &[],
                ),
            ],
            None,
        )
        .unwrap()
    }

    #[test]
    fn the_four_segment_strategies_pick_the_expected_offer() {
        let catalogue = strategy_catalogue();
        let usage = HashMap::new();
        let rules = no_rules;
        let req = request(&usage, &rules, Channel::Email);
        for (segment, expected) in [
            ("champions", "champions-backstage-experience"),
            ("potential-loyalists", "next-purchase-10pct"),
            ("promising", "next-purchase-10pct"),
            ("new-customers", "next-purchase-10pct"),
            ("about-to-sleep", "we-miss-you-500-points"),
            ("hibernating", "we-miss-you-500-points"),
            ("at-risk", "win-back-20-eur"),
            ("cant-lose-them", "win-back-20-eur"),
        ] {
            let d = decide(&catalogue, &customer(&[segment]), &req);
            assert_eq!(d.offers[0].offer_id.0, expected, "segment {segment}");
            assert!(
                d.offers[0]
                    .reasons
                    .contains(&QualificationReason::InSegment(SegmentId::new(segment))),
                "segment {segment}"
            );
        }
        let champions = decide(&catalogue, &customer(&["champions"]), &req);
        assert_eq!(
            reasons_for(&champions, "sitewide-15pct"),
            &[RejectionReason::Excluded {
                segment: SegmentId::new("champions")
            }]
        );
        assert!(matches!(
            reasons_for(&champions, "win-back-20-eur"),
            [RejectionReason::NotInSegment { .. }]
        ));
    }

    #[test]
    fn ranking_is_by_priority_then_expected_value() {
        let catalogue = Catalogue::new(
            vec![
                offer("low", OfferKind::FreeShipping, 1, 9_999, &[]),
                offer("high-cheap", OfferKind::FreeShipping, 5, 100, &[]),
                offer("high-rich", OfferKind::FreeShipping, 5, 900, &[]),
            ],
            None,
        )
        .unwrap();
        let usage = HashMap::new();
        let rules = no_rules;
        let d = decide(
            &catalogue,
            &customer(&[]),
            &request(&usage, &rules, Channel::Web),
        );
        let ids: Vec<_> = d.offers.iter().map(|o| o.offer_id.0.as_str()).collect();
        assert_eq!(ids, ["high-rich", "high-cheap", "low"]);
    }

    #[test]
    fn marketing_offers_need_the_channel_consent() {
        let catalogue =
            Catalogue::new(vec![offer("o", OfferKind::FreeShipping, 1, 1, &[])], None).unwrap();
        let usage = HashMap::new();
        let rules = no_rules;
        let d = decide(
            &catalogue,
            &customer(&[]),
            &request(&usage, &rules, Channel::Sms),
        );
        assert!(d.offers.is_empty());
        assert_eq!(
            reasons_for(&d, "o"),
            &[RejectionReason::NoConsent {
                purpose: ConsentPurpose::SmsMarketing
            }]
        );
        let d = decide(
            &catalogue,
            &customer(&[]),
            &request(&usage, &rules, Channel::Email),
        );
        assert_eq!(d.offers.len(), 1);
    }

    #[test]
    fn personalised_offers_on_web_need_personalisation_consent() {
        let catalogue = Catalogue::new(
            vec![offer("o", OfferKind::FreeShipping, 1, 1, &["vip"])],
            None,
        )
        .unwrap();
        let usage = HashMap::new();
        let rules = no_rules;
        let mut c = customer(&["vip"]);
        c.consents.remove(&ConsentPurpose::Personalisation);
        let d = decide(&catalogue, &c, &request(&usage, &rules, Channel::Web));
        assert_eq!(
            reasons_for(&d, "o"),
            &[RejectionReason::NoConsent {
                purpose: ConsentPurpose::Personalisation
            }]
        );
    }

    #[test]
    fn global_holdout_gets_nothing() {
        let catalogue = strategy_catalogue();
        let usage = HashMap::new();
        let rules = no_rules;
        let mut c = customer(&["champions"]);
        c.in_global_holdout = true;
        let d = decide(&catalogue, &c, &request(&usage, &rules, Channel::Email));
        assert!(d.holdout);
        assert!(d.offers.is_empty());
        assert!(
            d.rejected
                .iter()
                .all(|r| r.reasons == [RejectionReason::GlobalHoldout])
        );
    }

    #[test]
    fn frequency_cap_limits_offers_across_the_catalogue() {
        let catalogue = Catalogue::new(
            vec![
                offer("a", OfferKind::FreeShipping, 3, 0, &[]),
                offer("b", OfferKind::FreeShipping, 2, 0, &[]),
                offer("c", OfferKind::FreeShipping, 1, 0, &[]),
            ],
            Some(FrequencyCap {
                max_offers: 3,
                window_hours: 24 * 7,
            }),
        )
        .unwrap();
        let usage = HashMap::new();
        let rules = no_rules;
        let mut c = customer(&[]);
        c.recent_issuances = vec![
            now() - Duration::days(1),
            now() - Duration::days(8), // outside the window
        ];
        let d = decide(&catalogue, &c, &request(&usage, &rules, Channel::Web));
        assert_eq!(d.frequency_slots_left, Some(2));
        assert_eq!(d.offers.len(), 2);
        assert!(matches!(
            reasons_for(&d, "c"),
            [RejectionReason::FrequencyCapped {
                issued_in_window: 1,
                ..
            }]
        ));
        c.recent_issuances.push(now() - Duration::hours(1));
        c.recent_issuances.push(now() - Duration::hours(2));
        let d = decide(&catalogue, &c, &request(&usage, &rules, Channel::Web));
        assert!(d.offers.is_empty());
    }

    #[test]
    fn per_customer_cap_and_budget_reject_offers() {
        let mut capped = offer("capped", OfferKind::FreeShipping, 1, 0, &[]);
        capped.per_customer_cap = Some(1);
        let mut budgeted = offer(
            "budgeted",
            OfferKind::FixedDiscount { amount: eur(500) },
            1,
            0,
            &[],
        );
        budgeted.budget = Some(Budget::Money {
            limit: eur(10_000),
            cost_per_issuance_minor: 500,
        });
        let catalogue = Catalogue::new(vec![capped, budgeted], None).unwrap();
        let usage = HashMap::from([(
            OfferId::new("budgeted"),
            BudgetUsage {
                issued: 19,
                spent_minor: 9_600,
            },
        )]);
        let rules = no_rules;
        let mut c = customer(&[]);
        c.issued_per_offer.insert(OfferId::new("capped"), 1);
        let d = decide(&catalogue, &c, &request(&usage, &rules, Channel::Web));
        assert!(d.offers.is_empty());
        assert_eq!(
            reasons_for(&d, "capped"),
            &[RejectionReason::CapReached { cap: 1, issued: 1 }]
        );
        assert_eq!(
            reasons_for(&d, "budgeted"),
            &[RejectionReason::BudgetExhausted]
        );
    }

    #[test]
    fn outside_validity_window_is_rejected() {
        let mut o = offer("expired", OfferKind::FreeShipping, 1, 0, &[]);
        o.valid_until = Some(now());
        let catalogue = Catalogue::new(vec![o], None).unwrap();
        let usage = HashMap::new();
        let rules = no_rules;
        let d = decide(
            &catalogue,
            &customer(&[]),
            &request(&usage, &rules, Channel::Web),
        );
        assert!(matches!(
            reasons_for(&d, "expired"),
            [RejectionReason::OutsideWindow { .. }]
        ));
    }

    #[test]
    fn experiment_control_is_withheld_unless_an_offer_targets_control() {
        let exp = ExperimentId::new("winback-test");
        let mut treatment = offer(
            "treatment",
            OfferKind::FixedDiscount { amount: eur(2_000) },
            10,
            0,
            &[],
        );
        treatment.experiment = Some(OfferExperiment {
            experiment: exp.clone(),
            arms: BTreeSet::from([ExperimentArm::Variant("big".into())]),
        });
        let mut default_for_control = offer("control-default", OfferKind::FreeShipping, 10, 0, &[]);
        default_for_control.experiment = Some(OfferExperiment {
            experiment: exp.clone(),
            arms: BTreeSet::from([ExperimentArm::Control]),
        });
        let catalogue = Catalogue::new(vec![treatment, default_for_control], None).unwrap();
        let usage = HashMap::new();
        let rules = no_rules;
        let req = request(&usage, &rules, Channel::Web);

        let mut c = customer(&[]);
        c.experiment_arms
            .insert(exp.clone(), ExperimentArm::Control);
        let d = decide(&catalogue, &c, &req);
        let ids: Vec<_> = d.offers.iter().map(|o| o.offer_id.0.as_str()).collect();
        assert_eq!(ids, ["control-default"]);
        assert_eq!(
            reasons_for(&d, "treatment"),
            &[RejectionReason::ExperimentControl {
                experiment: exp.clone()
            }]
        );

        c.experiment_arms
            .insert(exp.clone(), ExperimentArm::Variant("big".into()));
        let d = decide(&catalogue, &c, &req);
        let ids: Vec<_> = d.offers.iter().map(|o| o.offer_id.0.as_str()).collect();
        assert_eq!(ids, ["treatment"]);

        c.experiment_arms.clear();
        let d = decide(&catalogue, &c, &req);
        assert!(d.offers.is_empty());
        assert!(matches!(
            reasons_for(&d, "treatment"),
            [RejectionReason::NoExperimentAssignment { .. }]
        ));
    }

    #[test]
    fn rule_is_evaluated_through_the_callers_closure() {
        let mut o = offer("ruled", OfferKind::FreeShipping, 1, 0, &[]);
        o.eligibility.rule = Some("orders_90d >= 3".into());
        let catalogue = Catalogue::new(vec![o], None).unwrap();
        let usage = HashMap::new();
        let yes = |rule: &str| rule == "orders_90d >= 3";
        let d = decide(
            &catalogue,
            &customer(&[]),
            &request(&usage, &yes, Channel::Web),
        );
        assert_eq!(
            d.offers[0].reasons,
            vec![
                QualificationReason::ConsentGranted(ConsentPurpose::Personalisation),
                QualificationReason::RuleHeld("orders_90d >= 3".into())
            ]
        );
        let no = no_rules;
        let d = decide(
            &catalogue,
            &customer(&[]),
            &request(&usage, &no, Channel::Web),
        );
        assert!(d.offers.is_empty());
    }

    #[test]
    fn explaining_reports_every_failed_check_and_silence_reports_none() {
        let mut o = offer("many", OfferKind::FreeShipping, 1, 0, &["champions"]);
        o.eligibility.tiers = BTreeSet::from([TierId::new("gold")]);
        let catalogue = Catalogue::new(vec![o], None).unwrap();
        let usage = HashMap::new();
        let rules = no_rules;
        let mut req = request(&usage, &rules, Channel::Web);
        let d = decide(&catalogue, &customer(&[]), &req);
        assert_eq!(reasons_for(&d, "many").len(), 2);
        req.explain_rejections = false;
        let d = decide(&catalogue, &customer(&[]), &req);
        assert!(d.rejected.is_empty());
    }

    #[test]
    fn max_offers_limits_the_selection() {
        let catalogue = strategy_catalogue();
        let usage = HashMap::new();
        let rules = no_rules;
        let mut req = request(&usage, &rules, Channel::Email);
        req.max_offers = 1;
        let d = decide(&catalogue, &customer(&["at-risk"]), &req);
        assert_eq!(d.offers.len(), 1);
        assert!(matches!(
            reasons_for(&d, "sitewide-15pct"),
            [RejectionReason::RankedBelowLimit { rank: 1, limit: 1 }]
        ));
    }
}
