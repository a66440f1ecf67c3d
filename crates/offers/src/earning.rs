//! Earning rules: how many points an order or an event earns, with an explanation.
//!
//! # How points for an order are computed
//!
//! 1. The order's currency must have a [`BaseRate`]; every line must be in the
//!    order's currency and no amount may be negative.
//! 2. An order whose total is below the rate's `min_order_minor` earns nothing.
//! 3. Points are earned on the line items (so shipping and tax, if the caller
//!    leaves them out of the lines, earn nothing); an order without lines
//!    earns on its total.
//! 4. Multipliers are integer basis points (10 000 = ×1). Within each kind the
//!    **highest** applicable multiplier wins — the tier's, the best of the
//!    customer's segments', the best active time window's, the line's
//!    category's; kinds that do not apply count as ×1. Kinds are **multiplied**
//!    together (truncating to a whole basis point after each step) and the
//!    product is capped at [`EarningRules::max_combined_multiplier_bp`].
//!    A category multiplier of 0 excludes a category (e.g. gift cards).
//! 5. Each line earns `floor(amount_minor × rate.points × multiplier_bp /
//!    (rate.per_minor × 10 000))`; rounding is down, per line, so the
//!    explanation adds up exactly.
//! 6. Period caps (per day, per month) clip the result against the points the
//!    customer has already earned in that period ([`PeriodToDate`]); the caller
//!    computes period-to-date in the programme's time zone.
//!
//! Event bonuses (review submitted, referral…) are flat points: multipliers do
//! not apply to them, caps do.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::catalogue::SegmentId;
use crate::ledger::{LedgerCommand, OrderRef, Points};
use crate::money::{CurrencyCode, Money};
use crate::tiers::TierId;

/// ×1 in basis points.
pub const UNIT_MULTIPLIER_BP: u32 = 10_000;

/// Points per amount of one currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRate {
    /// The currency this rate applies to.
    pub currency: CurrencyCode,
    /// Points earned per `per_minor` minor units, `>= 0`.
    pub points: i64,
    /// Amount in minor units that earns `points`, `> 0` (e.g. 100 = per euro).
    pub per_minor: i64,
    /// Orders with a total below this (minor units) earn no points.
    pub min_order_minor: i64,
}

/// A multiplier active during `[starts_at, ends_at)`, e.g. "double points weekend".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeWindowMultiplier {
    /// Name shown in the explanation.
    pub name: String,
    /// Start, inclusive.
    pub starts_at: DateTime<Utc>,
    /// End, exclusive.
    pub ends_at: DateTime<Utc>,
    /// Multiplier in basis points.
    pub multiplier_bp: u32,
}

/// An event that earns a flat bonus.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BonusEvent {
    /// The customer submitted a product review.
    ReviewSubmitted,
    /// A customer the customer referred completed a first purchase.
    ReferralCompleted,
    /// The customer's birthday.
    Birthday,
    /// Any other programme-defined event.
    Custom(String),
}

/// A cap period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CapPeriod {
    /// The current calendar day in the programme's time zone.
    Day,
    /// The current calendar month in the programme's time zone.
    Month,
}

/// At most `max_points` earned per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodCap {
    /// The period.
    pub period: CapPeriod,
    /// Points allowed per period, `>= 0`.
    pub max_points: Points,
}

/// Points the customer has already earned in the current periods.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodToDate {
    /// Earned so far today.
    pub day: Points,
    /// Earned so far this month.
    pub month: Points,
}

impl PeriodToDate {
    fn get(&self, period: CapPeriod) -> Points {
        match period {
            CapPeriod::Day => self.day,
            CapPeriod::Month => self.month,
        }
    }
}

/// The programme's earning configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarningRules {
    /// One rate per accepted currency.
    pub base_rates: Vec<BaseRate>,
    /// Multiplier by loyalty tier (see [`crate::tiers::TierConfig::earning_multipliers`]).
    pub tier_multipliers: BTreeMap<TierId, u32>,
    /// Multiplier by segment; the highest among the customer's segments applies.
    pub segment_multipliers: BTreeMap<SegmentId, u32>,
    /// Multiplier by line category; missing categories are ×1.
    pub category_multipliers: BTreeMap<String, u32>,
    /// Promotional windows; the highest active one applies.
    pub time_windows: Vec<TimeWindowMultiplier>,
    /// Upper bound of the combined multiplier, in basis points.
    pub max_combined_multiplier_bp: u32,
    /// Flat bonus points per event.
    pub event_bonuses: BTreeMap<BonusEvent, Points>,
    /// Caps on points earned per period (orders and bonuses alike).
    pub caps: Vec<PeriodCap>,
    /// Days until earned points expire; `None` = never.
    pub points_valid_days: Option<u32>,
}

/// One purchased line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// Product identifier, for the explanation.
    pub sku: String,
    /// Product category, matched against the category multipliers.
    pub category: String,
    /// Line amount after discounts, `>= 0`, in the order's currency.
    pub amount: Money,
}

/// An order to earn points on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Commerce system order id.
    pub id: String,
    /// When it was placed (selects time-window multipliers).
    pub placed_at: DateTime<Utc>,
    /// Order total, `>= 0`.
    pub amount: Money,
    /// Line items; may be empty.
    pub lines: Vec<OrderLine>,
}

/// Who is earning.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarningCustomer {
    /// Current loyalty tier.
    pub tier: Option<TierId>,
    /// Segments the customer belongs to.
    pub segments: BTreeSet<SegmentId>,
}

/// A kind of multiplier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MultiplierKind {
    /// Loyalty tier.
    Tier,
    /// Customer segment.
    Segment,
    /// Promotional time window.
    TimeWindow,
    /// Product category.
    Category,
}

/// One step of the explanation of an earning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EarningStep {
    /// The order total is below the minimum; nothing earned.
    BelowMinimumOrder {
        /// Minimum in minor units.
        minimum_minor: i64,
        /// Order total.
        order_amount: Money,
    },
    /// The base rate used.
    BaseRate {
        /// Points per `per_minor`.
        points: i64,
        /// Minor units.
        per_minor: i64,
        /// Currency.
        currency: CurrencyCode,
    },
    /// An order-level multiplier that applied.
    Multiplier {
        /// Kind.
        kind: MultiplierKind,
        /// Which tier / segment / window.
        source: String,
        /// Value in basis points.
        multiplier_bp: u32,
    },
    /// Points earned by one line (or by the order total when there are no lines).
    Line {
        /// SKU (empty for the order-total pseudo line).
        sku: String,
        /// Category (empty for the order-total pseudo line).
        category: String,
        /// Amount earned on.
        amount_minor: i64,
        /// Combined multiplier applied, after the cap.
        multiplier_bp: u32,
        /// Whether the combined multiplier was capped.
        capped: bool,
        /// Points, rounded down.
        points: Points,
    },
    /// A flat event bonus.
    EventBonus {
        /// The event.
        event: BonusEvent,
        /// Points.
        points: Points,
    },
    /// A period cap reduced the points.
    Capped {
        /// The period.
        period: CapPeriod,
        /// Cap value.
        max_points: Points,
        /// Already earned in the period.
        earned_to_date: Points,
        /// Points before this cap.
        before: Points,
        /// Points after it.
        after: Points,
    },
}

/// Points earned, with the steps that produced them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarnedPoints {
    /// Points to credit, `>= 0`.
    pub points: Points,
    /// Explanation, in computation order.
    pub breakdown: Vec<EarningStep>,
}

/// Why points could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EarningError {
    /// No base rate for the currency.
    #[error("no earning rate for currency {0}")]
    NoRateForCurrency(CurrencyCode),
    /// A line is in a different currency from the order.
    #[error("line {sku:?} is in {actual}, the order in {expected}")]
    CurrencyMismatch {
        /// The line.
        sku: String,
        /// Order currency.
        expected: CurrencyCode,
        /// Line currency.
        actual: CurrencyCode,
    },
    /// A negative amount.
    #[error("negative amount {amount_minor} on {what}")]
    NegativeAmount {
        /// Where.
        what: String,
        /// The amount.
        amount_minor: i64,
    },
    /// A base rate with `per_minor <= 0` or negative points.
    #[error("invalid base rate for {0}")]
    InvalidRate(CurrencyCode),
}

fn mul_bp(a: u32, b: u32) -> u64 {
    u64::from(a) * u64::from(b) / u64::from(UNIT_MULTIPLIER_BP)
}

impl EarningRules {
    /// Points earned by `order` for `customer`, given what was earned so far in
    /// the cap periods. See the [module docs](self) for the exact arithmetic.
    pub fn earn_for_order(
        &self,
        order: &Order,
        customer: &EarningCustomer,
        to_date: PeriodToDate,
    ) -> Result<EarnedPoints, EarningError> {
        let currency = order.amount.currency;
        let rate = self
            .base_rates
            .iter()
            .find(|r| r.currency == currency)
            .ok_or(EarningError::NoRateForCurrency(currency))?;
        if rate.per_minor <= 0 || rate.points < 0 {
            return Err(EarningError::InvalidRate(currency));
        }
        if order.amount.amount_minor < 0 {
            return Err(EarningError::NegativeAmount {
                what: format!("order {}", order.id),
                amount_minor: order.amount.amount_minor,
            });
        }
        for line in &order.lines {
            if line.amount.currency != currency {
                return Err(EarningError::CurrencyMismatch {
                    sku: line.sku.clone(),
                    expected: currency,
                    actual: line.amount.currency,
                });
            }
            if line.amount.amount_minor < 0 {
                return Err(EarningError::NegativeAmount {
                    what: format!("line {}", line.sku),
                    amount_minor: line.amount.amount_minor,
                });
            }
        }

        let mut breakdown = Vec::new();
        if order.amount.amount_minor < rate.min_order_minor {
            breakdown.push(EarningStep::BelowMinimumOrder {
                minimum_minor: rate.min_order_minor,
                order_amount: order.amount,
            });
            return Ok(EarnedPoints {
                points: 0,
                breakdown,
            });
        }
        breakdown.push(EarningStep::BaseRate {
            points: rate.points,
            per_minor: rate.per_minor,
            currency,
        });

        let mut order_bp = u64::from(UNIT_MULTIPLIER_BP);
        let mut apply = |kind, source: String, bp: u32, breakdown: &mut Vec<EarningStep>| {
            order_bp = order_bp * u64::from(bp) / u64::from(UNIT_MULTIPLIER_BP);
            breakdown.push(EarningStep::Multiplier {
                kind,
                source,
                multiplier_bp: bp,
            });
        };
        if let Some(tier) = &customer.tier
            && let Some(bp) = self.tier_multipliers.get(tier)
        {
            apply(MultiplierKind::Tier, tier.0.clone(), *bp, &mut breakdown);
        }
        if let Some((segment, bp)) = customer
            .segments
            .iter()
            .filter_map(|s| self.segment_multipliers.get(s).map(|bp| (s, *bp)))
            .max_by_key(|(_, bp)| *bp)
        {
            apply(
                MultiplierKind::Segment,
                segment.0.clone(),
                bp,
                &mut breakdown,
            );
        }
        if let Some(window) = self
            .time_windows
            .iter()
            .filter(|w| w.starts_at <= order.placed_at && order.placed_at < w.ends_at)
            .max_by_key(|w| w.multiplier_bp)
        {
            apply(
                MultiplierKind::TimeWindow,
                window.name.clone(),
                window.multiplier_bp,
                &mut breakdown,
            );
        }
        let order_bp = u32::try_from(order_bp).unwrap_or(u32::MAX);

        let line_points = |amount_minor: i64, multiplier_bp: u32| -> Points {
            let numerator =
                i128::from(amount_minor) * i128::from(rate.points) * i128::from(multiplier_bp);
            let denominator = i128::from(rate.per_minor) * i128::from(UNIT_MULTIPLIER_BP);
            Points::try_from(numerator / denominator).unwrap_or(Points::MAX)
        };
        let cap = u64::from(self.max_combined_multiplier_bp);
        let mut total: Points = 0;
        let mut push_line = |sku: &str, category: &str, amount_minor: i64, uncapped: u64| {
            let capped = uncapped > cap;
            let bp = u32::try_from(uncapped.min(cap)).unwrap_or(u32::MAX);
            let points = line_points(amount_minor, bp);
            total = total.saturating_add(points);
            breakdown.push(EarningStep::Line {
                sku: sku.to_owned(),
                category: category.to_owned(),
                amount_minor,
                multiplier_bp: bp,
                capped,
                points,
            });
        };
        if order.lines.is_empty() {
            push_line("", "", order.amount.amount_minor, u64::from(order_bp));
        } else {
            for line in &order.lines {
                let category_bp = self
                    .category_multipliers
                    .get(&line.category)
                    .copied()
                    .unwrap_or(UNIT_MULTIPLIER_BP);
                push_line(
                    &line.sku,
                    &line.category,
                    line.amount.amount_minor,
                    mul_bp(order_bp, category_bp),
                );
            }
        }
        Ok(self.apply_caps(total, to_date, breakdown))
    }

    /// Flat bonus for `event` (0 if the programme has none), after period caps.
    pub fn earn_for_event(&self, event: &BonusEvent, to_date: PeriodToDate) -> EarnedPoints {
        let points = self.event_bonuses.get(event).copied().unwrap_or(0).max(0);
        let breakdown = vec![EarningStep::EventBonus {
            event: event.clone(),
            points,
        }];
        self.apply_caps(points, to_date, breakdown)
    }

    fn apply_caps(
        &self,
        mut points: Points,
        to_date: PeriodToDate,
        mut breakdown: Vec<EarningStep>,
    ) -> EarnedPoints {
        for cap in &self.caps {
            let earned = to_date.get(cap.period);
            let room = cap.max_points.saturating_sub(earned).max(0);
            if points > room {
                breakdown.push(EarningStep::Capped {
                    period: cap.period,
                    max_points: cap.max_points,
                    earned_to_date: earned,
                    before: points,
                    after: room,
                });
                points = room;
            }
        }
        EarnedPoints { points, breakdown }
    }

    /// The ledger command crediting `earned` for `order`, with the programme's
    /// expiry; `None` when nothing was earned. The order amount is recorded so
    /// refunds can be reversed in proportion.
    pub fn accrual_for_order(&self, order: &Order, earned: &EarnedPoints) -> Option<LedgerCommand> {
        (earned.points > 0 && order.amount.amount_minor > 0).then(|| LedgerCommand::Accrue {
            points: earned.points,
            expires_at: self
                .points_valid_days
                .map(|days| order.placed_at + Duration::days(i64::from(days))),
            order: Some(OrderRef {
                order_id: order.id.clone(),
                amount: order.amount,
            }),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn eur() -> CurrencyCode {
        CurrencyCode::new("EUR").unwrap()
    }

    fn rules() -> EarningRules {
        EarningRules {
            base_rates: vec![BaseRate {
                currency: eur(),
                points: 1,
                per_minor: 100,
                min_order_minor: 1_000,
            }],
            tier_multipliers: BTreeMap::from([(TierId::new("gold"), 15_000)]),
            segment_multipliers: BTreeMap::from([
                (SegmentId::new("champions"), 12_000),
                (SegmentId::new("new"), 11_000),
            ]),
            category_multipliers: BTreeMap::from([
                ("shoes".to_owned(), 20_000),
                ("gift-cards".to_owned(), 0),
            ]),
            time_windows: vec![TimeWindowMultiplier {
                name: "double weekend".into(),
                starts_at: Utc.with_ymd_and_hms(2025, 3, 1, 0, 0, 0).unwrap(),
                ends_at: Utc.with_ymd_and_hms(2025, 3, 3, 0, 0, 0).unwrap(),
                multiplier_bp: 20_000,
            }],
            max_combined_multiplier_bp: 40_000,
            event_bonuses: BTreeMap::from([
                (BonusEvent::ReviewSubmitted, 50),
                (BonusEvent::ReferralCompleted, 500),
            ]),
            caps: vec![
                PeriodCap {
                    period: CapPeriod::Day,
                    max_points: 1_000,
                },
                PeriodCap {
                    period: CapPeriod::Month,
                    max_points: 5_000,
                },
            ],
            points_valid_days: Some(365),
        }
    }

    fn order(day: u32, lines: &[(&str, i64)]) -> Order {
        let lines: Vec<OrderLine> = lines
            .iter()
            .enumerate()
            .map(|(i, (category, amount))| OrderLine {
                sku: format!("sku{i}"),
                category: (*category).to_owned(),
                amount: Money::new(*amount, eur()),
            })
            .collect();
        Order {
            id: "o1".into(),
            placed_at: Utc.with_ymd_and_hms(2025, 2, day, 12, 0, 0).unwrap(),
            amount: Money::new(lines.iter().map(|l| l.amount.amount_minor).sum(), eur()),
            lines,
        }
    }

    #[test]
    fn base_rate_earns_points_per_currency_unit_rounding_down() {
        let earned = rules()
            .earn_for_order(
                &order(3, &[("books", 2_599)]),
                &EarningCustomer::default(),
                PeriodToDate::default(),
            )
            .unwrap();
        assert_eq!(earned.points, 25);
    }

    #[test]
    fn multipliers_take_the_highest_of_a_kind_and_multiply_across_kinds() {
        let customer = EarningCustomer {
            tier: Some(TierId::new("gold")),
            segments: BTreeSet::from([SegmentId::new("champions"), SegmentId::new("new")]),
        };
        let earned = rules()
            .earn_for_order(
                &order(3, &[("books", 10_000)]),
                &customer,
                PeriodToDate::default(),
            )
            .unwrap();
        // 100 × 1.5 (gold) × 1.2 (champions beats new) = 180
        assert_eq!(earned.points, 180);
        assert!(earned.breakdown.iter().any(|s| matches!(
            s,
            EarningStep::Multiplier {
                kind: MultiplierKind::Segment,
                multiplier_bp: 12_000,
                ..
            }
        )));
    }

    #[test]
    fn combined_multiplier_is_capped() {
        let customer = EarningCustomer {
            tier: Some(TierId::new("gold")),
            segments: BTreeSet::new(),
        };
        // gold 1.5 × shoes 2.0 × window 2.0 = 6.0, capped at 4.0
        let mut o = order(3, &[("shoes", 10_000)]);
        o.placed_at = Utc.with_ymd_and_hms(2025, 3, 1, 10, 0, 0).unwrap();
        let earned = rules()
            .earn_for_order(&o, &customer, PeriodToDate::default())
            .unwrap();
        assert_eq!(earned.points, 400);
        assert!(earned.breakdown.iter().any(|s| matches!(
            s,
            EarningStep::Line {
                capped: true,
                multiplier_bp: 40_000,
                ..
            }
        )));
    }

    #[test]
    fn category_multiplier_applies_per_line_and_zero_excludes() {
        let earned = rules()
            .earn_for_order(
                &order(
                    3,
                    &[("shoes", 5_000), ("gift-cards", 5_000), ("books", 1_000)],
                ),
                &EarningCustomer::default(),
                PeriodToDate::default(),
            )
            .unwrap();
        assert_eq!(earned.points, 100 + 10);
    }

    #[test]
    fn order_below_minimum_earns_nothing() {
        let earned = rules()
            .earn_for_order(
                &order(3, &[("books", 999)]),
                &EarningCustomer::default(),
                PeriodToDate::default(),
            )
            .unwrap();
        assert_eq!(earned.points, 0);
        assert!(matches!(
            earned.breakdown[0],
            EarningStep::BelowMinimumOrder { .. }
        ));
    }

    #[test]
    fn period_caps_clip_points_to_what_is_left() {
        let to_date = PeriodToDate {
            day: 950,
            month: 1_000,
        };
        let earned = rules()
            .earn_for_order(
                &order(3, &[("books", 10_000)]),
                &EarningCustomer::default(),
                to_date,
            )
            .unwrap();
        assert_eq!(earned.points, 50);
        let month_full = PeriodToDate {
            day: 0,
            month: 5_000,
        };
        assert_eq!(
            rules()
                .earn_for_event(&BonusEvent::ReferralCompleted, month_full)
                .points,
            0
        );
    }

    #[test]
    fn event_bonuses_are_flat() {
        let earned = rules().earn_for_event(&BonusEvent::ReviewSubmitted, PeriodToDate::default());
        assert_eq!(earned.points, 50);
        assert_eq!(
            rules()
                .earn_for_event(&BonusEvent::Birthday, PeriodToDate::default())
                .points,
            0
        );
    }

    #[test]
    fn unknown_currency_and_mixed_currencies_are_refused() {
        let mut o = order(3, &[("books", 1_000)]);
        o.amount.currency = CurrencyCode::new("USD").unwrap();
        assert_eq!(
            rules().earn_for_order(&o, &EarningCustomer::default(), PeriodToDate::default()),
            Err(EarningError::NoRateForCurrency(
                CurrencyCode::new("USD").unwrap()
            ))
        );
    }

    #[test]
    fn accrual_records_order_amount_and_expiry() {
        let r = rules();
        let o = order(3, &[("books", 10_000)]);
        let earned = r
            .earn_for_order(&o, &EarningCustomer::default(), PeriodToDate::default())
            .unwrap();
        let Some(LedgerCommand::Accrue {
            points,
            expires_at,
            order,
        }) = r.accrual_for_order(&o, &earned)
        else {
            panic!("expected an accrual");
        };
        assert_eq!(points, 100);
        assert_eq!(expires_at, Some(o.placed_at + Duration::days(365)));
        assert_eq!(order.unwrap().amount, o.amount);
    }
}
