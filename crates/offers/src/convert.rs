//! Mappings between the protobuf contract and the pure domain types.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use clientele_proto::v1 as pb;
use clientele_runtime::time::{micros, timestamp};

use crate::catalogue::{
    self, Budget, Channel, ConsentPurpose, Eligibility, LifecycleState, OfferKind,
};
use crate::decision::{QualificationReason, RejectionReason};
use crate::money::{CurrencyCode, Money};
use crate::store::{OfferRecord, StoredEntry};
use crate::tiers::TierId;
use crate::upstream::membership_key;

/// Microseconds → `DateTime<Utc>` (saturating to the epoch on overflow).
pub fn utc(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// `Timestamp` → `DateTime<Utc>`.
pub fn ts_utc(ts: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    micros(ts).map(utc)
}

/// `DateTime<Utc>` → `Timestamp`.
pub fn utc_ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    timestamp(t.timestamp_micros())
}

/// The domain channel of a `pb::Channel`.
pub fn channel(c: i32) -> Option<Channel> {
    use pb::Channel as C;
    Some(match C::try_from(c).ok()? {
        C::Web => Channel::Web,
        C::App => Channel::App,
        C::Pos => Channel::Pos,
        C::Email => Channel::Email,
        C::Sms => Channel::Sms,
        C::Push => Channel::Push,
        _ => return None,
    })
}

/// The `pb::Channel` of a domain channel.
pub fn pb_channel(c: Channel) -> pb::Channel {
    match c {
        Channel::Web => pb::Channel::Web,
        Channel::App => pb::Channel::App,
        Channel::Pos => pb::Channel::Pos,
        Channel::Email => pb::Channel::Email,
        Channel::Sms => pb::Channel::Sms,
        Channel::Push => pb::Channel::Push,
    }
}

/// The domain consent purpose of a `pb::ConsentPurpose` (analytics has none).
pub fn purpose(p: i32) -> Option<ConsentPurpose> {
    use pb::ConsentPurpose as P;
    Some(match P::try_from(p).ok()? {
        P::Email => ConsentPurpose::EmailMarketing,
        P::Sms => ConsentPurpose::SmsMarketing,
        P::Push => ConsentPurpose::PushMarketing,
        P::Personalisation => ConsentPurpose::Personalisation,
        _ => return None,
    })
}

/// The `pb::ConsentPurpose` of a domain purpose.
pub fn pb_purpose(p: ConsentPurpose) -> pb::ConsentPurpose {
    match p {
        ConsentPurpose::EmailMarketing => pb::ConsentPurpose::Email,
        ConsentPurpose::SmsMarketing => pb::ConsentPurpose::Sms,
        ConsentPurpose::PushMarketing => pb::ConsentPurpose::Push,
        ConsentPurpose::Personalisation => pb::ConsentPurpose::Personalisation,
    }
}

/// The domain lifecycle id of a `pb::LifecycleState` (its enum name).
pub fn lifecycle(s: i32) -> LifecycleState {
    LifecycleState::new(
        pb::LifecycleState::try_from(s)
            .map_or_else(|_| s.to_string(), |v| v.as_str_name().to_string()),
    )
}

/// The `pb::OfferKind` of a benefit.
pub fn offer_kind(benefit: Option<&pb::offer::Benefit>) -> pb::OfferKind {
    use pb::offer::Benefit as B;
    match benefit {
        Some(B::PercentageDiscount(_)) => pb::OfferKind::PercentageDiscount,
        Some(B::FixedDiscount(_)) => pb::OfferKind::FixedDiscount,
        Some(B::BonusPoints(_)) => pb::OfferKind::BonusPoints,
        Some(B::PointsMultiplier(_)) => pb::OfferKind::PointsMultiplier,
        Some(B::FreeShipping(_)) => pb::OfferKind::FreeShipping,
        Some(B::Perk(_)) => pb::OfferKind::Perk,
        Some(B::Coupon(_)) => pb::OfferKind::Coupon,
        None => pb::OfferKind::Unspecified,
    }
}

fn money(m: Option<&pb::Money>) -> Option<Money> {
    let m = m?;
    Some(Money::new(
        m.amount_minor,
        CurrencyCode::new(&m.currency).ok()?,
    ))
}

fn domain_kind(benefit: Option<&pb::offer::Benefit>) -> OfferKind {
    use pb::offer::Benefit as B;
    match benefit {
        Some(B::PercentageDiscount(p)) => OfferKind::PercentageDiscount {
            basis_points: u32::try_from(p.percent_bps).unwrap_or(0),
        },
        Some(B::FixedDiscount(f)) => match money(f.amount.as_ref()) {
            Some(amount) => OfferKind::FixedDiscount { amount },
            None => OfferKind::FreeShipping,
        },
        Some(B::BonusPoints(b)) => OfferKind::BonusPoints { points: b.points },
        Some(B::PointsMultiplier(m)) => OfferKind::PointsMultiplier {
            multiplier_bp: u32::try_from(m.multiplier_bps).unwrap_or(0),
        },
        Some(B::Perk(p)) => OfferKind::Perk {
            description: p.title.clone(),
        },
        Some(B::Coupon(c)) => OfferKind::Coupon {
            code: c.code.clone(),
        },
        Some(B::FreeShipping(_)) | None => OfferKind::FreeShipping,
    }
}

/// The domain offer for a stored, validated offer. The rule expression, extra consents and
/// store ids are checked by the service, not by the pure decision.
pub fn domain_offer(rec: &OfferRecord) -> catalogue::Offer {
    let o = &rec.offer;
    let e = o.eligibility.clone().unwrap_or_default();
    let refs = |v: &[pb::SegmentRef]| -> BTreeSet<catalogue::SegmentId> {
        v.iter()
            .map(|r| catalogue::SegmentId::new(membership_key(&r.segment_id, r.cluster_index)))
            .collect()
    };
    let budget = match o.budget.as_ref().and_then(|b| b.limit.as_ref()) {
        Some(pb::budget::Limit::MaxIssued(n)) => Some(Budget::Count {
            max_issuances: u64::try_from(*n).unwrap_or(0),
        }),
        Some(pb::budget::Limit::MaxCost(m)) => money(m.limit.as_ref()).map(|limit| Budget::Money {
            limit,
            cost_per_issuance_minor: m.cost_per_issue.as_ref().map_or(0, |c| c.amount_minor),
        }),
        None => None,
    };
    catalogue::Offer {
        id: catalogue::OfferId::new(&o.offer_id),
        name: o.display_name.clone(),
        kind: domain_kind(o.benefit.as_ref()),
        eligibility: Eligibility {
            segments_in: refs(&e.include_segments),
            segments_out: refs(&e.exclude_segments),
            tiers: e.tier_ids.iter().map(TierId::new).collect(),
            lifecycle_states: e.lifecycle_states.iter().map(|s| lifecycle(*s)).collect(),
            rule: Some(e.rule_expression.trim())
                .filter(|r| !r.is_empty())
                .map(str::to_string),
        },
        channels: e.channels.iter().filter_map(|c| channel(*c)).collect(),
        marketing: !o.transactional,
        valid_from: o.starts_at.as_ref().and_then(ts_utc).unwrap_or_default(),
        valid_until: o.ends_at.as_ref().and_then(ts_utc),
        priority: o.priority,
        expected_value_minor: o.expected_value.as_ref().map_or(0, |m| m.amount_minor),
        per_customer_cap: o.per_profile_cap.and_then(|c| u32::try_from(c).ok()),
        budget,
        experiment: o.experiment.as_ref().map(|x| catalogue::OfferExperiment {
            experiment: catalogue::ExperimentId::new(&x.experiment_key),
            arms: x
                .variant_keys
                .iter()
                .map(|k| catalogue::ExperimentArm::Variant(k.clone()))
                .collect(),
        }),
    }
}

/// The API offer: stored definition plus output-only fields.
pub fn pb_offer(rec: &OfferRecord) -> pb::Offer {
    let mut o = rec.offer.clone();
    o.kind = offer_kind(o.benefit.as_ref()) as i32;
    o.status = rec.status;
    o.version = rec.version;
    o.create_time = Some(timestamp(rec.created_at));
    o.update_time = Some(timestamp(rec.updated_at));
    let (limit_issued, limit_cost) = match o.budget.as_ref().and_then(|b| b.limit.as_ref()) {
        Some(pb::budget::Limit::MaxIssued(n)) => (Some(*n), None),
        Some(pb::budget::Limit::MaxCost(m)) => (None, m.limit.clone()),
        None => (None, None),
    };
    let exhausted = limit_issued.is_some_and(|n| rec.issued >= n)
        || limit_cost.as_ref().is_some_and(|l| {
            let per = match o.budget.as_ref().and_then(|b| b.limit.as_ref()) {
                Some(pb::budget::Limit::MaxCost(m)) => {
                    m.cost_per_issue.as_ref().map_or(0, |c| c.amount_minor)
                }
                _ => 0,
            };
            rec.cost_booked + per > l.amount_minor
        });
    o.usage = Some(pb::OfferUsage {
        issued: rec.issued,
        redeemed: rec.redeemed,
        cost_booked: limit_cost.map(|l| pb::Money {
            amount_minor: rec.cost_booked,
            currency: l.currency,
        }),
        budget_exhausted: exhausted,
    });
    o
}

/// Clears output-only fields of an offer from a request.
pub fn strip_output(o: &mut pb::Offer) {
    o.kind = 0;
    o.usage = None;
    o.version = 0;
    o.create_time = None;
    o.update_time = None;
    o.status = 0;
}

/// The API ledger entry.
pub fn pb_entry(s: &StoredEntry) -> pb::LedgerEntry {
    use crate::ledger::EntryChange;
    let unrecovered = match &s.entry.change {
        EntryChange::Reversed { unrecovered, .. } => unrecovered.iter().map(|d| d.points).sum(),
        _ => 0,
    };
    let reference = match &s.entry.change {
        EntryChange::Redeemed { reference, .. } => reference.clone(),
        _ => s.meta.reference.clone(),
    };
    pb::LedgerEntry {
        entry_id: s.entry_id.clone(),
        profile_id: s.profile_id.clone(),
        kind: s.kind,
        points: s.points,
        available_balance_after: s.balance_after,
        created_at: Some(timestamp(s.created_at)),
        order_id: s.order_id.clone(),
        unrecovered_points: unrecovered,
        issue_id: s.meta.issue_id.clone(),
        adjustment_reason: s.meta.adjustment_reason,
        note: s.meta.note.clone(),
        actor: s.meta.actor.clone(),
        reference,
    }
}

/// A segment reference from a membership key (`id` or `id#k`).
pub fn segment_ref(key: &str) -> pb::SegmentRef {
    match key.split_once('#') {
        Some((id, k)) => pb::SegmentRef {
            segment_id: id.to_string(),
            cluster_index: k.parse().ok(),
        },
        None => pb::SegmentRef {
            segment_id: key.to_string(),
            cluster_index: None,
        },
    }
}

fn subject(s: pb::reason_subject::Subject) -> Option<pb::ReasonSubject> {
    Some(pb::ReasonSubject { subject: Some(s) })
}

fn lifecycle_pb(s: &LifecycleState) -> i32 {
    pb::LifecycleState::from_str_name(&s.0).map_or(0, |v| v as i32)
}

/// The API reason an offer qualified.
pub fn pb_qualification(q: &QualificationReason, variant_key: &str) -> pb::EligibilityReason {
    use pb::EligibilityReasonCode as C;
    use pb::reason_subject::Subject as S;
    let (code, subj) = match q {
        QualificationReason::OpenToAll => (C::Untargeted, None),
        QualificationReason::InSegment(s) => {
            (C::SegmentMatched, subject(S::Segment(segment_ref(&s.0))))
        }
        QualificationReason::TierMatched(t) => (C::TierMatched, subject(S::TierId(t.0.clone()))),
        QualificationReason::LifecycleMatched(l) => (
            C::LifecycleMatched,
            subject(S::LifecycleState(lifecycle_pb(l))),
        ),
        QualificationReason::RuleHeld(rule) => {
            return pb::EligibilityReason {
                code: C::RuleMatched as i32,
                subject: None,
                detail: format!("rule `{rule}` is true"),
            };
        }
        QualificationReason::ConsentGranted(p) => (
            C::ConsentGranted,
            subject(S::ConsentPurpose(pb_purpose(*p) as i32)),
        ),
        QualificationReason::ExperimentArm { experiment, arm } => (
            C::ExperimentArm,
            subject(S::Experiment(pb::ExperimentArm {
                experiment_key: experiment.0.clone(),
                variant_index: i32::from(!matches!(arm, catalogue::ExperimentArm::Control)),
                variant_key: variant_key.to_string(),
            })),
        ),
    };
    pb::EligibilityReason {
        code: code as i32,
        subject: subj,
        detail: String::new(),
    }
}

/// The API rejection for a domain one.
pub fn pb_rejection(
    r: &RejectionReason,
    channel_req: i32,
    now: DateTime<Utc>,
) -> pb::OfferRejection {
    use pb::RejectionCode as C;
    use pb::reason_subject::Subject as S;
    let (code, subj, detail) = match r {
        RejectionReason::GlobalHoldout => {
            (C::GlobalHoldout, None, "in the global holdout".to_string())
        }
        RejectionReason::OutsideWindow {
            valid_from,
            valid_until,
        } => {
            let d = format!("valid from {valid_from} until {valid_until:?}");
            (C::NotStarted, None, d)
        }
        RejectionReason::ChannelNotSupported { .. } => (
            C::ChannelNotAllowed,
            subject(S::Channel(channel_req)),
            "the offer is not delivered on this channel".into(),
        ),
        RejectionReason::NoConsent { purpose } => (
            C::ConsentMissing,
            subject(S::ConsentPurpose(pb_purpose(*purpose) as i32)),
            format!(
                "consent {} is not granted",
                pb_purpose(*purpose).as_str_name()
            ),
        ),
        RejectionReason::NotInSegment { required } => (
            C::SegmentNotMatched,
            None,
            format!(
                "not in any of {}",
                required
                    .iter()
                    .map(|s| s.0.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        RejectionReason::Excluded { segment } => (
            C::SegmentExcluded,
            subject(S::Segment(segment_ref(&segment.0))),
            format!("in excluded segment {}", segment.0),
        ),
        RejectionReason::TierNotEligible { tier } => (
            C::TierNotAllowed,
            tier.as_ref().and_then(|t| subject(S::TierId(t.0.clone()))),
            "tier not allowed".into(),
        ),
        RejectionReason::LifecycleNotEligible { state } => (
            C::LifecycleNotAllowed,
            state
                .as_ref()
                .and_then(|s| subject(S::LifecycleState(lifecycle_pb(s)))),
            "lifecycle state not allowed".into(),
        ),
        RejectionReason::CapReached { cap, issued } => (
            C::ProfileCapReached,
            None,
            format!("holds {issued} of at most {cap} codes"),
        ),
        RejectionReason::BudgetExhausted => (C::BudgetExhausted, None, "budget exhausted".into()),
        RejectionReason::ExperimentControl { experiment } => (
            C::ExperimentControl,
            subject(S::Experiment(pb::ExperimentArm {
                experiment_key: experiment.0.clone(),
                variant_index: 0,
                variant_key: String::new(),
            })),
            "assigned to the control variant".into(),
        ),
        RejectionReason::OtherExperimentVariant { experiment, arm } => (
            C::OtherExperimentVariant,
            subject(S::Experiment(pb::ExperimentArm {
                experiment_key: experiment.0.clone(),
                variant_index: 1,
                variant_key: match arm {
                    catalogue::ExperimentArm::Variant(k) => k.clone(),
                    catalogue::ExperimentArm::Control => String::new(),
                },
            })),
            "assigned to a variant that does not receive the offer".into(),
        ),
        RejectionReason::NoExperimentAssignment { experiment } => (
            C::NotInExperiment,
            None,
            format!("not in experiment {}", experiment.0),
        ),
        RejectionReason::RuleNotSatisfied { rule } => {
            (C::RuleNotMatched, None, format!("rule `{rule}` is false"))
        }
        RejectionReason::RuleUnknown { rule, detail } => (
            C::RuleNotMatched,
            None,
            format!("rule `{rule}` is unknown: {detail}"),
        ),
        RejectionReason::RuleFailed { rule, detail } => (
            C::RuleError,
            None,
            format!("rule `{rule}` failed to evaluate: {detail}"),
        ),
        RejectionReason::FrequencyCapped {
            max_offers,
            window_hours,
            issued_in_window,
        } => (
            C::FrequencyCapped,
            None,
            format!("{issued_in_window} codes in the last {window_hours} h (cap {max_offers})"),
        ),
        RejectionReason::RankedBelowLimit { rank, limit } => (
            C::RankedOut,
            None,
            format!("ranked {} of at most {limit}", rank + 1),
        ),
    };
    // Before the start is NOT_STARTED; otherwise the window has ended.
    let code = match r {
        RejectionReason::OutsideWindow { valid_from, .. } if now >= *valid_from => C::Ended,
        _ => code,
    };
    pb::OfferRejection {
        code: code as i32,
        subject: subj,
        detail,
    }
}
