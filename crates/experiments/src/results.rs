//! Turns per-variant SQL aggregates into `GetResultsResponse` figures with the [`crate::stats`]
//! module: two-proportion z-tests for BINARY metrics, Welch t-tests for CONTINUOUS ones,
//! Holm–Bonferroni over the treatments of each metric, the always-valid mixture SPRT when the
//! metric sets a minimum effect, CUPED when it sets a lookback, and the sample-ratio check.
//!
//! Everything is at 95 % (`ALPHA = 0.05`). A statistic that cannot be computed (too few units,
//! zero variance) is left unset and explained in `MetricResult.notes`, never reported as NaN.

use clientele_proto::v1 as pb;

use crate::definition::cuped_enabled;
use crate::model::VariantAggregates;
use crate::stats::{
    self, ConversionCounts, CovariateMoments, Estimate, MetricMoments, MixtureSequentialTest,
    SRM_P_VALUE_THRESHOLD, StatsError,
};

/// Two-sided significance level of every interval and test.
pub const ALPHA: f64 = 0.05;

/// Aggregates for every variant index `0..n` (variants without units get zeros).
pub fn dense(n: usize, aggregates: &[VariantAggregates]) -> Vec<VariantAggregates> {
    (0..n)
        .map(|i| {
            let i = i32::try_from(i).unwrap_or(i32::MAX);
            aggregates
                .iter()
                .find(|a| a.variant == i)
                .copied()
                .unwrap_or_else(|| VariantAggregates::empty(i))
        })
        .collect()
}

fn is_binary(metric: &pb::Metric) -> bool {
    metric.r#type == pb::MetricType::Binary as i32
}

/// The per-unit metric `y` of a variant: the 0/1 conversion indicator for BINARY metrics
/// (`Σ y = Σ y² = converted`), the summed value for CONTINUOUS ones.
pub fn metric_moments(metric: &pb::Metric, a: &VariantAggregates) -> MetricMoments {
    if is_binary(metric) {
        #[allow(clippy::cast_precision_loss)]
        let c = a.converted as f64;
        MetricMoments {
            units: a.units,
            sum: c,
            sum_squares: c,
        }
    } else {
        MetricMoments {
            units: a.units,
            sum: a.sum_value,
            sum_squares: a.sum_value_squares,
        }
    }
}

/// `y` with the CUPED covariate `x`.
pub fn covariate_moments(metric: &pb::Metric, a: &VariantAggregates) -> CovariateMoments {
    let y = metric_moments(metric, a);
    CovariateMoments {
        units: a.units,
        sum_y: y.sum,
        sum_y_squares: y.sum_squares,
        sum_x: a.sum_x,
        sum_x_squares: a.sum_x_squares,
        sum_xy: if is_binary(metric) {
            a.sum_x_converted
        } else {
            a.sum_x_value
        },
    }
}

fn estimate(e: &Estimate) -> pb::Estimate {
    pb::Estimate {
        point: e.value,
        ci_lower: e.ci.lower,
        ci_upper: e.ci.upper,
    }
}

/// The fixed-horizon comparison of one treatment with control.
struct Fixed {
    absolute: Estimate,
    relative: Option<Estimate>,
    p_value: f64,
}

fn fixed(
    metric: &pb::Metric,
    control: &VariantAggregates,
    t: &VariantAggregates,
) -> Result<Fixed, StatsError> {
    if is_binary(metric) {
        let c = stats::compare_conversions(
            ConversionCounts::new(control.units, control.converted),
            ConversionCounts::new(t.units, t.converted),
            ALPHA,
        )?;
        Ok(Fixed {
            absolute: c.absolute_lift,
            relative: c.relative_lift,
            p_value: c.p_value,
        })
    } else {
        let c = stats::compare_means(
            &metric_moments(metric, control),
            &metric_moments(metric, t),
            ALPHA,
        )?;
        Ok(Fixed {
            absolute: c.absolute_lift,
            relative: c.relative_lift,
            p_value: c.p_value,
        })
    }
}

fn sequential(
    metric: &pb::Metric,
    control: &VariantAggregates,
    t: &VariantAggregates,
) -> Result<pb::SequentialResult, StatsError> {
    let test = MixtureSequentialTest::for_minimum_effect(metric.minimum_effect, ALPHA)?;
    let r = if is_binary(metric) {
        test.evaluate_conversions(
            ConversionCounts::new(control.units, control.converted),
            ConversionCounts::new(t.units, t.converted),
            None,
        )?
    } else {
        test.evaluate_means(
            &metric_moments(metric, control),
            &metric_moments(metric, t),
            None,
        )?
    };
    Ok(pb::SequentialResult {
        p_value: r.always_valid_p_value,
        absolute_lift: Some(pb::Estimate {
            point: r.estimate,
            ci_lower: r.confidence_sequence.lower,
            ci_upper: r.confidence_sequence.upper,
        }),
    })
}

fn variant_name(i: usize) -> String {
    if i == 0 {
        "control".to_owned()
    } else {
        format!("variant {i}")
    }
}

/// Results of one metric from its per-variant aggregates (indexed like `variants`).
pub fn metric_result(
    metric: &pb::Metric,
    role: pb::MetricRole,
    variants: &[pb::Variant],
    aggregates: &[VariantAggregates],
) -> pb::MetricResult {
    let aggs = dense(variants.len(), aggregates);
    let mut notes = Vec::new();
    let mut out: Vec<pb::VariantResult> = variants
        .iter()
        .zip(&aggs)
        .enumerate()
        .map(|(i, (v, a))| {
            let m = metric_moments(metric, a);
            #[allow(clippy::cast_precision_loss)]
            let rate = if a.units > 0 {
                a.converted as f64 / a.units as f64
            } else {
                0.0
            };
            pb::VariantResult {
                variant_index: i32::try_from(i).unwrap_or(i32::MAX),
                variant_key: v.key.clone(),
                units: i64::try_from(a.units).unwrap_or(i64::MAX),
                converted_units: i64::try_from(a.converted).unwrap_or(i64::MAX),
                conversion_rate: rate,
                mean: m.mean().unwrap_or(0.0),
                std_dev: m.variance().map_or(0.0, f64::sqrt),
                vs_control: None,
            }
        })
        .collect();

    let control = aggs
        .first()
        .copied()
        .unwrap_or_else(|| VariantAggregates::empty(0));
    let mut fixed_results: Vec<Option<Fixed>> = Vec::new();
    for (i, t) in aggs.iter().enumerate().skip(1) {
        match fixed(metric, &control, t) {
            Ok(f) => fixed_results.push(Some(f)),
            Err(e) => {
                notes.push(format!("{}: {e}", variant_name(i)));
                fixed_results.push(None);
            }
        }
    }
    // Holm over the comparisons that exist.
    let p: Vec<f64> = fixed_results.iter().flatten().map(|f| f.p_value).collect();
    let mut holm = stats::holm_bonferroni(&p).into_iter();

    let cuped = if cuped_enabled(metric) {
        let all: Vec<CovariateMoments> =
            aggs.iter().map(|a| covariate_moments(metric, a)).collect();
        match all.split_first() {
            Some((c, treatments)) => {
                match stats::compare_means_cuped_to_control(c, treatments, ALPHA) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        notes.push(format!("CUPED: {e}"));
                        None
                    }
                }
            }
            None => None,
        }
    } else {
        None
    };

    for (k, f) in fixed_results.into_iter().enumerate() {
        let i = k + 1;
        let Some(f) = f else { continue };
        let seq = if metric.minimum_effect > 0.0 {
            match sequential(metric, &control, &aggs[i]) {
                Ok(s) => Some(s),
                Err(e) => {
                    notes.push(format!("{} sequential: {e}", variant_name(i)));
                    None
                }
            }
        } else {
            None
        };
        let cuped_result = cuped.as_ref().and_then(|all| {
            all.iter()
                .find(|t| t.variant == i)
                .map(|t| pb::CupedResult {
                    absolute_lift: Some(estimate(&t.comparison.adjusted.absolute_lift)),
                    relative_lift: t.comparison.adjusted.relative_lift.as_ref().map(estimate),
                    p_value: t.comparison.adjusted.p_value,
                    variance_reduction: t.comparison.variance_reduction,
                    theta: t.comparison.adjustment.theta,
                })
        });
        out[i].vs_control = Some(pb::Comparison {
            absolute_lift: Some(estimate(&f.absolute)),
            relative_lift: f.relative.as_ref().map(estimate),
            p_value: f.p_value,
            p_value_holm: holm.next().unwrap_or(f.p_value),
            sequential: seq,
            cuped: cuped_result,
        });
    }

    pb::MetricResult {
        metric_key: metric.key.clone(),
        role: role as i32,
        r#type: metric.r#type,
        currency: metric.currency.clone(),
        variants: out,
        notes,
    }
}

/// The sample-ratio check of exposed units against the configured weights; `None` before
/// any unit was exposed.
pub fn sample_ratio(variants: &[pb::Variant], units: &[u64]) -> Option<pb::SampleRatioMismatch> {
    let weights: Vec<f64> = variants.iter().map(|v| v.weight).collect();
    let check = stats::check_sample_ratio(units, &weights).ok()?;
    Some(pb::SampleRatioMismatch {
        chi_square: check.chi_square,
        degrees_of_freedom: i32::try_from(check.degrees_of_freedom).unwrap_or(i32::MAX),
        p_value: check.p_value,
        mismatch: check.mismatch,
        observed_units: units
            .iter()
            .map(|u| i64::try_from(*u).unwrap_or(i64::MAX))
            .collect(),
        expected_units: check.expected,
    })
    .inspect(|s| debug_assert_eq!(s.mismatch, s.p_value < SRM_P_VALUE_THRESHOLD))
}
