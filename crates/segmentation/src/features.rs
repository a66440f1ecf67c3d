//! Per-profile features computed from a profile's order and engagement history as of a
//! reference time.
//!
//! Conventions used throughout this module (and by [`crate::rfm`] and
//! [`crate::lifecycle`], which consume these features):
//!
//! * **Time** is an `i64` count of seconds since the Unix epoch (UTC). Durations are reported
//!   in fractional days (`seconds / 86_400`), so two orders twelve hours apart are 0.5 days
//!   apart. Fractional days keep RFM ties rare and make boundary rules exact.
//! * **Money** is an `i64` amount in *minor units of a single currency* (cents for EUR/USD,
//!   yen for JPY). A history must be in one currency; converting is the caller's job, because
//!   the exchange rate to use is a business decision, not a domain computation.
//! * **As-of semantics**: orders placed strictly after `as_of` are ignored, so features can be
//!   recomputed for any past reference time from the same history (backtests, training sets).
//!
//! Everything here is pure and deterministic: the same history and reference time always give
//! the same features.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Seconds in one day; durations are reported in days of exactly this length (no DST, UTC).
pub const SECONDS_PER_DAY: f64 = 86_400.0;

/// One line of an order: the spend attributed to one product category.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// Category key as used by the catalogue (free-form, compared exactly).
    pub category: String,
    /// Gross line amount in minor currency units (before refunds); negative values are
    /// treated as zero spend.
    pub amount_minor: i64,
}

/// One order of a profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// When the order was placed, seconds since the Unix epoch (UTC).
    pub placed_at: i64,
    /// Gross order amount in minor currency units (what the customer paid, before refunds).
    pub amount_minor: i64,
    /// Amount refunded for this order so far, in minor currency units (0 when none). Clamped to
    /// `0..=amount_minor` when computing features.
    pub refunded_minor: i64,
    /// Category breakdown of the order; may be empty when the catalogue data is unknown.
    /// Lines need not sum to `amount_minor` (shipping, discounts): category shares are shares
    /// of line spend only.
    pub lines: Vec<OrderLine>,
}

/// Engagement counters of a profile over the observation window chosen by the caller
/// (typically the last 90 days up to `as_of`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngagementCounters {
    /// Product page views (web and app).
    pub product_views: u64,
    /// Marketing e-mail opens.
    pub email_opens: u64,
    /// Marketing e-mail link clicks.
    pub email_clicks: u64,
    /// Mobile app sessions started.
    pub app_opens: u64,
    /// Carts with at least one item that were created.
    pub carts_created: u64,
    /// Carts created that were abandoned (not converted into an order).
    pub carts_abandoned: u64,
}

/// The raw history of one profile from which features are computed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileHistory {
    /// When the profile was created (sign-up), seconds since the Unix epoch, if known. Used for
    /// tenure when it predates the first order.
    pub created_at: Option<i64>,
    /// Orders in any order; they are sorted internally by `placed_at`.
    pub orders: Vec<Order>,
    /// Engagement counters over the caller's observation window.
    pub engagement: EngagementCounters,
}

/// Weights of the engagement score: `score = Σ weight × count`.
///
/// Defaults reflect increasing purchase intent per event: a product view is weak (0.5), an
/// e-mail open is a deliberate action (1.0), an app open is a visit to the shop (2.0), an
/// e-mail click lands on a product or offer (3.0). Weights must be finite and non-negative.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EngagementWeights {
    /// Weight of one product view.
    pub product_view: f64,
    /// Weight of one e-mail open.
    pub email_open: f64,
    /// Weight of one e-mail click.
    pub email_click: f64,
    /// Weight of one app open.
    pub app_open: f64,
}

impl Default for EngagementWeights {
    fn default() -> Self {
        Self {
            product_view: 0.5,
            email_open: 1.0,
            email_click: 3.0,
            app_open: 2.0,
        }
    }
}

impl EngagementWeights {
    /// Weighted engagement score of the counters; `0.0` for no engagement. Unbounded above:
    /// it grows linearly with activity, so compare it within one observation window length.
    #[must_use]
    pub fn score(&self, counters: &EngagementCounters) -> f64 {
        // u64 → f64 is exact up to 2^53 events, far beyond any real counter.
        #[allow(clippy::cast_precision_loss)]
        let weighted = self.product_view * counters.product_views as f64
            + self.email_open * counters.email_opens as f64
            + self.email_click * counters.email_clicks as f64
            + self.app_open * counters.app_opens as f64;
        weighted
    }
}

/// Features of one profile as of a reference time.
///
/// Optional fields are `None` when the quantity is undefined for the history (for example
/// recency without any order), never a sentinel number, so that downstream code must decide
/// explicitly how to treat the "no data" case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileFeatures {
    /// Days from the last order to `as_of` (≥ 0); `None` without orders.
    pub recency_days: Option<f64>,
    /// Days from the first order to `as_of` (≥ 0); `None` without orders.
    pub days_since_first_order: Option<f64>,
    /// Number of orders placed up to `as_of`.
    pub frequency: u32,
    /// Total net spend (gross minus refunds) in minor units; 0 without orders.
    pub monetary_total_minor: i64,
    /// Average net order value in minor units (`monetary_total_minor / frequency`); `None`
    /// without orders.
    pub average_order_value_minor: Option<f64>,
    /// Days from the earlier of profile creation and first order to `as_of`; `None` when
    /// neither is known (or both lie after `as_of`).
    pub tenure_days: Option<f64>,
    /// Mean number of days between consecutive orders (`(last - first) / (frequency - 1)`);
    /// `None` with fewer than two orders.
    pub mean_interpurchase_days: Option<f64>,
    /// Refunded share of gross spend, in `[0, 1]`; `None` when gross spend is zero.
    pub refund_rate: Option<f64>,
    /// Share of gross line spend per category, each in `[0, 1]`, summing to 1 (up to
    /// rounding) when any line spend exists; empty otherwise.
    pub category_shares: BTreeMap<String, f64>,
    /// Weighted engagement score, see [`EngagementWeights`].
    pub engagement_score: f64,
    /// Abandoned carts over created carts, in `[0, 1]`; `None` when no cart was created.
    pub cart_abandonment_rate: Option<f64>,
}

/// Configuration of [`compute_features`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct FeatureConfig {
    /// Weights of the engagement score.
    pub engagement_weights: EngagementWeights,
}

fn days_between(from: i64, to: i64) -> f64 {
    // i64 seconds → f64 is exact for any realistic timestamp difference (< 2^53 s).
    #[allow(clippy::cast_precision_loss)]
    let seconds = (to - from) as f64;
    seconds / SECONDS_PER_DAY
}

/// Computes the features of `history` as of `as_of` (seconds since the Unix epoch, UTC).
///
/// Orders placed after `as_of` are ignored; an order placed exactly at `as_of` counts and has
/// recency 0. Refunds are clamped to the order's gross amount, negative amounts count as zero.
/// Monetary values are net of refunds; the refund rate is by value over gross spend. Category
/// shares are shares of gross line spend (refunds are not attributed to categories because
/// refund events do not carry a line breakdown).
#[must_use]
pub fn compute_features(
    history: &ProfileHistory,
    as_of: i64,
    config: &FeatureConfig,
) -> ProfileFeatures {
    let mut placed: Vec<&Order> = history
        .orders
        .iter()
        .filter(|o| o.placed_at <= as_of)
        .collect();
    placed.sort_by_key(|o| o.placed_at);

    let frequency = u32::try_from(placed.len()).unwrap_or(u32::MAX);
    let mut gross: i64 = 0;
    let mut refunded: i64 = 0;
    let mut line_spend: BTreeMap<String, i64> = BTreeMap::new();
    for order in &placed {
        let amount = order.amount_minor.max(0);
        gross = gross.saturating_add(amount);
        refunded = refunded.saturating_add(order.refunded_minor.clamp(0, amount));
        for line in &order.lines {
            let spend = line.amount_minor.max(0);
            if spend > 0 {
                let entry = line_spend.entry(line.category.clone()).or_insert(0);
                *entry = entry.saturating_add(spend);
            }
        }
    }
    let net = gross - refunded;

    let first = placed.first().map(|o| o.placed_at);
    let last = placed.last().map(|o| o.placed_at);
    let recency_days = last.map(|t| days_between(t, as_of));
    let days_since_first_order = first.map(|t| days_between(t, as_of));

    #[allow(clippy::cast_precision_loss)]
    let average_order_value_minor = (frequency > 0).then(|| net as f64 / f64::from(frequency));

    let tenure_start = match (history.created_at.filter(|&c| c <= as_of), first) {
        (Some(c), Some(f)) => Some(c.min(f)),
        (Some(c), None) => Some(c),
        (None, f) => f,
    };
    let tenure_days = tenure_start.map(|t| days_between(t, as_of));

    let mean_interpurchase_days = match (first, last) {
        (Some(f), Some(l)) if frequency >= 2 => Some(days_between(f, l) / f64::from(frequency - 1)),
        _ => None,
    };

    #[allow(clippy::cast_precision_loss)]
    let refund_rate = (gross > 0).then(|| refunded as f64 / gross as f64);

    let total_line_spend: i64 = line_spend
        .values()
        .fold(0_i64, |acc, v| acc.saturating_add(*v));
    #[allow(clippy::cast_precision_loss)]
    let category_shares = if total_line_spend > 0 {
        line_spend
            .into_iter()
            .map(|(category, spend)| (category, spend as f64 / total_line_spend as f64))
            .collect()
    } else {
        BTreeMap::new()
    };

    let engagement = &history.engagement;
    #[allow(clippy::cast_precision_loss)]
    let cart_abandonment_rate = (engagement.carts_created > 0).then(|| {
        engagement.carts_abandoned.min(engagement.carts_created) as f64
            / engagement.carts_created as f64
    });

    ProfileFeatures {
        recency_days,
        days_since_first_order,
        frequency,
        monetary_total_minor: net,
        average_order_value_minor,
        tenure_days,
        mean_interpurchase_days,
        refund_rate,
        category_shares,
        engagement_score: config.engagement_weights.score(engagement),
        cart_abandonment_rate,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;
    const AS_OF: i64 = 1_700_000_000;

    fn order(days_ago: i64, amount: i64, refunded: i64, lines: &[(&str, i64)]) -> Order {
        Order {
            placed_at: AS_OF - days_ago * DAY,
            amount_minor: amount,
            refunded_minor: refunded,
            lines: lines
                .iter()
                .map(|(c, a)| OrderLine {
                    category: (*c).to_owned(),
                    amount_minor: *a,
                })
                .collect(),
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn empty_history_has_no_order_features() {
        let f = compute_features(&ProfileHistory::default(), AS_OF, &FeatureConfig::default());
        assert_eq!(f.frequency, 0);
        assert_eq!(f.monetary_total_minor, 0);
        assert_eq!(f.recency_days, None);
        assert_eq!(f.days_since_first_order, None);
        assert_eq!(f.average_order_value_minor, None);
        assert_eq!(f.tenure_days, None);
        assert_eq!(f.mean_interpurchase_days, None);
        assert_eq!(f.refund_rate, None);
        assert!(f.category_shares.is_empty());
        assert_eq!(f.cart_abandonment_rate, None);
        assert!(close(f.engagement_score, 0.0));
    }

    #[test]
    fn three_orders_give_expected_rfm_inputs_and_intervals() {
        let history = ProfileHistory {
            created_at: Some(AS_OF - 100 * DAY),
            // deliberately unsorted
            orders: vec![
                order(10, 3_000, 0, &[("shoes", 3_000)]),
                order(70, 1_000, 0, &[("socks", 1_000)]),
                order(40, 2_000, 500, &[("shoes", 1_500), ("socks", 500)]),
            ],
            engagement: EngagementCounters::default(),
        };
        let f = compute_features(&history, AS_OF, &FeatureConfig::default());
        assert_eq!(f.frequency, 3);
        assert!(close(f.recency_days.unwrap(), 10.0));
        assert!(close(f.days_since_first_order.unwrap(), 70.0));
        assert_eq!(f.monetary_total_minor, 5_500);
        assert!(close(f.average_order_value_minor.unwrap(), 5_500.0 / 3.0));
        assert!(close(f.tenure_days.unwrap(), 100.0));
        assert!(close(f.mean_interpurchase_days.unwrap(), 30.0));
        assert!(close(f.refund_rate.unwrap(), 500.0 / 6_000.0));
        assert!(close(f.category_shares["shoes"], 4_500.0 / 6_000.0));
        assert!(close(f.category_shares["socks"], 1_500.0 / 6_000.0));
    }

    #[test]
    fn orders_after_reference_time_are_ignored() {
        let history = ProfileHistory {
            orders: vec![order(5, 1_000, 0, &[]), order(-3, 9_999, 0, &[])],
            ..ProfileHistory::default()
        };
        let f = compute_features(&history, AS_OF, &FeatureConfig::default());
        assert_eq!(f.frequency, 1);
        assert_eq!(f.monetary_total_minor, 1_000);
        assert!(close(f.recency_days.unwrap(), 5.0));
    }

    #[test]
    fn order_placed_at_reference_time_has_zero_recency() {
        let history = ProfileHistory {
            orders: vec![order(0, 1_000, 0, &[])],
            ..ProfileHistory::default()
        };
        let f = compute_features(&history, AS_OF, &FeatureConfig::default());
        assert!(close(f.recency_days.unwrap(), 0.0));
        assert_eq!(f.mean_interpurchase_days, None);
    }

    #[test]
    fn recency_is_fractional_days() {
        let history = ProfileHistory {
            orders: vec![Order {
                placed_at: AS_OF - DAY / 2,
                amount_minor: 100,
                refunded_minor: 0,
                lines: vec![],
            }],
            ..ProfileHistory::default()
        };
        let f = compute_features(&history, AS_OF, &FeatureConfig::default());
        assert!(close(f.recency_days.unwrap(), 0.5));
    }

    #[test]
    fn refunds_are_clamped_to_gross_amount() {
        let history = ProfileHistory {
            orders: vec![order(1, 1_000, 5_000, &[]), order(2, 1_000, -10, &[])],
            ..ProfileHistory::default()
        };
        let f = compute_features(&history, AS_OF, &FeatureConfig::default());
        assert_eq!(f.monetary_total_minor, 1_000);
        assert!(close(f.refund_rate.unwrap(), 0.5));
    }

    #[test]
    fn tenure_uses_first_order_when_it_predates_signup() {
        let history = ProfileHistory {
            created_at: Some(AS_OF - 10 * DAY),
            orders: vec![order(20, 1_000, 0, &[])],
            ..ProfileHistory::default()
        };
        let f = compute_features(&history, AS_OF, &FeatureConfig::default());
        assert!(close(f.tenure_days.unwrap(), 20.0));
    }

    #[test]
    fn tenure_without_orders_counts_from_signup() {
        let history = ProfileHistory {
            created_at: Some(AS_OF - 7 * DAY),
            ..ProfileHistory::default()
        };
        let f = compute_features(&history, AS_OF, &FeatureConfig::default());
        assert!(close(f.tenure_days.unwrap(), 7.0));
    }

    #[test]
    fn engagement_score_uses_configured_weights() {
        let counters = EngagementCounters {
            product_views: 10,
            email_opens: 4,
            email_clicks: 2,
            app_opens: 3,
            carts_created: 4,
            carts_abandoned: 3,
        };
        let history = ProfileHistory {
            engagement: counters,
            ..ProfileHistory::default()
        };
        let default = compute_features(&history, AS_OF, &FeatureConfig::default());
        assert!(close(
            default.engagement_score,
            10.0 * 0.5 + 4.0 + 2.0 * 3.0 + 3.0 * 2.0
        ));
        assert!(close(default.cart_abandonment_rate.unwrap(), 0.75));

        let clicks_only = FeatureConfig {
            engagement_weights: EngagementWeights {
                product_view: 0.0,
                email_open: 0.0,
                email_click: 1.0,
                app_open: 0.0,
            },
        };
        let f = compute_features(&history, AS_OF, &clicks_only);
        assert!(close(f.engagement_score, 2.0));
    }

    #[test]
    fn abandoned_carts_are_capped_at_created_carts() {
        let history = ProfileHistory {
            engagement: EngagementCounters {
                carts_created: 2,
                carts_abandoned: 5,
                ..EngagementCounters::default()
            },
            ..ProfileHistory::default()
        };
        let f = compute_features(&history, AS_OF, &FeatureConfig::default());
        assert!(close(f.cart_abandonment_rate.unwrap(), 1.0));
    }

    #[test]
    fn orders_without_lines_leave_category_shares_empty() {
        let history = ProfileHistory {
            orders: vec![order(3, 1_000, 0, &[])],
            ..ProfileHistory::default()
        };
        let f = compute_features(&history, AS_OF, &FeatureConfig::default());
        assert!(f.category_shares.is_empty());
    }
}
