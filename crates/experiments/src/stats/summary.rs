//! Per-variant sufficient statistics and the summaries derived from them.

use serde::{Deserialize, Serialize};

use super::{StatsError, check_finite};

/// Units and converted units of one variant (`COUNT(*)`,
/// `SUM(converted::int)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversionCounts {
    /// Units in the variant.
    pub units: u64,
    /// Units that converted; at most `units`.
    pub conversions: u64,
}

impl ConversionCounts {
    /// Counts for `conversions` out of `units`.
    #[must_use]
    pub fn new(units: u64, conversions: u64) -> Self {
        Self { units, conversions }
    }

    /// Conversion rate in `[0, 1]`, `None` without units.
    #[must_use]
    pub fn rate(&self) -> Option<f64> {
        (self.units > 0).then(|| as_f64(self.conversions) / as_f64(self.units))
    }

    pub(crate) fn check(&self, group: &str) -> Result<(), StatsError> {
        if self.conversions > self.units {
            return Err(StatsError::ConversionsExceedUnits {
                group: group.to_owned(),
                conversions: self.conversions,
                units: self.units,
            });
        }
        Ok(())
    }
}

/// Moments of a continuous metric `y` over one variant's units
/// (`COUNT(*)`, `SUM(y)`, `SUM(y*y)`). Units without activity count with
/// `y = 0`; leaving them out biases every comparison.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricMoments {
    /// Number of units.
    pub units: u64,
    /// `Σ y`.
    pub sum: f64,
    /// `Σ y²`.
    pub sum_squares: f64,
}

impl MetricMoments {
    /// Moments of the given per-unit values (for tests and small inputs).
    #[must_use]
    pub fn from_values(values: &[f64]) -> Self {
        Self {
            units: values.len() as u64,
            sum: values.iter().sum(),
            sum_squares: values.iter().map(|y| y * y).sum(),
        }
    }

    /// Sample mean, `None` without units.
    #[must_use]
    pub fn mean(&self) -> Option<f64> {
        (self.units > 0).then(|| self.sum / as_f64(self.units))
    }

    /// Unbiased sample variance (`n - 1` denominator), `None` below two
    /// units. Clamped at zero against rounding.
    #[must_use]
    pub fn variance(&self) -> Option<f64> {
        (self.units > 1).then(|| {
            let n = as_f64(self.units);
            ((self.sum_squares - self.sum * self.sum / n) / (n - 1.0)).max(0.0)
        })
    }

    /// Mean and variance, checking the inputs.
    ///
    /// # Errors
    /// [`StatsError::NonFinite`] for non-finite sums,
    /// [`StatsError::TooFewUnits`] below two units.
    pub fn summary(&self, group: &str) -> Result<SampleSummary, StatsError> {
        check_finite("sum", self.sum)?;
        check_finite("sum_squares", self.sum_squares)?;
        match (self.mean(), self.variance()) {
            (Some(mean), Some(variance)) => Ok(SampleSummary {
                units: self.units,
                mean,
                variance,
            }),
            _ => Err(StatsError::TooFewUnits {
                group: group.to_owned(),
                units: self.units,
                required: 2,
            }),
        }
    }
}

/// Size, mean and unbiased variance of a sample: the input of Welch's test.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SampleSummary {
    /// Number of units, at least 2.
    pub units: u64,
    /// Sample mean.
    pub mean: f64,
    /// Unbiased sample variance.
    pub variance: f64,
}

impl SampleSummary {
    /// Variance of the sample mean, `variance / units`.
    #[must_use]
    pub fn variance_of_mean(&self) -> f64 {
        self.variance / as_f64(self.units)
    }
}

/// Everything the service aggregates per variant for a conversion metric and
/// a continuous metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VariantTotals {
    /// Units assigned and exposed.
    pub units: u64,
    /// Units that converted.
    pub conversions: u64,
    /// `Σ y` of the continuous metric.
    pub metric_sum: f64,
    /// `Σ y²` of the continuous metric.
    pub metric_sum_squares: f64,
}

impl VariantTotals {
    /// The conversion part.
    #[must_use]
    pub fn conversion_counts(&self) -> ConversionCounts {
        ConversionCounts::new(self.units, self.conversions)
    }

    /// The continuous-metric part.
    #[must_use]
    pub fn metric_moments(&self) -> MetricMoments {
        MetricMoments {
            units: self.units,
            sum: self.metric_sum,
            sum_squares: self.metric_sum_squares,
        }
    }

    /// Descriptive summary. Undefined quantities (rate and mean without
    /// units, variance below two units) are `None` rather than NaN.
    ///
    /// # Errors
    /// [`StatsError::ConversionsExceedUnits`] or [`StatsError::NonFinite`]
    /// for inconsistent inputs.
    pub fn summarize(&self) -> Result<VariantSummary, StatsError> {
        self.conversion_counts().check("variant")?;
        check_finite("metric_sum", self.metric_sum)?;
        check_finite("metric_sum_squares", self.metric_sum_squares)?;
        let metric = self.metric_moments();
        Ok(VariantSummary {
            units: self.units,
            conversions: self.conversions,
            conversion_rate: self.conversion_counts().rate(),
            metric_mean: metric.mean(),
            metric_variance: metric.variance(),
        })
    }
}

/// Descriptive statistics of one variant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VariantSummary {
    /// Units.
    pub units: u64,
    /// Converted units.
    pub conversions: u64,
    /// `conversions / units`, in `[0, 1]`.
    pub conversion_rate: Option<f64>,
    /// Mean of the continuous metric.
    pub metric_mean: Option<f64>,
    /// Unbiased variance of the continuous metric.
    pub metric_variance: Option<f64>,
}

/// Count to float. Counts above 2^53 lose precision, far beyond any
/// experiment's size.
#[allow(clippy::cast_precision_loss)]
pub(crate) fn as_f64(n: u64) -> f64 {
    n as f64
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::stats::test_support::assert_close;

    #[test]
    fn summary_reports_rate_mean_and_unbiased_variance() {
        let values = [1.0, 2.0, 4.0, 7.0];
        let m = MetricMoments::from_values(&values);
        let totals = VariantTotals {
            units: 4,
            conversions: 3,
            metric_sum: m.sum,
            metric_sum_squares: m.sum_squares,
        };
        let s = totals.summarize().unwrap();
        assert_eq!(s.conversion_rate, Some(0.75));
        assert_eq!(s.metric_mean, Some(3.5));
        // numpy.var([1, 2, 4, 7], ddof=1) = 7.0
        assert_close(s.metric_variance.unwrap(), 7.0, 1e-12);
    }

    #[test]
    fn summary_of_empty_variant_has_no_rate_mean_or_variance() {
        let s = VariantTotals {
            units: 0,
            conversions: 0,
            metric_sum: 0.0,
            metric_sum_squares: 0.0,
        }
        .summarize()
        .unwrap();
        assert_eq!(
            (s.conversion_rate, s.metric_mean, s.metric_variance),
            (None, None, None)
        );
    }

    #[test]
    fn more_conversions_than_units_is_rejected() {
        let totals = VariantTotals {
            units: 2,
            conversions: 3,
            metric_sum: 0.0,
            metric_sum_squares: 0.0,
        };
        assert!(matches!(
            totals.summarize(),
            Err(StatsError::ConversionsExceedUnits { .. })
        ));
    }

    #[test]
    fn sums_from_sql_give_same_variance_as_raw_values() {
        // Reference from tests/reference: numpy var(ddof=1) of the control
        // sample = 490.0402142984177.
        let m = MetricMoments {
            units: 800,
            sum: 23_901.871_912_198_912,
            sum_squares: 1_105_666.482_358_39,
        };
        assert_close(m.mean().unwrap(), 29.877_339_890_248_642, 1e-12);
        assert_close(m.variance().unwrap(), 490.040_214_298_417_7, 1e-9);
    }
}
