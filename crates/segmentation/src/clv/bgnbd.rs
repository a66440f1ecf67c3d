//! The BG/NBD purchase-count model (Fader, Hardie & Lee 2005, "Counting Your Customers the
//! Easy Way: An Alternative to the Pareto/NBD Model", Marketing Science 24(2)).
//!
//! While active, a customer buys as a Poisson process with rate `λ ~ Gamma(r, α)`; after
//! each purchase they drop out for good with probability `p ~ Beta(a, b)`. Fitted by maximum
//! likelihood on `(x, tₓ, T)` per customer (paper eq. 6, in the log form of its section 7),
//! optimised over log-parameters so positivity is automatic.

use super::nelder_mead::{self, NelderMeadOptions};
use super::special::{Hyp2f1Error, hyp2f1, ln_gamma, log_sum_exp};
use super::{ClvError, Fit, FitOptions, PurchaseHistory, count_table};

/// Fitted BG/NBD parameters; all strictly positive.
///
/// `alpha` is in the time unit of the fit (see the [module docs](super)); the others are
/// dimensionless. The population's mean purchase rate while active is `r / alpha` per unit
/// time and the mean drop-out probability per purchase is `a / (a + b)`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BgNbd {
    /// Shape of the Gamma distribution of purchase rates.
    pub r: f64,
    /// Scale (in time units) of the Gamma distribution of purchase rates.
    pub alpha: f64,
    /// First shape parameter of the Beta distribution of drop-out probabilities.
    pub a: f64,
    /// Second shape parameter of the Beta distribution of drop-out probabilities.
    pub b: f64,
}

impl BgNbd {
    /// Builds a model from known parameters (e.g. loaded from storage), checking they are
    /// finite and positive.
    pub fn new(r: f64, alpha: f64, a: f64, b: f64) -> Result<Self, ClvError> {
        if [r, alpha, a, b].iter().all(|p| p.is_finite() && *p > 0.0) {
            Ok(Self { r, alpha, a, b })
        } else {
            Err(ClvError::InvalidArgument(
                "BG/NBD parameters must be finite and positive",
            ))
        }
    }

    /// Fits the model by (optionally L2-penalised) maximum likelihood.
    ///
    /// Times are rescaled internally so the oldest customer has age 1 — this conditions the
    /// optimisation independently of the time unit, and is undone in the returned `alpha`.
    /// Errors on an empty input, an invalid history (reported with its index) or when the
    /// optimiser does not converge within `options.max_evaluations`.
    pub fn fit(customers: &[PurchaseHistory], options: &FitOptions) -> Result<Fit<Self>, ClvError> {
        if customers.is_empty() {
            return Err(ClvError::NoCustomers);
        }
        for (index, customer) in customers.iter().enumerate() {
            customer.validate(index)?;
        }
        let oldest = customers.iter().map(|c| c.age).fold(0.0, f64::max);
        let scale = if oldest > 0.0 { 1.0 / oldest } else { 1.0 };
        let scaled: Vec<PurchaseHistory> = customers
            .iter()
            .map(|c| PurchaseHistory {
                frequency: c.frequency,
                recency: c.recency * scale,
                age: c.age * scale,
            })
            .collect();
        let count = scaled.len() as f64;
        let penalizer = options.penalizer;
        let objective = |log_params: &[f64]| {
            let params: Vec<f64> = log_params.iter().map(|p| p.exp()).collect();
            let model = Self {
                r: params[0],
                alpha: params[1],
                a: params[2],
                b: params[3],
            };
            let penalty = penalizer * params.iter().map(|p| p * p).sum::<f64>();
            -model.total_log_likelihood(&scaled) / count + penalty
        };
        let nelder_mead_options = NelderMeadOptions {
            initial_step: 0.5,
            value_tolerance: options.tolerance,
            point_tolerance: options.tolerance.sqrt(),
            max_evaluations: options.max_evaluations,
        };
        let minimum = nelder_mead::minimize(objective, &[0.0; 4], &nelder_mead_options).map_err(
            |not_converged| ClvError::DidNotConverge {
                evaluations: not_converged.best.evaluations,
            },
        )?;
        let p = &minimum.point;
        let model = Self::new(p[0].exp(), p[1].exp() / scale, p[2].exp(), p[3].exp())
            .map_err(|_| ClvError::NonFinite("fitted BG/NBD parameters"))?;
        Ok(Fit {
            model,
            mean_log_likelihood: model.total_log_likelihood(customers) / count,
            evaluations: minimum.evaluations,
        })
    }

    /// Log-likelihood of one customer's history under the model (paper section 7:
    /// `ln L = A₁ + A₂ + ln(e^{A₃} + δ_{x>0} e^{A₄})`, combined with log-sum-exp).
    pub fn log_likelihood(&self, history: &PurchaseHistory) -> f64 {
        let Self { r, alpha, a, b } = *self;
        let x = f64::from(history.frequency);
        let a1 = ln_gamma(r + x) - ln_gamma(r) + r * alpha.ln();
        let a2 = ln_gamma(a + b) + ln_gamma(b + x) - ln_gamma(b) - ln_gamma(a + b + x);
        let a3 = -(r + x) * (alpha + history.age).ln();
        if history.frequency == 0 {
            return a1 + a2 + a3;
        }
        let a4 = a.ln() - (b + x - 1.0).ln() - (r + x) * (alpha + history.recency).ln();
        a1 + a2 + log_sum_exp(a3, a4)
    }

    fn total_log_likelihood(&self, customers: &[PurchaseHistory]) -> f64 {
        // The x-independent ln Γ terms are shared by every customer: hoist them.
        let Self { r, alpha, a, b } = *self;
        let shared = -ln_gamma(r) + r * alpha.ln() + ln_gamma(a + b) - ln_gamma(b);
        // The terms that depend on the repeat count alone are computed once per count (the
        // same values in the same sum: the result is unchanged, bit for bit).
        let per_count = |x: f64| {
            (
                ln_gamma(r + x) + ln_gamma(b + x) - ln_gamma(a + b + x),
                a.ln() - (b + x - 1.0).ln(),
            )
        };
        let table = count_table(customers.iter().map(|h| h.frequency), per_count);
        let per_customer: f64 = customers
            .iter()
            .map(|history| {
                let x = f64::from(history.frequency);
                let (body, a4_head) = table
                    .get(history.frequency as usize)
                    .copied()
                    .unwrap_or_else(|| per_count(x));
                let a3 = -(r + x) * (alpha + history.age).ln();
                if history.frequency == 0 {
                    body + a3
                } else {
                    let a4 = a4_head - (r + x) * (alpha + history.recency).ln();
                    body + log_sum_exp(a3, a4)
                }
            })
            .sum();
        per_customer + shared * customers.len() as f64
    }

    /// Probability that a customer with this history is still active (has not dropped out)
    /// at the end of observation, in `[0, 1]` (Fader, Hardie & Lee, "Computing P(alive)
    /// using the BG/NBD model", eq. 2). Always 1 for customers with no repeat purchase:
    /// in the BG/NBD drop-out can only happen right after a purchase.
    pub fn probability_alive(&self, history: &PurchaseHistory) -> f64 {
        if history.frequency == 0 {
            return 1.0;
        }
        let x = f64::from(history.frequency);
        // P = 1 / (1 + exp(log_odds_dead)), evaluated without overflow.
        let log_odds_dead = (self.r + x)
            * ((self.alpha + history.age) / (self.alpha + history.recency)).ln()
            + (self.a / (self.b + x - 1.0)).ln();
        if log_odds_dead > 0.0 {
            let e = (-log_odds_dead).exp();
            e / (1.0 + e)
        } else {
            1.0 / (1.0 + log_odds_dead.exp())
        }
    }

    /// Expected number of purchases in the next `window` time units (`(T, T + window]`)
    /// for a customer with this history (paper eq. 10). `window ≥ 0`.
    ///
    /// The `₂F₁(r+x, b+x; a+b+x−1; z)` factor is evaluated through Euler's transformation,
    /// `(1−z)^{r+x} ₂F₁(…) = (1−z)^{a−1} ₂F₁(a+b−1−r, a−1; a+b+x−1; z)`, whose series has
    /// small, customer-independent numerator parameters and so converges quickly and
    /// without huge intermediate terms even for heavy buyers.
    pub fn conditional_expected_purchases(
        &self,
        history: &PurchaseHistory,
        window: f64,
    ) -> Result<f64, ClvError> {
        self.conditional_expected_purchases_alive(history, window, self.probability_alive(history))
    }

    /// [`Self::conditional_expected_purchases`] given `p_alive`, the customer's
    /// [`Self::probability_alive`] (computed once for a run of windows).
    pub(crate) fn conditional_expected_purchases_alive(
        &self,
        history: &PurchaseHistory,
        window: f64,
        p_alive: f64,
    ) -> Result<f64, ClvError> {
        history.validate(0).map_err(|_| {
            ClvError::InvalidArgument("history must have 0 <= recency <= age, all finite")
        })?;
        if !(window >= 0.0 && window.is_finite()) {
            return Err(ClvError::InvalidArgument(
                "prediction window must be finite and non-negative",
            ));
        }
        let Self { r, alpha, a, b } = *self;
        let x = f64::from(history.frequency);
        let z = window / (alpha + history.age + window);
        let series =
            hyp2f1(a + b - 1.0 - r, a - 1.0, a + b + x - 1.0, z).map_err(|error| match error {
                Hyp2f1Error::OutsideDomain => {
                    ClvError::InvalidArgument("hypergeometric argument outside the unit disc")
                }
                Hyp2f1Error::DidNotConverge => ClvError::SeriesDidNotConverge { z },
            })?;
        // ln of (1−z)^{r+x} ₂F₁(r+x, b+x; a+b+x−1; z); 1 − e^{…} via expm1 keeps precision
        // for short windows.
        let ln_survival_term = (a - 1.0) * (-z).ln_1p() + series.ln();
        let purchases_if_alive = (a + b + x - 1.0) / (a - 1.0) * -ln_survival_term.exp_m1();
        let expected = purchases_if_alive * p_alive;
        if expected.is_finite() {
            Ok(expected)
        } else {
            Err(ClvError::NonFinite("conditional expected purchases"))
        }
    }

    /// Expected number of repeat purchases in the first `window` time units of a newly
    /// acquired customer's life (paper eq. 9) — the conditional expectation for a customer of
    /// age 0. `window ≥ 0`.
    pub fn expected_purchases_new_customer(&self, window: f64) -> Result<f64, ClvError> {
        self.conditional_expected_purchases(
            &PurchaseHistory {
                frequency: 0,
                recency: 0.0,
                age: 0.0,
            },
            window,
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn model() -> BgNbd {
        BgNbd::new(0.243, 4.414, 0.793, 2.426).unwrap()
    }

    #[test]
    fn new_rejects_non_positive_parameters() {
        assert!(BgNbd::new(0.0, 1.0, 1.0, 1.0).is_err());
        assert!(BgNbd::new(1.0, f64::NAN, 1.0, 1.0).is_err());
        assert!(BgNbd::new(1.0, 1.0, -1.0, 1.0).is_err());
    }

    #[test]
    fn hoisted_total_log_likelihood_equals_the_sum_of_per_customer_terms() {
        let customers = [
            PurchaseHistory {
                frequency: 0,
                recency: 0.0,
                age: 30.0,
            },
            PurchaseHistory {
                frequency: 3,
                recency: 20.0,
                age: 35.0,
            },
            PurchaseHistory {
                frequency: 12,
                recency: 34.5,
                age: 36.0,
            },
        ];
        let model = model();
        let sum: f64 = customers.iter().map(|c| model.log_likelihood(c)).sum();
        assert!((model.total_log_likelihood(&customers) - sum).abs() < 1e-10);
    }

    #[test]
    fn conditional_expected_purchases_are_zero_for_an_empty_window() {
        let history = PurchaseHistory {
            frequency: 4,
            recency: 10.0,
            age: 30.0,
        };
        assert_eq!(
            model()
                .conditional_expected_purchases(&history, 0.0)
                .unwrap(),
            0.0
        );
    }

    #[test]
    fn conditional_expected_purchases_grow_with_the_window() {
        let history = PurchaseHistory {
            frequency: 4,
            recency: 25.0,
            age: 30.0,
        };
        let mut previous = 0.0;
        for window in [1.0, 10.0, 52.0, 520.0, 5_200.0] {
            let expected = model()
                .conditional_expected_purchases(&history, window)
                .unwrap();
            assert!(expected > previous, "{window}: {expected} <= {previous}");
            previous = expected;
        }
    }

    #[test]
    fn heavy_buyers_do_not_overflow_the_hypergeometric_series() {
        let history = PurchaseHistory {
            frequency: 5_000,
            recency: 999.0,
            age: 1_000.0,
        };
        let expected = model()
            .conditional_expected_purchases(&history, 365.0)
            .unwrap();
        // Roughly 5 purchases per unit time, still alive with high probability.
        assert!(expected > 1_000.0 && expected < 2_500.0, "{expected}");
    }

    #[test]
    fn probability_alive_falls_as_the_last_purchase_recedes() {
        let model = model();
        let recent = PurchaseHistory {
            frequency: 5,
            recency: 38.0,
            age: 39.0,
        };
        let lapsed = PurchaseHistory {
            frequency: 5,
            recency: 5.0,
            age: 39.0,
        };
        assert!(model.probability_alive(&recent) > model.probability_alive(&lapsed));
        let extreme = PurchaseHistory {
            frequency: 300,
            recency: 0.001,
            age: 1.0e6,
        };
        assert_eq!(model.probability_alive(&extreme), 0.0);
    }

    #[test]
    fn conditional_expected_purchases_reject_invalid_windows() {
        let history = PurchaseHistory {
            frequency: 1,
            recency: 1.0,
            age: 2.0,
        };
        assert!(
            model()
                .conditional_expected_purchases(&history, -1.0)
                .is_err()
        );
        assert!(
            model()
                .conditional_expected_purchases(&history, f64::INFINITY)
                .is_err()
        );
    }

    #[test]
    fn fit_rejects_empty_input_and_reports_the_bad_row() {
        assert_eq!(
            BgNbd::fit(&[], &FitOptions::default()),
            Err(ClvError::NoCustomers)
        );
        let customers = [
            PurchaseHistory {
                frequency: 1,
                recency: 1.0,
                age: 2.0,
            },
            PurchaseHistory {
                frequency: 1,
                recency: -1.0,
                age: 2.0,
            },
        ];
        assert!(matches!(
            BgNbd::fit(&customers, &FitOptions::default()),
            Err(ClvError::InvalidCustomer { index: 1, .. })
        ));
    }
}
