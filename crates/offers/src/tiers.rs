//! Loyalty tiers: qualification on a rolling window, immediate upgrades,
//! downgrades only after a grace period below the current tier's threshold.
//!
//! # Rules
//!
//! * The **qualifying value** at `t` is the sum of [`QualifyingActivity`]
//!   values in the rolling window `(t − qualifying_period, t]` — spend in minor
//!   units of the programme currency, or points earned, as the
//!   [`QualifyingMetric`] says. Refunds are negative activity.
//! * The **qualified tier** is the highest tier whose `threshold` is at most
//!   the qualifying value; the first (entry) tier is the floor.
//! * Higher than the current tier → **upgrade at once**.
//! * Lower → the customer keeps the current tier until the value has been
//!   continuously below the current tier's threshold for `downgrade_grace_days`
//!   (counted from the later of the drop and the date the current tier was
//!   granted); then they move straight to the qualified tier, possibly several
//!   tiers down.
//!
//! The evaluation is a pure function of the history, so it can run on every
//! order or in a nightly sweep with the same result.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::money::CurrencyCode;

/// Identifier of a tier, e.g. `"gold"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TierId(pub String);

impl TierId {
    /// Builds an id from anything string-like.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }
}

/// What a tier gives its members.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TierBenefits {
    /// Points multiplier in basis points (10 000 = ×1); feeds
    /// [`crate::earning::EarningRules::tier_multipliers`].
    pub points_multiplier_bp: u32,
    /// Free-form perks (free shipping, early access…), for display and offer targeting.
    pub perks: Vec<String>,
}

/// One tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierDefinition {
    /// Identifier.
    pub id: TierId,
    /// Display name.
    pub name: String,
    /// Qualifying value needed (in the metric's unit).
    pub threshold: i64,
    /// Benefits.
    pub benefits: TierBenefits,
}

/// What qualifies a customer for a tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QualifyingMetric {
    /// Spend in minor units of this currency.
    Spend {
        /// The programme currency.
        currency: CurrencyCode,
    },
    /// Points earned (not redeemed or expired points).
    PointsEarned,
}

/// Tier programme configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierConfig {
    /// Tiers in ascending order of strictly increasing `threshold`; the first is the entry tier.
    pub tiers: Vec<TierDefinition>,
    /// What activity values mean.
    pub metric: QualifyingMetric,
    /// Length of the rolling qualifying window in days, `> 0`.
    pub qualifying_period_days: u32,
    /// Days a customer must stay below their tier's threshold before a downgrade.
    pub downgrade_grace_days: u32,
}

/// One qualifying event: spend (minor units) or points earned, at a time. Negative for refunds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QualifyingActivity {
    /// When.
    pub at: DateTime<Utc>,
    /// Value in the metric's unit.
    pub value: i64,
}

/// The tier a customer holds now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentTier {
    /// The tier.
    pub tier: TierId,
    /// When it was granted.
    pub since: DateTime<Utc>,
}

/// Everything [`evaluate_tier`] needs about a customer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierHistory {
    /// Current tier, if any.
    pub current: Option<CurrentTier>,
    /// Qualifying activity, in any order; at least the last
    /// `qualifying_period + downgrade_grace` days are needed for exact results.
    pub activity: Vec<QualifyingActivity>,
}

/// Kind of change decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TierChange {
    /// The customer had no tier.
    Initial,
    /// Moved up.
    Upgrade,
    /// Moved down after the grace period.
    Downgrade,
    /// No change.
    Unchanged,
}

/// Why the decision was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TierReason {
    /// The qualifying value meets this tier's threshold.
    QualifiesFor {
        /// Highest tier qualified for.
        tier: TierId,
        /// Rolling value.
        value: i64,
        /// That tier's threshold.
        threshold: i64,
    },
    /// The value is below the current tier's threshold but the grace period runs.
    InGracePeriod {
        /// Tier kept.
        tier: TierId,
        /// Its threshold.
        threshold: i64,
        /// Since when the value has been below it.
        below_since: DateTime<Utc>,
        /// When a downgrade becomes due.
        grace_ends_at: DateTime<Utc>,
    },
    /// The grace period is over.
    GraceExpired {
        /// Since when the value has been below the old threshold.
        below_since: DateTime<Utc>,
    },
    /// The recorded current tier is not in the configuration any more; treated as no tier.
    UnknownCurrentTier {
        /// The recorded tier.
        tier: TierId,
    },
}

/// How far the customer is from the next tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextTier {
    /// The next tier up.
    pub tier: TierId,
    /// Additional qualifying value needed now, `> 0`.
    pub value_needed: i64,
}

/// Result of [`evaluate_tier`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierDecision {
    /// Tier the customer should hold from `now`.
    pub tier: TierId,
    /// Tier held before.
    pub previous: Option<TierId>,
    /// What changed.
    pub change: TierChange,
    /// Rolling qualifying value at `now`.
    pub qualifying_value: i64,
    /// Why.
    pub reasons: Vec<TierReason>,
    /// Next tier above the decided one, if any.
    pub next_tier: Option<NextTier>,
}

/// Invalid tier configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TierError {
    /// No tiers.
    #[error("a tier configuration needs at least one tier")]
    NoTiers,
    /// Thresholds must strictly increase.
    #[error("tier {0:?} does not have a higher threshold than the tier before it")]
    ThresholdsNotAscending(TierId),
    /// Tier ids must be unique.
    #[error("tier {0:?} is defined twice")]
    DuplicateTier(TierId),
    /// The rolling period must be at least a day.
    #[error("the qualifying period must be at least one day")]
    EmptyQualifyingPeriod,
}

impl TierConfig {
    /// Checks the configuration's invariants.
    pub fn validate(&self) -> Result<(), TierError> {
        let first = self.tiers.first().ok_or(TierError::NoTiers)?;
        if self.qualifying_period_days == 0 {
            return Err(TierError::EmptyQualifyingPeriod);
        }
        let mut seen = BTreeSet::from([&first.id]);
        for pair in self.tiers.windows(2) {
            if pair[1].threshold <= pair[0].threshold {
                return Err(TierError::ThresholdsNotAscending(pair[1].id.clone()));
            }
            if !seen.insert(&pair[1].id) {
                return Err(TierError::DuplicateTier(pair[1].id.clone()));
            }
        }
        Ok(())
    }

    /// The tier's definition.
    pub fn tier(&self, id: &TierId) -> Option<&TierDefinition> {
        self.tiers.iter().find(|t| &t.id == id)
    }

    /// Tier points multipliers, ready for [`crate::earning::EarningRules::tier_multipliers`].
    pub fn earning_multipliers(&self) -> BTreeMap<TierId, u32> {
        self.tiers
            .iter()
            .map(|t| (t.id.clone(), t.benefits.points_multiplier_bp))
            .collect()
    }

    fn index_for_value(&self, value: i64) -> usize {
        self.tiers
            .iter()
            .rposition(|t| t.threshold <= value)
            .unwrap_or(0)
    }
}

/// Rolling-window sums over sorted activity.
struct Rolling {
    times: Vec<DateTime<Utc>>,
    /// prefix[i] = sum of the first i values.
    prefix: Vec<i64>,
    period: Duration,
}

impl Rolling {
    fn new(activity: &[QualifyingActivity], period: Duration, now: DateTime<Utc>) -> Self {
        let mut sorted: Vec<_> = activity.iter().filter(|a| a.at <= now).copied().collect();
        sorted.sort_by_key(|a| a.at);
        let mut prefix = Vec::with_capacity(sorted.len() + 1);
        prefix.push(0i64);
        for a in &sorted {
            let last = prefix.last().copied().unwrap_or(0);
            prefix.push(last.saturating_add(a.value));
        }
        Self {
            times: sorted.iter().map(|a| a.at).collect(),
            prefix,
            period,
        }
    }

    /// Sum over `(t − period, t]`.
    fn value_at(&self, t: DateTime<Utc>) -> i64 {
        let hi = self.times.partition_point(|a| *a <= t);
        let lo = self.times.partition_point(|a| *a <= t - self.period);
        self.prefix[hi] - self.prefix[lo.min(hi)]
    }

    /// Start of the current uninterrupted stretch (ending at `now`) during
    /// which the value has been below `threshold`; `None` if it never was
    /// at or above it in the known history.
    fn below_since(&self, threshold: i64, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut breakpoints: Vec<DateTime<Utc>> = self
            .times
            .iter()
            .flat_map(|t| [*t, *t + self.period])
            .filter(|t| *t <= now)
            .collect();
        breakpoints.sort();
        breakpoints.dedup();
        let last_ok = breakpoints
            .iter()
            .rposition(|b| self.value_at(*b) >= threshold)?;
        Some(breakpoints.get(last_ok + 1).copied().unwrap_or(now))
    }
}

/// Decides the tier a customer should hold at `now`; see the [module docs](self).
pub fn evaluate_tier(
    history: &TierHistory,
    config: &TierConfig,
    now: DateTime<Utc>,
) -> Result<TierDecision, TierError> {
    config.validate()?;
    let rolling = Rolling::new(
        &history.activity,
        Duration::days(i64::from(config.qualifying_period_days)),
        now,
    );
    let value = rolling.value_at(now);
    let qualified = config.index_for_value(value);
    let qualified_tier = &config.tiers[qualified];
    let mut reasons = vec![TierReason::QualifiesFor {
        tier: qualified_tier.id.clone(),
        value,
        threshold: qualified_tier.threshold,
    }];

    let current = history.current.as_ref().and_then(|c| {
        let index = config.tiers.iter().position(|t| t.id == c.tier);
        if index.is_none() {
            reasons.push(TierReason::UnknownCurrentTier {
                tier: c.tier.clone(),
            });
        }
        index.map(|i| (i, c))
    });

    let (decided, change) = match current {
        None => (qualified, TierChange::Initial),
        Some((held, _)) if qualified > held => (qualified, TierChange::Upgrade),
        Some((held, _)) if qualified == held => (held, TierChange::Unchanged),
        Some((held, c)) => {
            let threshold = config.tiers[held].threshold;
            let below_since = rolling
                .below_since(threshold, now)
                .map_or(c.since, |t| t.max(c.since));
            let grace_ends_at =
                below_since + Duration::days(i64::from(config.downgrade_grace_days));
            if now >= grace_ends_at {
                reasons.push(TierReason::GraceExpired { below_since });
                (qualified, TierChange::Downgrade)
            } else {
                reasons.push(TierReason::InGracePeriod {
                    tier: config.tiers[held].id.clone(),
                    threshold,
                    below_since,
                    grace_ends_at,
                });
                (held, TierChange::Unchanged)
            }
        }
    };
    let next_tier = config.tiers.get(decided + 1).map(|t| NextTier {
        tier: t.id.clone(),
        value_needed: t.threshold.saturating_sub(value).max(1),
    });
    Ok(TierDecision {
        tier: config.tiers[decided].id.clone(),
        previous: history.current.as_ref().map(|c| c.tier.clone()),
        change,
        qualifying_value: value,
        reasons,
        next_tier,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn day(d: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap() + Duration::days(d)
    }

    fn config() -> TierConfig {
        let tier = |id: &str, threshold, bp| TierDefinition {
            id: TierId::new(id),
            name: id.to_uppercase(),
            threshold,
            benefits: TierBenefits {
                points_multiplier_bp: bp,
                perks: Vec::new(),
            },
        };
        TierConfig {
            tiers: vec![
                tier("bronze", 0, 10_000),
                tier("silver", 50_000, 12_500),
                tier("gold", 150_000, 15_000),
                tier("vip", 500_000, 20_000),
            ],
            metric: QualifyingMetric::Spend {
                currency: CurrencyCode::new("EUR").unwrap(),
            },
            qualifying_period_days: 365,
            downgrade_grace_days: 30,
        }
    }

    fn spend(d: i64, value: i64) -> QualifyingActivity {
        QualifyingActivity { at: day(d), value }
    }

    fn holding(tier: &str, since: i64, activity: Vec<QualifyingActivity>) -> TierHistory {
        TierHistory {
            current: Some(CurrentTier {
                tier: TierId::new(tier),
                since: day(since),
            }),
            activity,
        }
    }

    #[test]
    fn new_customer_gets_the_tier_their_rolling_spend_qualifies_for() {
        let history = TierHistory {
            current: None,
            activity: vec![spend(0, 30_000), spend(10, 30_000)],
        };
        let d = evaluate_tier(&history, &config(), day(20)).unwrap();
        assert_eq!(d.tier, TierId::new("silver"));
        assert_eq!(d.change, TierChange::Initial);
        assert_eq!(
            d.next_tier,
            Some(NextTier {
                tier: TierId::new("gold"),
                value_needed: 90_000
            })
        );
    }

    #[test]
    fn upgrade_happens_at_once() {
        let history = holding("bronze", 0, vec![spend(5, 200_000)]);
        let d = evaluate_tier(&history, &config(), day(5)).unwrap();
        assert_eq!(d.tier, TierId::new("gold"));
        assert_eq!(d.change, TierChange::Upgrade);
    }

    #[test]
    fn downgrade_waits_for_the_grace_period_below_threshold() {
        // 200k spent on day 0 drops out of the 365-day window on day 365.
        let history = holding("gold", 0, vec![spend(0, 200_000), spend(100, 60_000)]);
        let within = evaluate_tier(&history, &config(), day(380)).unwrap();
        assert_eq!(within.tier, TierId::new("gold"));
        assert_eq!(within.change, TierChange::Unchanged);
        assert!(within.reasons.iter().any(|r| matches!(
            r,
            TierReason::InGracePeriod { below_since, .. } if *below_since == day(365)
        )));
        let after = evaluate_tier(&history, &config(), day(395)).unwrap();
        assert_eq!(after.tier, TierId::new("silver"));
        assert_eq!(after.change, TierChange::Downgrade);
    }

    #[test]
    fn recovering_within_grace_keeps_the_tier() {
        let history = holding("gold", 0, vec![spend(0, 200_000), spend(370, 150_000)]);
        let d = evaluate_tier(&history, &config(), day(400)).unwrap();
        assert_eq!(d.tier, TierId::new("gold"));
        assert!(
            !d.reasons
                .iter()
                .any(|r| matches!(r, TierReason::InGracePeriod { .. }))
        );
    }

    #[test]
    fn downgrade_can_skip_several_tiers() {
        let history = holding("vip", 0, vec![spend(0, 600_000)]);
        let d = evaluate_tier(&history, &config(), day(400)).unwrap();
        assert_eq!(d.tier, TierId::new("bronze"));
        assert_eq!(d.change, TierChange::Downgrade);
    }

    #[test]
    fn manually_granted_tier_gets_grace_from_the_grant_date() {
        let history = holding("gold", 100, vec![]);
        let d = evaluate_tier(&history, &config(), day(120)).unwrap();
        assert_eq!(d.tier, TierId::new("gold"));
        let d = evaluate_tier(&history, &config(), day(130)).unwrap();
        assert_eq!(d.tier, TierId::new("bronze"));
    }

    #[test]
    fn thresholds_must_ascend() {
        let mut c = config();
        c.tiers.swap(1, 2);
        assert!(matches!(
            c.validate(),
            Err(TierError::ThresholdsNotAscending(_))
        ));
    }
}
