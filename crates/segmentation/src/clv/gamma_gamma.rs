//! The Gamma-Gamma model of average order value (Fader, Hardie & Lee 2005, "RFM and CLV:
//! Using Iso-Value Curves for Customer Base Analysis", Journal of Marketing Research 42(4);
//! Hardie's note 025 "The Gamma-Gamma Model of Monetary Value").
//!
//! A customer's order values are Gamma(p, ν) with a customer-specific scale
//! `ν ~ Gamma(q, v)`, so their mean order value is `p/ν`. Spend is assumed independent of
//! purchase timing, which is why it is fitted separately from the BG/NBD, on repeat
//! customers only (their observed mean `mₓ` over `x ≥ 1` repeat orders).

use super::nelder_mead::{self, NelderMeadOptions};
use super::special::ln_gamma;
use super::{ClvError, Fit, FitOptions, SpendHistory, count_table};

/// Fitted Gamma-Gamma parameters; all strictly positive.
///
/// `p` and `q` are dimensionless; `v` is in the money unit of the fit (minor units on this
/// platform). The population mean order value is `v·p / (q − 1)`, defined for `q > 1`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GammaGamma {
    /// Shape of each customer's order-value distribution.
    pub p: f64,
    /// Shape of the Gamma distribution of customers' scale parameters `ν`.
    pub q: f64,
    /// Scale (money unit) of the Gamma distribution of customers' scale parameters `ν`.
    pub v: f64,
}

impl GammaGamma {
    /// Builds a model from known parameters, checking they are finite and positive.
    pub fn new(p: f64, q: f64, v: f64) -> Result<Self, ClvError> {
        if [p, q, v].iter().all(|x| x.is_finite() && *x > 0.0) {
            Ok(Self { p, q, v })
        } else {
            Err(ClvError::InvalidArgument(
                "Gamma-Gamma parameters must be finite and positive",
            ))
        }
    }

    /// Fits the model by (optionally L2-penalised) maximum likelihood on repeat customers.
    ///
    /// Every row must have `frequency ≥ 1` and a finite `average_order_value > 0`: filter
    /// one-time buyers out before calling (their spend says nothing about repeat spend).
    /// The optimiser starts from `p = 1`, `q = 2`, `v` = the sample mean order value, so the
    /// fit works in any money unit.
    pub fn fit(customers: &[SpendHistory], options: &FitOptions) -> Result<Fit<Self>, ClvError> {
        if customers.is_empty() {
            return Err(ClvError::NoCustomers);
        }
        for (index, customer) in customers.iter().enumerate() {
            if customer.frequency == 0 {
                return Err(ClvError::InvalidCustomer {
                    index,
                    reason: "Gamma-Gamma is fitted on repeat customers only (frequency >= 1)",
                });
            }
            let value = customer.average_order_value;
            if !(value.is_finite() && value > 0.0) {
                return Err(ClvError::InvalidCustomer {
                    index,
                    reason: "average order value must be finite and positive",
                });
            }
        }
        let count = customers.len() as f64;
        let mean_value = customers.iter().map(|c| c.average_order_value).sum::<f64>() / count;
        let penalizer = options.penalizer;
        let objective = |log_params: &[f64]| {
            let model = Self {
                p: log_params[0].exp(),
                q: log_params[1].exp(),
                v: log_params[2].exp(),
            };
            let penalty = penalizer * (model.p.powi(2) + model.q.powi(2) + model.v.powi(2));
            -model.total_log_likelihood(customers) / count + penalty
        };
        let nelder_mead_options = NelderMeadOptions {
            initial_step: 0.5,
            value_tolerance: options.tolerance,
            point_tolerance: options.tolerance.sqrt(),
            max_evaluations: options.max_evaluations,
        };
        let start = [0.0, 2f64.ln(), mean_value.ln()];
        let minimum = nelder_mead::minimize(objective, &start, &nelder_mead_options).map_err(
            |not_converged| ClvError::DidNotConverge {
                evaluations: not_converged.best.evaluations,
            },
        )?;
        let point = &minimum.point;
        let model = Self::new(point[0].exp(), point[1].exp(), point[2].exp())
            .map_err(|_| ClvError::NonFinite("fitted Gamma-Gamma parameters"))?;
        Ok(Fit {
            model,
            mean_log_likelihood: model.total_log_likelihood(customers) / count,
            evaluations: minimum.evaluations,
        })
    }

    /// Log-likelihood of one repeat customer's mean order value (Hardie note 025, eq. 1a,
    /// the density of `mₓ` — including the `x` Jacobian, as `lifetimes` does).
    pub fn log_likelihood(&self, customer: &SpendHistory) -> f64 {
        let Self { p, q, v } = *self;
        let x = f64::from(customer.frequency);
        let m = customer.average_order_value;
        let px = p * x;
        ln_gamma(px + q) - ln_gamma(px) - ln_gamma(q)
            + q * v.ln()
            + (px - 1.0) * m.ln()
            + px * x.ln()
            - (px + q) * (x * m + v).ln()
    }

    fn total_log_likelihood(&self, customers: &[SpendHistory]) -> f64 {
        // [`Self::log_likelihood`] with the terms that depend on the repeat count alone
        // computed once per count (the same values in the same sums: unchanged, bit for bit).
        let Self { p, q, v } = *self;
        let per_count = |x: f64| {
            let px = p * x;
            (
                ln_gamma(px + q) - ln_gamma(px) - ln_gamma(q) + q * v.ln(),
                px * x.ln(),
            )
        };
        let table = count_table(customers.iter().map(|c| c.frequency), per_count);
        customers
            .iter()
            .map(|c| {
                let x = f64::from(c.frequency);
                let (head, px_ln_x) = table
                    .get(c.frequency as usize)
                    .copied()
                    .unwrap_or_else(|| per_count(x));
                let m = c.average_order_value;
                let px = p * x;
                head + (px - 1.0) * m.ln() + px_ln_x - (px + q) * (x * m + v).ln()
            })
            .sum()
    }

    /// Population mean order value `v·p / (q − 1)`, in the money unit of the fit.
    /// Errors when `q ≤ 1`, where the mean is infinite.
    pub fn population_mean_order_value(&self) -> Result<f64, ClvError> {
        if self.q <= 1.0 {
            return Err(ClvError::InvalidArgument(
                "Gamma-Gamma mean order value is undefined for q <= 1",
            ));
        }
        Ok(self.v * self.p / (self.q - 1.0))
    }

    /// Expected value of this customer's future orders given their history: a weighted
    /// average of the population mean and their own observed mean, with weight
    /// `p·x / (p·x + q − 1)` on the latter (more history, more trust). For `frequency = 0`
    /// this is the population mean and `average_order_value` is ignored. Money unit of the
    /// fit. Errors when `q ≤ 1`.
    pub fn conditional_expected_average_order_value(
        &self,
        customer: &SpendHistory,
    ) -> Result<f64, ClvError> {
        let population_mean = self.population_mean_order_value()?;
        if customer.frequency == 0 {
            return Ok(population_mean);
        }
        if !customer.average_order_value.is_finite() {
            return Err(ClvError::InvalidArgument(
                "average order value must be finite",
            ));
        }
        let px = self.p * f64::from(customer.frequency);
        let own_weight = px / (px + self.q - 1.0);
        Ok((1.0 - own_weight) * population_mean + own_weight * customer.average_order_value)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_tabled_total_log_likelihood_is_the_per_customer_sum_bit_for_bit() {
        let model = GammaGamma::new(6.25, 3.74, 15.44).unwrap();
        let customers: Vec<SpendHistory> = (0..500u32)
            .map(|i| SpendHistory {
                frequency: 1 + i % 9,
                average_order_value: 3.0 + f64::from(i) * 0.37,
            })
            .collect();
        let naive: f64 = customers.iter().map(|c| model.log_likelihood(c)).sum();
        assert_eq!(
            model.total_log_likelihood(&customers).to_bits(),
            naive.to_bits()
        );
    }

    #[test]
    fn new_customers_are_expected_to_spend_the_population_mean() {
        let model = GammaGamma::new(6.0, 4.0, 15.0).unwrap();
        let expected = model
            .conditional_expected_average_order_value(&SpendHistory {
                frequency: 0,
                average_order_value: 1_000.0,
            })
            .unwrap();
        assert_eq!(expected, 6.0 * 15.0 / 3.0);
    }

    #[test]
    fn more_history_pulls_the_expectation_towards_the_customer_mean() {
        let model = GammaGamma::new(6.0, 4.0, 15.0).unwrap();
        let at = |frequency| {
            model
                .conditional_expected_average_order_value(&SpendHistory {
                    frequency,
                    average_order_value: 100.0,
                })
                .unwrap()
        };
        assert!(at(1) < at(5) && at(5) < at(50) && at(50) < 100.0);
    }

    #[test]
    fn mean_order_value_is_undefined_when_q_is_at_most_one() {
        let model = GammaGamma::new(6.0, 0.9, 15.0).unwrap();
        assert!(model.population_mean_order_value().is_err());
    }

    #[test]
    fn fit_rejects_one_time_buyers_and_non_positive_values() {
        let one_time = [SpendHistory {
            frequency: 0,
            average_order_value: 10.0,
        }];
        assert!(matches!(
            GammaGamma::fit(&one_time, &FitOptions::default()),
            Err(ClvError::InvalidCustomer { index: 0, .. })
        ));
        let free = [
            SpendHistory {
                frequency: 1,
                average_order_value: 10.0,
            },
            SpendHistory {
                frequency: 2,
                average_order_value: 0.0,
            },
        ];
        assert!(matches!(
            GammaGamma::fit(&free, &FitOptions::default()),
            Err(ClvError::InvalidCustomer { index: 1, .. })
        ));
    }
}
