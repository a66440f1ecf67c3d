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

use crate::earning::{BaseRate, EarningRules};
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

    /// The tier standing of the profile whose ledger is `ledger`, at `now`.
    pub fn tier_standing(
        &self,
        ledger: &PointsLedger,
        now: DateTime<Utc>,
    ) -> Result<TierDecision, TierError> {
        let activity = qualifying_activity(ledger);
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
    ledger
        .entries()
        .iter()
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

    #[test]
    fn builtin_programme_is_valid() {
        Program::builtin().tiers.validate().unwrap();
    }
}
