//! The loyalty programme the service runs: tiers and earning rules, from a TOML file
//! (`offers.program_file`) or the built-in default, and the tier standing derived from a
//! profile's ledger.
//!
//! Tier standing is not stored: it is replayed from the ledger's accruals and reversals (the
//! qualifying activity for [`QualifyingMetric::PointsEarned`]) by evaluating the tier after
//! each activity in time order, carrying the current tier forward, and once more at the time
//! asked about. Upgrades therefore apply at once; a downgrade applies once the profile has
//! stayed below its tier's threshold for the grace period.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::earning::{BaseRate, EarningRules, PeriodToDate};
use crate::ledger::{EntryChange, PointsLedger};
use crate::money::CurrencyCode;
use crate::tiers::{
    CurrentTier, QualifyingActivity, QualifyingMetric, TierBenefits, TierConfig, TierDecision,
    TierDefinition, TierError, TierHistory, TierId, evaluate_tier,
};

/// Tiers and earning rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Program {
    /// The tier ladder.
    pub tiers: TierConfig,
    /// How points are earned (the tier multipliers are taken from `tiers`).
    pub earning: EarningRules,
}

/// The programme file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    /// Unreadable file.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// Invalid JSON/TOML.
    #[error("{0}: {1}")]
    Parse(String, String),
    /// Invalid tiers.
    #[error(transparent)]
    Tier(#[from] TierError),
}

impl Program {
    /// The built-in programme: Bronze (0), Silver (1 000 points earned), Gold (5 000) in a
    /// 365-day window with 30 days' grace; 1 point per EUR/USD/GBP unit; ×1, ×1.25, ×1.5;
    /// points valid 365 days.
    pub fn builtin() -> Self {
        let tier = |id: &str, name: &str, threshold: i64, bp: u32, perks: &[&str]| TierDefinition {
            id: TierId::new(id),
            name: name.into(),
            threshold,
            benefits: TierBenefits {
                points_multiplier_bp: bp,
                perks: perks.iter().map(|p| (*p).to_string()).collect(),
            },
        };
        let tiers = TierConfig {
            tiers: vec![
                tier("bronze", "Bronze", 0, 10_000, &[]),
                tier("silver", "Silver", 1_000, 12_500, &["free shipping"]),
                tier(
                    "gold",
                    "Gold",
                    5_000,
                    15_000,
                    &["free shipping", "early access"],
                ),
            ],
            metric: QualifyingMetric::PointsEarned,
            qualifying_period_days: 365,
            downgrade_grace_days: 30,
        };
        let base_rates = ["EUR", "USD", "GBP"]
            .iter()
            .filter_map(|c| CurrencyCode::new(c).ok())
            .map(|currency| BaseRate {
                currency,
                points: 1,
                per_minor: 100,
                min_order_minor: 0,
            })
            .collect();
        let earning = EarningRules {
            base_rates,
            tier_multipliers: tiers.earning_multipliers(),
            segment_multipliers: BTreeMap::new(),
            category_multipliers: BTreeMap::new(),
            time_windows: Vec::new(),
            max_combined_multiplier_bp: 30_000,
            event_bonuses: BTreeMap::new(),
            caps: Vec::new(),
            points_valid_days: Some(365),
        };
        Self { tiers, earning }
    }

    /// Reads a programme from a TOML file with `[tiers]` and `[earning]` tables shaped like
    /// [`TierConfig`] and [`EarningRules`]; the earning tier multipliers are replaced by the
    /// tiers' benefits.
    pub fn from_toml_file(path: &Path) -> Result<Self, ProgramError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ProgramError::Io(name.clone(), e))?;
        let mut program: Program =
            toml::from_str(&text).map_err(|e| ProgramError::Parse(name, e.to_string()))?;
        program.tiers.validate()?;
        program.earning.tier_multipliers = program.tiers.earning_multipliers();
        Ok(program)
    }

    /// The tier standing of the profile whose ledger is `ledger`, at `now`, for a
    /// points-qualified programme (a spend-qualified one needs [`Self::tier_standing_with`]).
    pub fn tier_standing(
        &self,
        ledger: &PointsLedger,
        now: DateTime<Utc>,
    ) -> Result<TierDecision, TierError> {
        self.tier_standing_with(ledger, &[], now, None)
    }
}

/// One order or refund as qualifying activity, stored per profile and keyed like the ledger
/// (`order:<id>`, `refund:<source>/<event_id>`), so it is recorded once whatever the retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarnActivity {
    /// The idempotency key of the order or refund.
    pub key: String,
    /// When the order or refund happened (the event's `occurred_at`).
    pub at: DateTime<Utc>,
    /// Net spend in minor units of the programme's spend currency: the order total, or minus
    /// the refund; 0 for other currencies or when tiers qualify by points.
    pub spend_minor: i64,
    /// Points the order earned after caps (gross: refunds do not give cap room back).
    pub points: i64,
}

impl Program {
    /// The spend an order or refund counts for tiers: `amount_minor` (negated for refunds by
    /// the caller) when tiers qualify by spend in `currency`, else 0.
    pub fn qualifying_spend(&self, currency: &str, amount_minor: i64) -> i64 {
        match &self.tiers.metric {
            QualifyingMetric::Spend { currency: c } if c.as_str() == currency => amount_minor,
            _ => 0,
        }
    }

    /// Whether tiers need the stored order activity (spend-qualified programmes).
    pub fn tiers_need_activity(&self) -> bool {
        matches!(self.tiers.metric, QualifyingMetric::Spend { .. })
    }

    /// The tier standing at `now` from the ledger (points-qualified programmes) or from the
    /// stored order activity (spend-qualified), ignoring activity keyed `exclude` (the order
    /// being accrued, so a redelivered order earns at the tier it earned at first).
    pub fn tier_standing_with(
        &self,
        ledger: &PointsLedger,
        activity: &[EarnActivity],
        now: DateTime<Utc>,
        exclude: Option<&str>,
    ) -> Result<TierDecision, TierError> {
        let mut qualifying = match self.tiers.metric {
            QualifyingMetric::PointsEarned => {
                let skip: Vec<u64> = exclude
                    .map(|k| {
                        ledger
                            .entries()
                            .iter()
                            .filter(|e| e.key.0 == k)
                            .map(|e| e.seq.0)
                            .collect()
                    })
                    .unwrap_or_default();
                qualifying_activity_except(ledger, &skip)
            }
            QualifyingMetric::Spend { .. } => activity
                .iter()
                .filter(|a| Some(a.key.as_str()) != exclude && a.spend_minor != 0)
                .map(|a| QualifyingActivity {
                    at: a.at,
                    value: a.spend_minor,
                })
                .collect(),
        };
        qualifying.sort_by_key(|a| a.at);
        self.standing_from(&qualifying, now)
    }

    fn standing_from(
        &self,
        activity: &[QualifyingActivity],
        now: DateTime<Utc>,
    ) -> Result<TierDecision, TierError> {
        let mut history = TierHistory {
            current: None,
            activity: Vec::new(),
        };
        for a in activity.iter().filter(|a| a.at <= now) {
            history.activity.push(*a);
            let d = evaluate_tier(&history, &self.tiers, a.at)?;
            history.current = Some(next_current(history.current.take(), &d, a.at));
        }
        evaluate_tier(&history, &self.tiers, now)
    }
}

/// Points already earned from orders in the UTC day and the UTC month of `at`, ignoring the
/// activity keyed `exclude` (the order being accrued): the input of the period caps.
pub fn period_to_date(
    activity: &[EarnActivity],
    at: DateTime<Utc>,
    exclude: Option<&str>,
) -> PeriodToDate {
    use chrono::Datelike;
    let mut to_date = PeriodToDate::default();
    for a in activity.iter().filter(|a| Some(a.key.as_str()) != exclude) {
        if a.at.year() == at.year() && a.at.month() == at.month() {
            to_date.month = to_date.month.saturating_add(a.points);
            if a.at.day() == at.day() {
                to_date.day = to_date.day.saturating_add(a.points);
            }
        }
    }
    to_date
}

fn next_current(prev: Option<CurrentTier>, d: &TierDecision, at: DateTime<Utc>) -> CurrentTier {
    match prev {
        Some(p) if p.tier == d.tier => p,
        _ => CurrentTier {
            tier: d.tier.clone(),
            since: at,
        },
    }
}

/// Points earned (accruals and positive adjustments, net of reversals) as qualifying activity.
pub fn qualifying_activity(ledger: &PointsLedger) -> Vec<QualifyingActivity> {
    qualifying_activity_except(ledger, &[])
}

fn qualifying_activity_except(ledger: &PointsLedger, skip: &[u64]) -> Vec<QualifyingActivity> {
    ledger
        .entries()
        .iter()
        .filter(|e| !skip.contains(&e.seq.0))
        .filter_map(|e| {
            let value = match &e.change {
                EntryChange::Accrued { points, .. } => *points,
                EntryChange::Reversed {
                    draws, unrecovered, ..
                } => {
                    -(draws
                        .iter()
                        .chain(unrecovered)
                        .map(|d| d.points)
                        .sum::<i64>())
                }
                _ => return None,
            };
            Some(QualifyingActivity { at: e.at, value })
        })
        .chain(
            ledger
                .moved_in_earnings()
                .into_iter()
                .map(|(at, value)| QualifyingActivity { at, value }),
        )
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use chrono::{Duration, TimeZone};

    use super::*;
    use crate::ledger::{IdempotencyKey, LedgerCommand, LedgerRequest};

    fn accrue(l: &mut PointsLedger, key: &str, at: DateTime<Utc>, points: i64) {
        l.execute(&LedgerRequest {
            key: IdempotencyKey::new(key),
            at,
            command: LedgerCommand::Accrue {
                points,
                expires_at: None,
                order: None,
            },
        })
        .unwrap();
    }

    #[test]
    fn upgrades_at_once_and_downgrades_only_after_grace() {
        let p = Program::builtin();
        let t0 = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
        let mut l = PointsLedger::new();
        accrue(&mut l, "a", t0, 1_200);
        assert_eq!(p.tier_standing(&l, t0).unwrap().tier, TierId::new("silver"));
        // The points leave the 365-day window; 30 days' grace keep silver.
        let after_window = t0 + Duration::days(366);
        assert_eq!(
            p.tier_standing(&l, after_window).unwrap().tier,
            TierId::new("silver")
        );
        let after_grace = t0 + Duration::days(365 + 31);
        assert_eq!(
            p.tier_standing(&l, after_grace).unwrap().tier,
            TierId::new("bronze")
        );
    }

    fn spend_program() -> Program {
        let mut p = Program::builtin();
        p.tiers.metric = QualifyingMetric::Spend {
            currency: CurrencyCode::new("EUR").unwrap(),
        };
        p.tiers.tiers[1].threshold = 50_000; // silver from EUR 500 spent
        p.tiers.tiers[2].threshold = 200_000;
        p
    }

    fn act(key: &str, at: DateTime<Utc>, spend: i64, points: i64) -> EarnActivity {
        EarnActivity {
            key: key.into(),
            at,
            spend_minor: spend,
            points,
        }
    }

    #[test]
    fn spend_tiers_count_net_spend_in_the_rolling_window_not_points() {
        let p = spend_program();
        let t0 = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
        let empty = PointsLedger::new();
        let a = vec![
            act("order:1", t0, 30_000, 300),
            act("order:2", t0 + Duration::days(10), 25_000, 250),
        ];
        let at = t0 + Duration::days(11);
        let d = p.tier_standing_with(&empty, &a, at, None).unwrap();
        assert_eq!(d.tier, TierId::new("silver"));
        assert_eq!(d.qualifying_value, 55_000);
        // Excluding the order being accrued: earns at the tier held before it.
        let d = p
            .tier_standing_with(&empty, &a, at, Some("order:2"))
            .unwrap();
        assert_eq!(d.tier, TierId::new("bronze"));
        // A refund is negative spend; after the window and the grace, back to bronze.
        let mut a = a;
        a.push(act("refund:x", t0 + Duration::days(12), -10_000, 0));
        let d = p
            .tier_standing_with(&empty, &a, t0 + Duration::days(13), None)
            .unwrap();
        assert_eq!(d.qualifying_value, 45_000);
        assert_eq!(d.tier, TierId::new("silver"), "in grace");
        let d = p
            .tier_standing_with(&empty, &a, t0 + Duration::days(12 + 31), None)
            .unwrap();
        assert_eq!(d.tier, TierId::new("bronze"));
    }

    #[test]
    fn spend_only_counts_in_the_programme_currency() {
        let p = spend_program();
        assert_eq!(p.qualifying_spend("EUR", 1_000), 1_000);
        assert_eq!(p.qualifying_spend("USD", 1_000), 0);
        assert_eq!(Program::builtin().qualifying_spend("EUR", 1_000), 0);
    }

    #[test]
    fn period_to_date_sums_the_utc_day_and_month_except_the_current_order() {
        let at = Utc.with_ymd_and_hms(2025, 3, 15, 12, 0, 0).unwrap();
        let a = vec![
            act("order:a", at - Duration::hours(2), 0, 100),
            act("order:b", at - Duration::days(3), 0, 40),
            act("order:c", at - Duration::days(20), 0, 7), // February
            act("order:now", at, 0, 55),
        ];
        let t = period_to_date(&a, at, Some("order:now"));
        assert_eq!((t.day, t.month), (100, 140));
    }

    #[test]
    fn builtin_programme_is_valid() {
        Program::builtin().tiers.validate().unwrap();
    }
}
