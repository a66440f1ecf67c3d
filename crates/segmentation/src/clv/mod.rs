//! Predicted customer value: how many purchases a customer will make and what they will be
//! worth.
//!
//! Two classic probability models, fitted by maximum likelihood on per-customer summaries:
//!
//! * [`BgNbd`] — the BG/NBD model of Fader, Hardie & Lee (2005), "Counting Your Customers the
//!   Easy Way". From a customer's repeat-purchase count, the time of their last purchase and
//!   their age it gives the probability they are still active and their expected number of
//!   purchases over a future window.
//! * [`GammaGamma`] — the Gamma-Gamma spend model of Fader, Hardie & Lee (2005), "RFM and
//!   CLV: Using Iso-Value Curves for Customer Base Analysis". From a customer's repeat-purchase
//!   count and average order value it gives the expected value of their future orders.
//!
//! [`customer_lifetime_value`] combines them into a discounted value over a horizon in months,
//! the way the Python `lifetimes` library's `customer_lifetime_value` does.
//!
//! ## Units
//!
//! * **Time**: every time in a [`PurchaseHistory`] (recency, age) and every prediction window
//!   is in one *time unit of the fit* — whatever unit the histories were measured in (days or
//!   weeks typically). [`BgNbd::alpha`] carries that unit; predictions from a model must use
//!   the same unit it was fitted with. [`TimeUnit`] tells [`customer_lifetime_value`] how many
//!   of those units make a month.
//! * **Money**: order values are plain `f64` amounts in one currency unit. The platform
//!   stores money in minor units (cents), and so the `v` parameter of a fitted
//!   [`GammaGamma`] and every value predicted from it are in minor units too. The model is
//!   scale-equivariant: fitting in cents gives `v` 100× the fit in dollars and the same `p`, `q`.
//!
//! Everything here is pure computation: fitting a few thousand customers takes milliseconds
//! to a second and is meant to run in a batch job, while predictions are cheap closed forms.

mod bgnbd;
mod gamma_gamma;
mod nelder_mead;
mod special;

pub use bgnbd::BgNbd;
pub use gamma_gamma::GammaGamma;

use thiserror::Error;

/// Why fitting a model or computing a prediction failed.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ClvError {
    /// A fit was asked for with no usable customers.
    #[error("no customers to fit the model to")]
    NoCustomers,
    /// One input row is invalid; `index` is its position in the input slice.
    #[error("customer at index {index}: {reason}")]
    InvalidCustomer {
        /// Position of the offending customer in the input.
        index: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A model parameter or argument is outside the model's domain.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// The optimiser used its evaluation budget without converging.
    #[error("maximum-likelihood fit did not converge within {evaluations} evaluations")]
    DidNotConverge {
        /// Objective evaluations spent.
        evaluations: usize,
    },
    /// The hypergeometric series behind conditional expectations did not converge; happens
    /// only for prediction windows enormously longer than the customer's age plus `alpha`.
    #[error("hypergeometric series did not converge (z = {z})")]
    SeriesDidNotConverge {
        /// The series argument, in `[0, 1)`.
        z: f64,
    },
    /// A computation produced NaN or an infinity (e.g. `a` exactly 1 in the BG/NBD).
    #[error("computation produced a non-finite value: {0}")]
    NonFinite(&'static str),
}

/// Repeat counts above this get no table entry in [`count_table`] (computed per customer).
const COUNT_TABLE_MAX: u32 = 4_096;

/// `f(x)` for every repeat count `x` in `0..=max(counts)` (empty when the largest count is
/// above [`COUNT_TABLE_MAX`]), indexed by count: the count-only terms of a likelihood, computed
/// once per evaluation instead of once per customer.
fn count_table<T>(counts: impl Iterator<Item = u32>, f: impl Fn(f64) -> T) -> Vec<T> {
    let max = counts.max().unwrap_or(0);
    if max > COUNT_TABLE_MAX {
        return Vec::new();
    }
    (0..=max).map(|x| f(f64::from(x))).collect()
}

/// A customer's purchase history summarised the way the BG/NBD model needs it.
///
/// Times are in the time unit of the fit (see the module docs) and measured from the
/// customer's first purchase, which itself is not counted.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PurchaseHistory {
    /// Number of repeat purchases (`x`): purchases after the first one, in distinct periods.
    pub frequency: u32,
    /// Time of the last repeat purchase (`tₓ`), `0 ≤ recency ≤ age`; `0` when `frequency = 0`.
    pub recency: f64,
    /// Time from the first purchase to the end of observation (`T`), `age ≥ recency`.
    pub age: f64,
}

impl PurchaseHistory {
    fn validate(&self, index: usize) -> Result<(), ClvError> {
        let reason = if !self.recency.is_finite() || !self.age.is_finite() {
            Some("recency and age must be finite")
        } else if self.recency < 0.0 {
            Some("recency must be non-negative")
        } else if self.age < self.recency {
            Some("age must be at least the recency")
        } else {
            None
        };
        reason.map_or(Ok(()), |reason| {
            Err(ClvError::InvalidCustomer { index, reason })
        })
    }
}

/// A repeat customer's spend summarised the way the Gamma-Gamma model needs it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SpendHistory {
    /// Number of repeat purchases the average is over (`x`), at least 1 for fitting.
    pub frequency: u32,
    /// Mean value of those repeat purchases (`mₓ`), `> 0`, in the money unit of the fit.
    pub average_order_value: f64,
}

/// Settings for a maximum-likelihood fit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitOptions {
    /// Coefficient of an L2 penalty `penalizer · Σ θ²` on the parameters, added to the mean
    /// negative log-likelihood exactly as `lifetimes` does (for the BG/NBD `alpha` is taken in
    /// time rescaled so the oldest customer has age 1, also as `lifetimes` does). `0` gives the
    /// plain maximum-likelihood estimate; small values (0.001–0.1) stabilise fits on small or
    /// degenerate data.
    pub penalizer: f64,
    /// Upper bound on likelihood evaluations before giving up with
    /// [`ClvError::DidNotConverge`].
    pub max_evaluations: usize,
    /// Convergence tolerance on the mean negative log-likelihood (relative to
    /// `1 + |value|`); log-parameters are also required to settle to `tolerance.sqrt()`.
    pub tolerance: f64,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            penalizer: 0.0,
            max_evaluations: 20_000,
            tolerance: 1e-12,
        }
    }
}

/// A fitted model with diagnostics.
#[derive(Debug, Clone, PartialEq)]
pub struct Fit<M> {
    /// The maximum-likelihood (or penalised) parameters.
    pub model: M,
    /// Mean log-likelihood per customer at `model`, on the input as given (unpenalised);
    /// useful to compare fits on the same data.
    pub mean_log_likelihood: f64,
    /// Likelihood evaluations spent by the optimiser.
    pub evaluations: usize,
}

/// The time unit a [`BgNbd`] model was fitted in, so that a horizon in months can be
/// converted. The month lengths are those `lifetimes` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TimeUnit {
    /// 720 hours a month.
    Hour,
    /// 30 days a month.
    Day,
    /// 4.345 weeks a month.
    Week,
    /// The fit is in months.
    Month,
}

impl TimeUnit {
    /// Number of time units in one month.
    pub fn periods_per_month(self) -> f64 {
        match self {
            TimeUnit::Hour => 720.0,
            TimeUnit::Day => 30.0,
            TimeUnit::Week => 4.345,
            TimeUnit::Month => 1.0,
        }
    }
}

/// How far ahead and how steeply to discount in [`customer_lifetime_value`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClvHorizon {
    /// Number of whole months to sum value over.
    pub months: u32,
    /// Discount rate per month (`0.01` = 1 %), `> -1`; month `k`'s value is divided by
    /// `(1 + rate)ᵏ`.
    pub monthly_discount_rate: f64,
    /// Time unit the transaction model was fitted in.
    pub time_unit: TimeUnit,
}

/// Discounted expected value of a customer's purchases over `horizon`, in the money unit of
/// `spend` (minor units on this platform).
///
/// As `lifetimes`' `customer_lifetime_value`: for each month `k = 1..=months` the expected
/// number of purchases falling in that month (from the BG/NBD conditional expectation) times
/// the Gamma-Gamma conditional expected order value, divided by `(1 + rate)ᵏ`, summed.
/// `average_order_value` is the customer's observed mean repeat-order value (ignored when
/// `frequency` is 0, where the population mean is used).
pub fn customer_lifetime_value(
    purchases: &BgNbd,
    spend: &GammaGamma,
    history: &PurchaseHistory,
    average_order_value: f64,
    horizon: &ClvHorizon,
) -> Result<f64, ClvError> {
    if !(horizon.monthly_discount_rate > -1.0 && horizon.monthly_discount_rate.is_finite()) {
        return Err(ClvError::InvalidArgument(
            "monthly discount rate must be finite and greater than -1",
        ));
    }
    let order_value = spend.conditional_expected_average_order_value(&SpendHistory {
        frequency: history.frequency,
        average_order_value,
    })?;
    let periods_per_month = horizon.time_unit.periods_per_month();
    let p_alive = purchases.probability_alive(history);
    let mut value = 0.0;
    let mut purchases_so_far = 0.0;
    for month in 1..=horizon.months {
        let purchases_by_month_end = purchases.conditional_expected_purchases_alive(
            history,
            f64::from(month) * periods_per_month,
            p_alive,
        )?;
        let in_month = purchases_by_month_end - purchases_so_far;
        purchases_so_far = purchases_by_month_end;
        value += order_value * in_month
            / (1.0 + horizon.monthly_discount_rate).powi(month.try_into().unwrap_or(i32::MAX));
    }
    Ok(value)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn purchase_history_validation_names_the_problem() {
        let history = PurchaseHistory {
            frequency: 1,
            recency: 5.0,
            age: 4.0,
        };
        assert_eq!(
            history.validate(3),
            Err(ClvError::InvalidCustomer {
                index: 3,
                reason: "age must be at least the recency"
            })
        );
    }

    #[test]
    fn customer_lifetime_value_is_zero_for_an_empty_horizon() {
        let purchases = BgNbd::new(0.24, 4.4, 0.79, 2.4).unwrap();
        let spend = GammaGamma::new(6.25, 3.74, 15.44).unwrap();
        let history = PurchaseHistory {
            frequency: 2,
            recency: 30.0,
            age: 38.0,
        };
        let horizon = ClvHorizon {
            months: 0,
            monthly_discount_rate: 0.01,
            time_unit: TimeUnit::Week,
        };
        let value = customer_lifetime_value(&purchases, &spend, &history, 20.0, &horizon).unwrap();
        assert_eq!(value, 0.0);
    }

    #[test]
    fn customer_lifetime_value_rejects_a_discount_rate_of_minus_one() {
        let purchases = BgNbd::new(0.24, 4.4, 0.79, 2.4).unwrap();
        let spend = GammaGamma::new(6.25, 3.74, 15.44).unwrap();
        let history = PurchaseHistory {
            frequency: 0,
            recency: 0.0,
            age: 38.0,
        };
        let horizon = ClvHorizon {
            months: 12,
            monthly_discount_rate: -1.0,
            time_unit: TimeUnit::Week,
        };
        assert!(matches!(
            customer_lifetime_value(&purchases, &spend, &history, 0.0, &horizon),
            Err(ClvError::InvalidArgument(_))
        ));
    }

    #[test]
    fn more_discounting_lowers_lifetime_value() {
        let purchases = BgNbd::new(0.24, 4.4, 0.79, 2.4).unwrap();
        let spend = GammaGamma::new(6.25, 3.74, 15.44).unwrap();
        let history = PurchaseHistory {
            frequency: 5,
            recency: 30.0,
            age: 38.0,
        };
        let at = |rate| {
            let horizon = ClvHorizon {
                months: 24,
                monthly_discount_rate: rate,
                time_unit: TimeUnit::Week,
            };
            customer_lifetime_value(&purchases, &spend, &history, 30.0, &horizon).unwrap()
        };
        assert!(at(0.0) > at(0.01));
        assert!(at(0.01) > at(0.05));
        assert!(at(0.05) > 0.0);
    }
}
