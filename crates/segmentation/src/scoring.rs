//! The scoring pipeline between stored facts and the pure domain modules: per-profile histories
//! → features ([`crate::features`]) → RFM ([`crate::rfm`]), predicted value ([`crate::clv`]),
//! lifecycle ([`crate::lifecycle`]) → segment membership. Also the validation of segment
//! definitions and the rule-language context.
//!
//! Pure like the modules it glues (no I/O): the batch run and real-time re-scoring both call
//! these functions, so a profile scored in real time against the latest run's cut points and
//! models gets exactly what a batch run would give it with the same boundaries.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use clientele_proto::v1 as pb;
use clientele_rules::{CompiledRule, EvalContext, Schema, Value, ValueType};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::clustering::{
    ClusteringError, GaussianMixture, GaussianMixtureConfig, KMeans, KMeansConfig, Matrix,
    adjusted_rand_index, select_k_by_silhouette, silhouette_score_sampled,
};
use crate::clv::{
    BgNbd, ClvHorizon, FitOptions, GammaGamma, PurchaseHistory, SpendHistory, TimeUnit,
    customer_lifetime_value,
};
use crate::features::{
    EngagementCounters, FeatureConfig, Order, ProfileFeatures, ProfileHistory, SECONDS_PER_DAY,
    compute_features,
};
use crate::lifecycle::{LifecycleClassifier, LifecycleInput, LifecycleState, LifecycleThresholds};
use crate::rfm::{RfmCutPoints, RfmInput, RfmScore, RfmScorer, SegmentMap};

/// Most customers the CLV models are fitted on; larger bases are fitted on a deterministic
/// sample (maximum-likelihood estimates on 10 000 customers are already tight, and fitting
/// cost is linear in customers × likelihood evaluations).
pub const CLV_FIT_SAMPLE: usize = 10_000;
/// Rows the silhouette is computed on.
pub const SILHOUETTE_SAMPLE: usize = 5_000;

/// How profiles are scored: the server's read-only scoring configuration.
#[derive(Debug, Clone)]
pub struct ScoringConfig {
    /// ISO 4217 code of every monetary figure.
    pub reporting_currency: String,
    /// Conversion rates of other currencies' minor units into reporting minor units.
    pub currency_rates: BTreeMap<String, f64>,
    /// RFM and clustering window, days.
    pub rfm_window_days: u32,
    /// The RFM name map.
    pub segment_map: SegmentMap,
    /// Lifecycle thresholds.
    pub lifecycle: LifecycleClassifier,
    /// CHURNED when P(alive) is below this (0 disables).
    pub churned_p_alive: f64,
    /// Prediction horizon, days.
    pub horizon_days: u32,
    /// Annual CLV discount rate.
    pub annual_discount_rate: f64,
    /// Retained run snapshots.
    pub retained_runs: u32,
}

/// The configured RFM name map (`segmentation.rfm_segments`), or the standard one when none
/// is configured.
///
/// # Errors
/// A message naming the offending entry: an empty or over-long name, a bound outside 1..=5 or
/// min > max, or (R, FM) cells that no rule covers.
pub fn rfm_segment_map(
    rules: &[clientele_runtime::settings::RfmSegmentSetting],
) -> Result<SegmentMap, String> {
    if rules.is_empty() {
        return Ok(SegmentMap::standard());
    }
    let mut out = Vec::with_capacity(rules.len());
    for (i, r) in rules.iter().enumerate() {
        if r.name.trim().is_empty() || r.name.len() > 64 {
            return Err(format!(
                "segmentation.rfm_segments[{i}].name must be 1..=64 bytes"
            ));
        }
        out.push(crate::rfm::SegmentRule::new(
            &r.name,
            r.recency[0],
            r.recency[1],
            r.frequency_monetary[0],
            r.frequency_monetary[1],
        ));
    }
    SegmentMap::new(out).map_err(|e| match e {
        crate::rfm::RfmError::InvalidRule { name } => format!(
            "segmentation.rfm_segments: `{name}` needs recency and frequency_monetary ranges \
             [min, max] with 1 <= min <= max <= 5"
        ),
        crate::rfm::RfmError::UncoveredCells { cells } => {
            let cells: Vec<String> = cells.iter().map(|(r, fm)| format!("R{r} FM{fm}")).collect();
            format!(
                "segmentation.rfm_segments does not cover {} (every R × FM cell needs a name; \
                 add a catch-all last)",
                cells.join(", ")
            )
        }
        other => format!("segmentation.rfm_segments: {other}"),
    })
}

impl ScoringConfig {
    /// Builds the configuration from settings.
    ///
    /// # Errors
    /// A message naming the setting when it is out of range.
    pub fn from_settings(
        s: &clientele_runtime::settings::SegmentationSettings,
    ) -> Result<Self, String> {
        if s.reporting_currency.len() != 3
            || !s.reporting_currency.chars().all(|c| c.is_ascii_uppercase())
        {
            return Err("segmentation.reporting_currency must be an ISO 4217 code".into());
        }
        for (code, rate) in &s.currency_rates {
            if !(rate.is_finite() && *rate > 0.0) {
                return Err(format!(
                    "segmentation.currency_rates.{code} must be positive"
                ));
            }
        }
        if s.rfm_window_days == 0 || s.prediction_horizon_days == 0 {
            return Err(
                "segmentation.rfm_window_days and prediction_horizon_days must be positive".into(),
            );
        }
        if !(0.0..1.0).contains(&s.clv_annual_discount_rate)
            || !(0.0..1.0).contains(&s.lifecycle_churned_p_alive)
        {
            return Err("segmentation discount rate and churned P(alive) must be in 0..1".into());
        }
        let thresholds = LifecycleThresholds {
            new_window_days: s.lifecycle_new_days,
            at_risk_after_days: s.lifecycle_at_risk_days,
            lapsed_after_days: s.lifecycle_lapsed_days,
            churned_after_days: s.lifecycle_churned_days,
            at_risk_multiplier: s.lifecycle_at_risk_intervals,
            ..LifecycleThresholds::default()
        };
        let lifecycle = LifecycleClassifier::new(thresholds)
            .map_err(|e| format!("segmentation lifecycle thresholds: {e}"))?;
        Ok(Self {
            reporting_currency: s.reporting_currency.clone(),
            currency_rates: s.currency_rates.clone(),
            rfm_window_days: s.rfm_window_days,
            segment_map: rfm_segment_map(&s.rfm_segments)?,
            lifecycle,
            churned_p_alive: s.lifecycle_churned_p_alive,
            horizon_days: s.prediction_horizon_days,
            annual_discount_rate: s.clv_annual_discount_rate,
            retained_runs: s.retained_runs.max(2),
        })
    }

    /// Converts `amount_minor` of `currency` into reporting minor units; `None` without a rate.
    #[must_use]
    pub fn convert(&self, amount_minor: i64, currency: &str) -> Option<i64> {
        if currency == self.reporting_currency {
            return Some(amount_minor);
        }
        let rate = self.currency_rates.get(currency)?;
        #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
        Some((amount_minor as f64 * rate).round() as i64)
    }

    /// The configuration as the API shows it.
    #[must_use]
    pub fn to_proto(&self) -> pb::ScoringConfig {
        let days = |d: f64| prost_types::Duration {
            #[allow(clippy::cast_possible_truncation)]
            seconds: (d * SECONDS_PER_DAY) as i64,
            nanos: 0,
        };
        let t = self.lifecycle.thresholds();
        let range = |min: u8, max: u8| {
            Some(pb::ScoreRange {
                min: i32::from(min),
                max: i32::from(max),
            })
        };
        pb::ScoringConfig {
            reporting_currency: self.reporting_currency.clone(),
            rfm_window: Some(days(f64::from(self.rfm_window_days))),
            rfm_name_rules: self
                .segment_map
                .rules()
                .iter()
                .map(|r| pb::RfmNameRule {
                    name: r.name.clone(),
                    segment: rfm_segment_enum(&r.name) as i32,
                    recency: range(r.r_min, r.r_max),
                    // The map is over R × FM (mean of F and M): both ranges are the FM range.
                    frequency: range(r.fm_min, r.fm_max),
                    monetary: range(r.fm_min, r.fm_max),
                })
                .collect(),
            lifecycle: Some(pb::LifecycleConfig {
                new_window: Some(days(t.new_window_days)),
                at_risk_after_intervals: t.at_risk_multiplier,
                lapsed_after: Some(days(t.lapsed_after_days)),
                churned_after: Some(days(t.churned_after_days)),
                churned_p_alive: self.churned_p_alive,
            }),
            prediction_horizon: Some(days(f64::from(self.horizon_days))),
            clv_annual_discount_rate: self.annual_discount_rate,
        }
    }

    fn clv_horizon(&self) -> ClvHorizon {
        ClvHorizon {
            months: (self.horizon_days / 30).max(1),
            monthly_discount_rate: (1.0 + self.annual_discount_rate).powf(1.0 / 12.0) - 1.0,
            time_unit: TimeUnit::Day,
        }
    }
}

/// The standard enum value of a configured RFM segment name.
#[must_use]
pub fn rfm_segment_enum(name: &str) -> pb::RfmSegment {
    use pb::RfmSegment as S;
    match name {
        "Champions" => S::Champions,
        "Loyal Customers" => S::LoyalCustomers,
        "Potential Loyalists" => S::PotentialLoyalists,
        "New Customers" => S::NewCustomers,
        "Promising" => S::Promising,
        "Need Attention" => S::NeedAttention,
        "About to Sleep" => S::AboutToSleep,
        "At Risk" => S::AtRisk,
        "Can't Lose Them" => S::CantLoseThem,
        "Hibernating" => S::Hibernating,
        "Lost" => S::Lost,
        _ => S::Other,
    }
}

/// Stored code ↔ lifecycle state (the proto enum numbers).
#[must_use]
pub fn lifecycle_code(state: LifecycleState) -> i64 {
    match state {
        LifecycleState::New => 1,
        LifecycleState::Active => 2,
        LifecycleState::AtRisk => 3,
        LifecycleState::Lapsed => 4,
        LifecycleState::Churned => 5,
    }
}

/// The state of a stored code.
#[must_use]
pub fn lifecycle_from_code(code: i64) -> Option<LifecycleState> {
    Some(match code {
        1 => LifecycleState::New,
        2 => LifecycleState::Active,
        3 => LifecycleState::AtRisk,
        4 => LifecycleState::Lapsed,
        5 => LifecycleState::Churned,
        _ => return None,
    })
}

/// One stored order with its refunds and discount, already in reporting minor units.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredOrder {
    /// When placed, µs.
    pub placed_at: i64,
    /// Gross amount, reporting minor units (0 when not convertible).
    pub amount_minor: i64,
    /// Discount, reporting minor units.
    pub discount_minor: i64,
    /// Refunded so far, reporting minor units.
    pub refunded_minor: i64,
    /// Whether a full refund was recorded (the order then no longer counts).
    pub fully_refunded: bool,
    /// Category spend of the order.
    pub lines: Vec<(String, i64)>,
}

/// Everything stored about one profile's behaviour.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileData {
    /// The profile id.
    pub profile_id: String,
    /// Orders (any order).
    pub orders: Vec<StoredOrder>,
    /// Engagement counters by kind over the last 90 days before scoring.
    pub engagement: BTreeMap<String, i64>,
}

/// Features and scores of one profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// The profile id.
    pub profile_id: String,
    /// Features over the whole history (lifecycle, tenure, CLV).
    pub all: ProfileFeatures,
    /// Features over the RFM window (RFM, clustering, rule features).
    pub window: ProfileFeatures,
    /// Discount total / (net revenue + discount total) in the window.
    pub discount_share: f64,
    /// Engagement events in the last 90 days.
    pub engagement_90d: f64,
    /// The BG/NBD summary (full history).
    pub purchases: Option<PurchaseHistory>,
    /// Mean net value of repeat orders, reporting minor units.
    pub repeat_aov: f64,
    /// RFM score and name (profiles with an order in the window, once scored).
    pub rfm: Option<(RfmScore, String)>,
    /// Lifecycle state (profiles that ever ordered).
    pub lifecycle: Option<LifecycleState>,
    /// Predicted value.
    pub predicted: Option<Predicted>,
}

/// Predicted customer value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Predicted {
    /// Discounted CLV over the horizon, reporting minor units.
    pub clv: f64,
    /// P(alive), 0..=1.
    pub p_alive: f64,
    /// Expected purchases over the horizon.
    pub expected_purchases: f64,
    /// Expected order value, reporting minor units.
    pub expected_aov: f64,
}

/// What one run fitted, reused by real-time scoring until the next run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunModel {
    /// RFM cut points (none when no profile had an order in the window).
    pub cut_points: Option<RfmCutPoints>,
    /// Fitted BG/NBD.
    pub bgnbd: Option<BgNbd>,
    /// Fitted Gamma-Gamma.
    pub gamma_gamma: Option<GammaGamma>,
    /// Minimum CLV of the top fraction, per PREDICTED_VALUE segment with `top_fraction`.
    pub clv_thresholds: BTreeMap<String, f64>,
    /// Cluster models per CLUSTER segment.
    pub clusters: BTreeMap<String, ClusterModel>,
}

/// What is needed to assign a new profile to a fitted clustering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterModel {
    /// Definition version clustered.
    pub version: i64,
    /// Preprocessing.
    pub scaler: Scaler,
    /// Centroids in scaled space, one per cluster.
    pub centroids: Vec<Vec<f64>>,
}

fn days(from_micros: i64, to_micros: i64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let micros = (to_micros - from_micros) as f64;
    micros / 1e6 / SECONDS_PER_DAY
}

fn engagement_counters(map: &BTreeMap<String, i64>) -> EngagementCounters {
    let get = |k: &str| u64::try_from(map.get(k).copied().unwrap_or(0)).unwrap_or(0);
    EngagementCounters {
        product_views: get("product_viewed"),
        email_opens: get("email_opened"),
        email_clicks: get("email_clicked"),
        app_opens: get("app_opened"),
        carts_created: get("cart_updated"),
        carts_abandoned: get("cart_abandoned"),
    }
}

/// Computes the features of one profile as of `as_of` (µs). Fully refunded orders are left
/// out (they no longer count for frequency, recency or spend).
#[must_use]
pub fn features_of(data: &ProfileData, as_of: i64, config: &ScoringConfig) -> Scored {
    let window_start = as_of - i64::from(config.rfm_window_days) * 86_400_000_000;
    let as_of_secs = as_of.div_euclid(1_000_000);
    let to_order = |o: &StoredOrder| Order {
        placed_at: o.placed_at.div_euclid(1_000_000),
        amount_minor: o.amount_minor,
        refunded_minor: o.refunded_minor,
        lines: o
            .lines
            .iter()
            .map(|(c, a)| crate::features::OrderLine {
                category: c.clone(),
                amount_minor: *a,
            })
            .collect(),
    };
    let counted: Vec<&StoredOrder> = data
        .orders
        .iter()
        .filter(|o| !o.fully_refunded && o.placed_at <= as_of)
        .collect();
    let engagement = engagement_counters(&data.engagement);
    let history_all = ProfileHistory {
        created_at: None,
        orders: counted.iter().map(|o| to_order(o)).collect(),
        engagement,
    };
    let fc = FeatureConfig::default();
    let all = compute_features(&history_all, as_of_secs, &fc);
    let in_window: Vec<&StoredOrder> = counted
        .iter()
        .copied()
        .filter(|o| o.placed_at >= window_start)
        .collect();
    let window = if in_window.len() == counted.len() {
        all.clone()
    } else {
        let h = ProfileHistory {
            created_at: None,
            orders: in_window.iter().map(|o| to_order(o)).collect(),
            engagement,
        };
        compute_features(&h, as_of_secs, &fc)
    };
    let discounts: i64 = in_window.iter().map(|o| o.discount_minor.max(0)).sum();
    #[allow(clippy::cast_precision_loss)]
    let discount_share = {
        let denom = (window.monetary_total_minor + discounts) as f64;
        if denom > 0.0 {
            (discounts as f64 / denom).clamp(0.0, 1.0)
        } else {
            0.0
        }
    };
    #[allow(clippy::cast_precision_loss)]
    let engagement_90d = data.engagement.values().map(|v| (*v).max(0)).sum::<i64>() as f64;
    // BG/NBD summary: repeat purchases on distinct days after the first.
    let mut times: Vec<i64> = counted.iter().map(|o| o.placed_at).collect();
    times.sort_unstable();
    let purchases = times.first().map(|&first| {
        let mut day_set = BTreeSet::new();
        let mut last = first;
        for &t in &times {
            if day_set.insert(t.div_euclid(86_400_000_000)) {
                last = t;
            }
        }
        let repeat = u32::try_from(day_set.len().saturating_sub(1)).unwrap_or(u32::MAX);
        let age = days(first, as_of).max(0.0);
        PurchaseHistory {
            frequency: repeat,
            recency: if repeat == 0 {
                0.0
            } else {
                days(first, last).clamp(0.0, age)
            },
            age,
        }
    });
    let mut by_time: Vec<&StoredOrder> = counted.clone();
    by_time.sort_by_key(|o| o.placed_at);
    let repeats: Vec<f64> = by_time
        .iter()
        .skip(1)
        .map(|o| {
            #[allow(clippy::cast_precision_loss)]
            let v = (o.amount_minor - o.refunded_minor.clamp(0, o.amount_minor.max(0))) as f64;
            v.max(0.0)
        })
        .collect();
    #[allow(clippy::cast_precision_loss)]
    let repeat_aov = if repeats.is_empty() {
        0.0
    } else {
        repeats.iter().sum::<f64>() / repeats.len() as f64
    };
    Scored {
        profile_id: data.profile_id.clone(),
        all,
        window,
        discount_share,
        engagement_90d,
        purchases,
        repeat_aov,
        rfm: None,
        lifecycle: None,
        predicted: None,
    }
}

fn rfm_input(s: &Scored) -> Option<RfmInput> {
    let recency = s.window.recency_days?;
    #[allow(clippy::cast_precision_loss)]
    Some(RfmInput {
        recency_days: recency,
        frequency: f64::from(s.window.frequency),
        monetary: s.window.monetary_total_minor as f64,
    })
}

/// Scores the whole base: RFM quintiles, CLV fits, lifecycle. Returns the fitted model;
/// `previous` supplies the CLV models when the fits fail (reported as not converged).
pub fn score_base(
    scored: &mut [Scored],
    config: &ScoringConfig,
    previous: Option<&RunModel>,
) -> (RunModel, bool) {
    let mut model = RunModel::default();
    // RFM over customers with an order in the window, in profile order (the tiebreak).
    let idx: Vec<usize> = (0..scored.len())
        .filter(|&i| scored[i].window.frequency > 0 && scored[i].window.recency_days.is_some())
        .collect();
    let inputs: Vec<RfmInput> = idx.iter().filter_map(|&i| rfm_input(&scored[i])).collect();
    let scorer = RfmScorer::new(config.segment_map.clone());
    if let Ok(batch) = scorer.score_base(&inputs) {
        for (k, &i) in idx.iter().enumerate() {
            let score = batch.scores[k];
            scored[i].rfm = Some((score, scorer.segment(&score).to_owned()));
        }
        model.cut_points = Some(batch.cut_points);
    }
    // CLV fits on a deterministic sample.
    let customers: Vec<PurchaseHistory> = scored.iter().filter_map(|s| s.purchases).collect();
    let step = customers.len().div_ceil(CLV_FIT_SAMPLE).max(1);
    let sample: Vec<PurchaseHistory> = customers.iter().step_by(step).copied().collect();
    let spend: Vec<SpendHistory> = scored
        .iter()
        .filter_map(|s| {
            let p = s.purchases?;
            (p.frequency > 0 && s.repeat_aov > 0.0).then_some(SpendHistory {
                frequency: p.frequency,
                average_order_value: s.repeat_aov,
            })
        })
        .step_by(step)
        .collect();
    let (bg, gg) = fit_clv(&sample, &spend, config.horizon_days);
    let converged = bg.is_some() && gg.is_some();
    let prev = previous.map(|p| (p.bgnbd, p.gamma_gamma));
    model.bgnbd = bg.or(prev.and_then(|p| p.0));
    model.gamma_gamma = gg
        .or(prev.and_then(|p| p.1))
        .or_else(|| fallback_spend_model(&spend));
    let m = &model;
    scored.par_iter_mut().for_each(|s| {
        s.predicted = predict(s, m, config);
        s.lifecycle = lifecycle_of(s, config);
    });
    (model, converged)
}

/// Fits BG/NBD (time in days) and Gamma-Gamma (money in reporting minor units), retrying
/// with a looser tolerance and a small penalty when the plain fit does not converge (small or
/// degenerate bases). The Gamma-Gamma penalty is applied in major units (÷100) because the
/// L2 penalty on `v` is not scale-free; the fitted `v` is scaled back.
fn fit_clv(
    purchases: &[PurchaseHistory],
    spend: &[SpendHistory],
    horizon_days: u32,
) -> (Option<BgNbd>, Option<GammaGamma>) {
    let attempts = [
        FitOptions {
            penalizer: 0.0,
            max_evaluations: 3_000,
            tolerance: 1e-9,
        },
        FitOptions {
            penalizer: 0.01,
            max_evaluations: 3_000,
            tolerance: 1e-7,
        },
        FitOptions {
            penalizer: 0.1,
            max_evaluations: 3_000,
            tolerance: 1e-5,
        },
    ];
    // The two fits are independent: they run side by side.
    rayon::join(
        || fit_bgnbd(purchases, &attempts, horizon_days),
        || fit_gamma_gamma(spend, &attempts),
    )
}

/// The first of `attempts` whose BG/NBD fit predicts over the whole horizon.
fn fit_bgnbd(
    purchases: &[PurchaseHistory],
    attempts: &[FitOptions],
    horizon_days: u32,
) -> Option<BgNbd> {
    // The oldest customer with the most repeat purchases: the hardest prediction to evaluate.
    let probe = purchases
        .iter()
        .max_by(|a, b| {
            (a.age, a.frequency)
                .partial_cmp(&(b.age, b.frequency))
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .copied();
    attempts
        .iter()
        .find_map(|o| match BgNbd::fit(purchases, o) {
            // A degenerate optimum (huge a and b) can defeat the prediction series: only keep a
            // fit that predicts over the whole horizon.
            Ok(f)
                if probe.is_none_or(|h| {
                    f.model
                        .conditional_expected_purchases(&h, f64::from(horizon_days) + 31.0)
                        .is_ok()
                        && f.model
                            .conditional_expected_purchases(
                                &PurchaseHistory {
                                    frequency: 0,
                                    recency: 0.0,
                                    age: h.age,
                                },
                                f64::from(horizon_days) + 31.0,
                            )
                            .is_ok()
                }) =>
            {
                Some(f.model)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(error = %e, "BG/NBD fit attempt failed");
                None
            }
        })
}

/// The first of `attempts` whose Gamma-Gamma fit (penalised in major units) has `q > 1`.
fn fit_gamma_gamma(spend: &[SpendHistory], attempts: &[FitOptions]) -> Option<GammaGamma> {
    let major: Vec<SpendHistory> = spend
        .iter()
        .map(|s| SpendHistory {
            frequency: s.frequency,
            average_order_value: s.average_order_value / 100.0,
        })
        .collect();
    attempts
        .iter()
        .find_map(|o| match GammaGamma::fit(&major, o) {
            Ok(f) if f.model.q > 1.0 => {
                GammaGamma::new(f.model.p, f.model.q, f.model.v * 100.0).ok()
            }
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(error = %e, "Gamma-Gamma fit attempt failed");
                None
            }
        })
}

/// The spend model used when Gamma-Gamma cannot be fitted (no repeat customers, or a fit with
/// `q <= 1`, whose population mean is undefined — common on small bases) and no previous run
/// has one: `p = 1`, `q = 3`, `v` matching the observed mean repeat-order value, so a
/// customer's expected order value is their own mean shrunk toward the population mean with
/// weight `x / (x + 2)`. Reported as not converged.
fn fallback_spend_model(spend: &[SpendHistory]) -> Option<GammaGamma> {
    if spend.is_empty() {
        return None;
    }
    #[allow(clippy::cast_precision_loss)]
    let mean = spend.iter().map(|s| s.average_order_value).sum::<f64>() / spend.len() as f64;
    GammaGamma::new(1.0, 3.0, 2.0 * mean).ok()
}

/// Predicted value of one profile with `model`'s fits (none without both fits or orders).
#[must_use]
pub fn predict(s: &Scored, model: &RunModel, config: &ScoringConfig) -> Option<Predicted> {
    let (bg, gg) = (model.bgnbd.as_ref()?, model.gamma_gamma.as_ref()?);
    let history = s.purchases?;
    let horizon = config.clv_horizon();
    let clv = customer_lifetime_value(bg, gg, &history, s.repeat_aov, &horizon).ok()?;
    let p_alive = bg.probability_alive(&history);
    let expected_purchases = bg
        .conditional_expected_purchases_alive(&history, f64::from(config.horizon_days), p_alive)
        .ok()?;
    let expected_aov = gg
        .conditional_expected_average_order_value(&SpendHistory {
            frequency: history.frequency,
            average_order_value: s.repeat_aov,
        })
        .ok()?;
    Some(Predicted {
        clv: clv.max(0.0),
        p_alive,
        expected_purchases: expected_purchases.max(0.0),
        expected_aov,
    })
}

/// Lifecycle state of one profile (needs `s.predicted` for the P(alive) rule).
#[must_use]
pub fn lifecycle_of(s: &Scored, config: &ScoringConfig) -> Option<LifecycleState> {
    let state = config
        .lifecycle
        .classify(&LifecycleInput::from_features(&s.all))?;
    if config.churned_p_alive > 0.0
        && s.predicted
            .is_some_and(|p| p.p_alive < config.churned_p_alive)
    {
        return Some(LifecycleState::Churned);
    }
    Some(state)
}

/// Re-scores one profile against a run's cut points and models (real time).
pub fn score_one(s: &mut Scored, model: &RunModel, config: &ScoringConfig) {
    let scorer = RfmScorer::new(config.segment_map.clone());
    s.rfm = match (&model.cut_points, rfm_input(s)) {
        (Some(cuts), Some(input)) if s.window.frequency > 0 => {
            let score = cuts.score(&input);
            Some((score, scorer.segment(&score).to_owned()))
        }
        _ => None,
    };
    s.predicted = predict(s, model, config);
    s.lifecycle = lifecycle_of(s, config);
}

// ---------------------------------------------------------------------------------------------
// Segment definitions
// ---------------------------------------------------------------------------------------------

/// A definition error naming the request field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Field path, e.g. `segment.rule.expression`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn field_error(field: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// Rule-language features: name, type, meaning (documented in the proto's RuleDefinition).
pub const RULE_FEATURES: &[(&str, ValueType)] = &[
    ("recency_days", ValueType::Number),
    ("orders", ValueType::Number),
    ("frequency", ValueType::Number),
    ("monetary_minor", ValueType::Number),
    ("average_order_value_minor", ValueType::Number),
    ("tenure_days", ValueType::Number),
    ("days_since_first_order", ValueType::Number),
    ("mean_inter_purchase_days", ValueType::Number),
    ("refund_rate", ValueType::Number),
    ("discount_share", ValueType::Number),
    ("engagement_90d", ValueType::Number),
    ("engagement_score", ValueType::Number),
    ("cart_abandonment_rate", ValueType::Number),
    ("distinct_categories", ValueType::Number),
    ("lifetime_orders", ValueType::Number),
    ("r_score", ValueType::Number),
    ("f_score", ValueType::Number),
    ("m_score", ValueType::Number),
    ("rfm_segment", ValueType::String),
    ("lifecycle", ValueType::String),
    ("clv_minor", ValueType::Number),
    ("p_alive", ValueType::Number),
    ("expected_purchases", ValueType::Number),
];

/// The schema rules are checked against; `segments` are the non-RULE segment ids a rule may
/// reference.
#[must_use]
pub fn rule_schema(segments: &[String]) -> Schema {
    let mut schema = Schema::new()
        .with_consent_purposes(["email", "sms", "push", "personalisation", "analytics"])
        .with_segments(segments.iter().cloned());
    for (name, t) in RULE_FEATURES {
        schema = schema.with_feature(*name, *t);
    }
    schema
}

/// Lower-case name of a lifecycle state, as rules see it.
#[must_use]
pub fn lifecycle_name(state: LifecycleState) -> &'static str {
    match state {
        LifecycleState::New => "new",
        LifecycleState::Active => "active",
        LifecycleState::AtRisk => "at_risk",
        LifecycleState::Lapsed => "lapsed",
        LifecycleState::Churned => "churned",
    }
}

/// A checked segment definition, ready to evaluate.
#[derive(Debug, Clone)]
pub enum Compiled {
    /// RFM selection.
    Rfm {
        /// Accepted names (empty: any).
        names: Vec<String>,
        /// Score ranges (r, f, m).
        ranges: [Option<(u8, u8)>; 3],
    },
    /// Lifecycle selection.
    Lifecycle(Vec<LifecycleState>),
    /// Predicted value selection (minor units).
    Predicted {
        /// Inclusive minimum CLV.
        min_clv: Option<f64>,
        /// Exclusive maximum CLV.
        max_clv: Option<f64>,
        /// Inclusive minimum P(alive).
        min_p_alive: Option<f64>,
        /// Exclusive maximum P(alive).
        max_p_alive: Option<f64>,
        /// Inclusive minimum expected purchases.
        min_expected: Option<f64>,
        /// Top fraction by CLV.
        top_fraction: Option<f64>,
    },
    /// Rule expression.
    Rule(Box<CompiledRule>),
    /// A clustering.
    Cluster(pb::ClusterDefinition),
}

/// The segment kind of a definition case.
#[must_use]
pub fn kind_of(def: &pb::segment::Definition) -> pb::SegmentKind {
    use pb::segment::Definition as D;
    match def {
        D::Rfm(_) => pb::SegmentKind::Rfm,
        D::Cluster(_) => pb::SegmentKind::Cluster,
        D::Rule(_) => pb::SegmentKind::Rule,
        D::Lifecycle(_) => pb::SegmentKind::Lifecycle,
        D::PredictedValue(_) => pb::SegmentKind::PredictedValue,
    }
}

/// Whether `id` is a valid segment id, `[a-z0-9][a-z0-9_-]{0,63}`.
#[must_use]
pub fn is_segment_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

fn score_range(field: &str, r: Option<&pb::ScoreRange>) -> Result<Option<(u8, u8)>, FieldError> {
    let Some(r) = r else { return Ok(None) };
    if !(1..=5).contains(&r.min) || !(r.min..=5).contains(&r.max) {
        return Err(field_error(
            field,
            "bounds must satisfy 1 <= min <= max <= 5",
        ));
    }
    Ok(Some((
        u8::try_from(r.min).unwrap_or(1),
        u8::try_from(r.max).unwrap_or(5),
    )))
}

fn money_bound(
    field: &str,
    m: Option<&pb::Money>,
    config: &ScoringConfig,
) -> Result<Option<f64>, FieldError> {
    let Some(m) = m else { return Ok(None) };
    if m.currency != config.reporting_currency {
        return Err(field_error(
            &format!("{field}.currency"),
            format!(
                "must be the reporting currency {}",
                config.reporting_currency
            ),
        ));
    }
    #[allow(clippy::cast_precision_loss)]
    Ok(Some(m.amount_minor as f64))
}

fn fraction(field: &str, v: Option<f64>, lo_open: bool) -> Result<Option<f64>, FieldError> {
    let Some(v) = v else { return Ok(None) };
    let ok = v.is_finite() && v <= 1.0 && if lo_open { v > 0.0 } else { v >= 0.0 };
    if ok {
        Ok(Some(v))
    } else if lo_open {
        Err(field_error(field, "must be in (0, 1]"))
    } else {
        Err(field_error(field, "must be in [0, 1]"))
    }
}

/// Validates and compiles the definition of `segment` (request field prefix `segment`).
/// `segment_ids` are the ids of live non-RULE segments (for `segment("id")` in rules).
///
/// # Errors
/// A [`FieldError`] naming the first offending field; for rules the message carries the
/// byte offset and line:column of the error.
pub fn compile_definition(
    segment: &pb::Segment,
    config: &ScoringConfig,
    segment_ids: &[String],
) -> Result<Compiled, FieldError> {
    use pb::segment::Definition as D;
    let def = segment
        .definition
        .as_ref()
        .ok_or_else(|| field_error("segment.definition", "exactly one definition is required"))?;
    match def {
        D::Rfm(r) => {
            if r.segment_names.len() > 20 {
                return Err(field_error("segment.rfm.segment_names", "at most 20 names"));
            }
            let known: Vec<&str> = config
                .segment_map
                .rules()
                .iter()
                .map(|r| r.name.as_str())
                .collect();
            for (i, n) in r.segment_names.iter().enumerate() {
                if !known.contains(&n.as_str()) {
                    return Err(field_error(
                        &format!("segment.rfm.segment_names[{i}]"),
                        format!(
                            "`{n}` is not a configured RFM segment; known: {}",
                            known.join(", ")
                        ),
                    ));
                }
            }
            let ranges = [
                score_range("segment.rfm.recency", r.recency.as_ref())?,
                score_range("segment.rfm.frequency", r.frequency.as_ref())?,
                score_range("segment.rfm.monetary", r.monetary.as_ref())?,
            ];
            if r.segment_names.is_empty() && ranges.iter().all(Option::is_none) {
                return Err(field_error(
                    "segment.rfm",
                    "set segment_names or at least one score range",
                ));
            }
            Ok(Compiled::Rfm {
                names: r.segment_names.clone(),
                ranges,
            })
        }
        D::Lifecycle(l) => {
            if l.states.is_empty() || l.states.len() > 5 {
                return Err(field_error("segment.lifecycle.states", "1 to 5 states"));
            }
            let mut states = Vec::new();
            for (i, s) in l.states.iter().enumerate() {
                let state = lifecycle_from_code(i64::from(*s)).ok_or_else(|| {
                    field_error(
                        &format!("segment.lifecycle.states[{i}]"),
                        "must be a known lifecycle state",
                    )
                })?;
                if states.contains(&state) {
                    return Err(field_error(
                        &format!("segment.lifecycle.states[{i}]"),
                        "duplicate state",
                    ));
                }
                states.push(state);
            }
            Ok(Compiled::Lifecycle(states))
        }
        D::PredictedValue(p) => {
            let f = "segment.predicted_value";
            let min_clv = money_bound(&format!("{f}.min_clv"), p.min_clv.as_ref(), config)?;
            let max_clv = money_bound(&format!("{f}.max_clv"), p.max_clv.as_ref(), config)?;
            let min_p_alive = fraction(&format!("{f}.min_p_alive"), p.min_p_alive, false)?;
            let max_p_alive = fraction(&format!("{f}.max_p_alive"), p.max_p_alive, false)?;
            let top_fraction = fraction(&format!("{f}.top_fraction"), p.top_fraction, true)?;
            let min_expected = match p.min_expected_purchases {
                Some(v) if !(v.is_finite() && v >= 0.0) => {
                    return Err(field_error(
                        &format!("{f}.min_expected_purchases"),
                        "must be >= 0",
                    ));
                }
                v => v,
            };
            if let (Some(a), Some(b)) = (min_clv, max_clv)
                && a >= b
            {
                return Err(field_error(&format!("{f}.max_clv"), "must exceed min_clv"));
            }
            if let (Some(a), Some(b)) = (min_p_alive, max_p_alive)
                && a >= b
            {
                return Err(field_error(
                    &format!("{f}.max_p_alive"),
                    "must exceed min_p_alive",
                ));
            }
            if [
                min_clv,
                max_clv,
                min_p_alive,
                max_p_alive,
                min_expected,
                top_fraction,
            ]
            .iter()
            .all(Option::is_none)
            {
                return Err(field_error(f, "set at least one criterion"));
            }
            Ok(Compiled::Predicted {
                min_clv,
                max_clv,
                min_p_alive,
                max_p_alive,
                min_expected,
                top_fraction,
            })
        }
        D::Rule(r) => {
            let field = "segment.rule.expression";
            if r.expression.trim().is_empty() {
                return Err(field_error(field, "required"));
            }
            if r.expression.len() > clientele_rules::MAX_SOURCE_BYTES {
                return Err(field_error(
                    field,
                    format!("at most {} bytes", clientele_rules::MAX_SOURCE_BYTES),
                ));
            }
            let rule = clientele_rules::compile(&r.expression, &rule_schema(segment_ids))
                .map_err(|e| field_error(field, format!("{e} (byte offset {})", e.span.start)))?;
            Ok(Compiled::Rule(Box::new(rule)))
        }
        D::Cluster(c) => {
            let f = "segment.cluster";
            if c.k != 0 && !(2..=50).contains(&c.k) {
                return Err(field_error(
                    &format!("{f}.k"),
                    "must be 2..=50 (0: automatic)",
                ));
            }
            if c.k == 0 {
                let (lo, hi) = cluster_k_range(c);
                if !(2..=50).contains(&lo) || !(lo..=50).contains(&hi) {
                    return Err(field_error(
                        &format!("{f}.k_max"),
                        "automatic k needs 2 <= k_min <= k_max <= 50",
                    ));
                }
            }
            match pb::ClusteringMethod::try_from(c.method) {
                Ok(pb::ClusteringMethod::Unspecified) | Err(_) => {
                    return Err(field_error(
                        &format!("{f}.method"),
                        "must be a known method",
                    ));
                }
                Ok(_) => {}
            }
            if c.features.len() < 2 || c.features.len() > 10 {
                return Err(field_error(&format!("{f}.features"), "2 to 10 features"));
            }
            let mut seen = BTreeSet::new();
            for (i, x) in c.features.iter().enumerate() {
                let fp = format!("{f}.features[{i}]");
                match pb::ClusterFeature::try_from(*x) {
                    Ok(pb::ClusterFeature::Unspecified) | Err(_) => {
                        return Err(field_error(&fp, "must be a known feature"));
                    }
                    Ok(_) if !seen.insert(*x) => return Err(field_error(&fp, "duplicate feature")),
                    Ok(_) => {}
                }
            }
            for (i, x) in c.log1p_features.iter().enumerate() {
                if !c.features.contains(x) {
                    return Err(field_error(
                        &format!("{f}.log1p_features[{i}]"),
                        "must also be in features",
                    ));
                }
            }
            if pb::FeatureScaling::try_from(c.scaling).is_err() {
                return Err(field_error(
                    &format!("{f}.scaling"),
                    "must be a known scaling",
                ));
            }
            if !(0..=1000).contains(&c.max_iterations) {
                return Err(field_error(
                    &format!("{f}.max_iterations"),
                    "must be 1..=1000 (0: 300)",
                ));
            }
            if !(0..=50).contains(&c.n_init) {
                return Err(field_error(
                    &format!("{f}.n_init"),
                    "must be 1..=50 (0: 10)",
                ));
            }
            Ok(Compiled::Cluster(c.clone()))
        }
    }
}

fn cluster_k_range(c: &pb::ClusterDefinition) -> (i32, i32) {
    (
        if c.k_min == 0 { 2 } else { c.k_min },
        if c.k_max == 0 { 8 } else { c.k_max },
    )
}

/// Traits and consents of one profile, as read from ProfileService.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileFacts {
    /// Traits by name.
    pub traits: HashMap<String, Value>,
    /// Purposes with consent GRANTED.
    pub consents: BTreeSet<String>,
}

impl ProfileFacts {
    /// Extracts traits and granted consents from a profile.
    #[must_use]
    pub fn from_profile(p: &pb::Profile) -> Self {
        use pb::value::Kind;
        let traits = p
            .traits
            .iter()
            .filter_map(|(k, v)| {
                let value = match v.kind.as_ref()? {
                    Kind::StringValue(s) => Value::String(s.clone()),
                    #[allow(clippy::cast_precision_loss)]
                    Kind::IntValue(i) => Value::Number(*i as f64),
                    Kind::DoubleValue(d) => Value::Number(*d),
                    Kind::BoolValue(b) => Value::Bool(*b),
                    #[allow(clippy::cast_precision_loss)]
                    Kind::TimestampValue(t) => Value::Number(t.seconds as f64),
                };
                Some((k.clone(), value))
            })
            .collect();
        let consents = p
            .consents
            .iter()
            .filter(|c| c.status == pb::ConsentStatus::Granted as i32)
            .filter_map(|c| {
                let name = match pb::ConsentPurpose::try_from(c.purpose).ok()? {
                    pb::ConsentPurpose::Email => "email",
                    pb::ConsentPurpose::Sms => "sms",
                    pb::ConsentPurpose::Push => "push",
                    pb::ConsentPurpose::Personalisation => "personalisation",
                    pb::ConsentPurpose::Analytics => "analytics",
                    pb::ConsentPurpose::Unspecified => return None,
                };
                Some(name.to_owned())
            })
            .collect();
        Self { traits, consents }
    }
}

/// The rule-evaluation view of one scored profile.
#[derive(Debug)]
pub struct RuleView<'a> {
    /// Scores.
    pub scored: &'a Scored,
    /// Traits and consent.
    pub facts: Option<&'a ProfileFacts>,
    /// Non-RULE segments the profile is in.
    pub segments: &'a BTreeSet<String>,
}

impl EvalContext for RuleView<'_> {
    fn feature(&self, name: &str) -> Option<Value> {
        let s = self.scored;
        let w = &s.window;
        let num = |v: f64| Some(Value::Number(v));
        #[allow(clippy::cast_precision_loss)]
        match name {
            "recency_days" => w.recency_days.map(Value::Number),
            "orders" | "frequency" => num(f64::from(w.frequency)),
            "monetary_minor" => num(w.monetary_total_minor as f64),
            "average_order_value_minor" => w.average_order_value_minor.map(Value::Number),
            "tenure_days" => s.all.tenure_days.map(Value::Number),
            "days_since_first_order" => s.all.days_since_first_order.map(Value::Number),
            "mean_inter_purchase_days" => s.all.mean_interpurchase_days.map(Value::Number),
            "refund_rate" => w.refund_rate.map(Value::Number),
            "discount_share" => num(s.discount_share),
            "engagement_90d" => num(s.engagement_90d),
            "engagement_score" => num(s.all.engagement_score),
            "cart_abandonment_rate" => s.all.cart_abandonment_rate.map(Value::Number),
            "distinct_categories" => num(w.category_shares.len() as f64),
            "lifetime_orders" => num(f64::from(s.all.frequency)),
            "r_score" => s.rfm.as_ref().map(|(r, _)| Value::Number(f64::from(r.r))),
            "f_score" => s.rfm.as_ref().map(|(r, _)| Value::Number(f64::from(r.f))),
            "m_score" => s.rfm.as_ref().map(|(r, _)| Value::Number(f64::from(r.m))),
            "rfm_segment" => s.rfm.as_ref().map(|(_, n)| Value::String(n.clone())),
            "lifecycle" => s.lifecycle.map(|l| Value::String(lifecycle_name(l).into())),
            "clv_minor" => s.predicted.map(|p| Value::Number(p.clv)),
            "p_alive" => s.predicted.map(|p| Value::Number(p.p_alive)),
            "expected_purchases" => s.predicted.map(|p| Value::Number(p.expected_purchases)),
            _ => None,
        }
    }

    fn category_share(&self, category: &str) -> Option<f64> {
        let w = &self.scored.window;
        if w.frequency == 0 {
            return None;
        }
        Some(w.category_shares.get(category).copied().unwrap_or(0.0))
    }

    fn trait_value(&self, key: &str) -> Option<Value> {
        self.facts?.traits.get(key).cloned()
    }

    fn consent(&self, purpose: &str) -> bool {
        self.facts.is_some_and(|f| f.consents.contains(purpose))
    }

    fn in_segment(&self, segment: &str) -> bool {
        self.segments.contains(segment)
    }
}

/// Whether a scored profile is in a non-CLUSTER, non-RULE segment. `clv_threshold` is the
/// run's top-fraction threshold for this segment.
#[must_use]
pub fn is_member(compiled: &Compiled, s: &Scored, clv_threshold: Option<f64>) -> bool {
    match compiled {
        Compiled::Rfm { names, ranges } => {
            let Some((score, name)) = &s.rfm else {
                return false;
            };
            let within =
                |r: Option<(u8, u8)>, v: u8| r.is_none_or(|(lo, hi)| (lo..=hi).contains(&v));
            (names.is_empty() || names.contains(name))
                && within(ranges[0], score.r)
                && within(ranges[1], score.f)
                && within(ranges[2], score.m)
        }
        Compiled::Lifecycle(states) => s.lifecycle.is_some_and(|l| states.contains(&l)),
        Compiled::Predicted {
            min_clv,
            max_clv,
            min_p_alive,
            max_p_alive,
            min_expected,
            top_fraction,
        } => {
            let Some(p) = s.predicted else { return false };
            min_clv.is_none_or(|v| p.clv >= v)
                && max_clv.is_none_or(|v| p.clv < v)
                && min_p_alive.is_none_or(|v| p.p_alive >= v)
                && max_p_alive.is_none_or(|v| p.p_alive < v)
                && min_expected.is_none_or(|v| p.expected_purchases >= v)
                && (top_fraction.is_none() || clv_threshold.is_some_and(|t| p.clv >= t))
        }
        Compiled::Rule(_) | Compiled::Cluster(_) => false,
    }
}

/// The minimum CLV of the top `fraction` of predicted customers (`None` without predictions).
#[must_use]
pub fn top_fraction_threshold(scored: &[Scored], fraction: f64) -> Option<f64> {
    let mut clvs: Vec<f64> = scored
        .iter()
        .filter_map(|s| s.predicted.map(|p| p.clv))
        .collect();
    if clvs.is_empty() {
        return None;
    }
    clvs.sort_by(|a, b| b.total_cmp(a));
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let n = ((clvs.len() as f64 * fraction).ceil() as usize).clamp(1, clvs.len());
    Some(clvs[n - 1])
}

// ---------------------------------------------------------------------------------------------
// Clustering
// ---------------------------------------------------------------------------------------------

/// The value of a cluster feature for a scored profile (original units).
#[must_use]
pub fn cluster_feature(s: &Scored, feature: i32) -> f64 {
    use pb::ClusterFeature as F;
    let w = &s.window;
    #[allow(clippy::cast_precision_loss)]
    match F::try_from(feature).unwrap_or(F::Unspecified) {
        F::RecencyDays => w.recency_days.unwrap_or(0.0),
        F::Frequency => f64::from(w.frequency),
        F::Monetary => w.monetary_total_minor.max(0) as f64,
        F::AverageOrderValue => w.average_order_value_minor.unwrap_or(0.0).max(0.0),
        F::TenureDays => s.all.days_since_first_order.unwrap_or(0.0),
        F::MeanInterPurchaseDays => w.mean_interpurchase_days.unwrap_or(0.0),
        F::DistinctCategories => w.category_shares.len() as f64,
        F::RefundRate => w.refund_rate.unwrap_or(0.0),
        F::DiscountShare => s.discount_share,
        F::Engagement90d => s.engagement_90d,
        F::Unspecified => 0.0,
    }
}

/// Per-column preprocessing: optional `ln(1 + max(x, 0))`, then `(x - offset) / scale`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scaler {
    /// Whether each column is log-transformed first.
    pub log1p: Vec<bool>,
    /// Subtracted after the log (mean or minimum).
    pub offset: Vec<f64>,
    /// Divided by (standard deviation or range; 1 when zero).
    pub scale: Vec<f64>,
}

impl Scaler {
    fn fit(rows: &[Vec<f64>], log1p: Vec<bool>, min_max: bool) -> Self {
        let cols = log1p.len();
        let mut offset = vec![0.0; cols];
        let mut scale = vec![1.0; cols];
        #[allow(clippy::cast_precision_loss)]
        let n = rows.len().max(1) as f64;
        for j in 0..cols {
            let col = rows.iter().map(|r| pre(r[j], log1p[j]));
            if min_max {
                let (lo, hi) = col.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                    (lo.min(v), hi.max(v))
                });
                offset[j] = if lo.is_finite() { lo } else { 0.0 };
                scale[j] = if hi > lo { hi - lo } else { 1.0 };
            } else {
                let mean = col.clone().sum::<f64>() / n;
                let var = col.map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
                offset[j] = mean;
                scale[j] = if var > 0.0 { var.sqrt() } else { 1.0 };
            }
        }
        Self {
            log1p,
            offset,
            scale,
        }
    }

    /// Scales one row of original values.
    #[must_use]
    pub fn transform(&self, row: &[f64]) -> Vec<f64> {
        row.iter()
            .enumerate()
            .map(|(j, v)| (pre(*v, self.log1p[j]) - self.offset[j]) / self.scale[j])
            .collect()
    }

    /// Maps a scaled point back to original units.
    #[must_use]
    pub fn inverse(&self, row: &[f64]) -> Vec<f64> {
        row.iter()
            .enumerate()
            .map(|(j, z)| {
                let v = z * self.scale[j] + self.offset[j];
                if self.log1p[j] { v.exp_m1() } else { v }
            })
            .collect()
    }
}

fn pre(v: f64, log: bool) -> f64 {
    if log { v.max(0.0).ln_1p() } else { v }
}

/// Result of clustering one CLUSTER segment.
#[derive(Debug, Clone)]
pub struct ClusterResult {
    /// The model to assign new profiles.
    pub model: ClusterModel,
    /// Cluster of each input row.
    pub labels: Vec<usize>,
    /// Distance of each row to its centroid (scaled space).
    pub distances: Vec<f64>,
    /// The output reported by the run.
    pub output: pb::ClusterOutput,
}

fn squared_distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Nearest centroid of a scaled point and its distance.
#[must_use]
pub fn nearest(centroids: &[Vec<f64>], point: &[f64]) -> (usize, f64) {
    let mut best = (0, f64::INFINITY);
    for (i, c) in centroids.iter().enumerate() {
        let d = squared_distance(c, point);
        if d < best.1 {
            best = (i, d);
        }
    }
    (best.0, best.1.sqrt())
}

/// Clusters `scored` (customers with orders) for one CLUSTER definition.
///
/// # Errors
/// Clustering errors (too few customers for k, numerical failure).
pub fn cluster_segment(
    segment_id: &str,
    version: i64,
    def: &pb::ClusterDefinition,
    scored: &[&Scored],
    previous: Option<&ClusterModel>,
) -> Result<ClusterResult, ClusteringError> {
    let log1p: Vec<bool> = def
        .features
        .iter()
        .map(|f| def.log1p_features.contains(f))
        .collect();
    let raw: Vec<Vec<f64>> = scored
        .iter()
        .map(|s| {
            def.features
                .iter()
                .map(|f| cluster_feature(s, *f))
                .collect()
        })
        .collect();
    let min_max = def.scaling == pb::FeatureScaling::MinMax as i32;
    let scaler = Scaler::fit(&raw, log1p, min_max);
    let cols = def.features.len();
    let flat: Vec<f64> = raw.iter().flat_map(|r| scaler.transform(r)).collect();
    let data = Matrix::new(flat, cols)?;
    let kconfig = KMeansConfig {
        k: usize::try_from(def.k).unwrap_or(2),
        n_init: if def.n_init == 0 {
            10
        } else {
            usize::try_from(def.n_init).unwrap_or(10)
        },
        max_iter: if def.max_iterations == 0 {
            300
        } else {
            usize::try_from(def.max_iterations).unwrap_or(300)
        },
        seed: def.seed,
        ..KMeansConfig::default()
    };
    let sample = SILHOUETTE_SAMPLE.min(data.rows());
    let kmeans = if def.k == 0 {
        let (lo, hi) = cluster_k_range(def);
        let hi = usize::try_from(hi)
            .unwrap_or(8)
            .min(data.rows().saturating_sub(1));
        select_k_by_silhouette(
            &data,
            usize::try_from(lo).unwrap_or(2),
            hi,
            &kconfig,
            sample,
        )?
        .0
    } else {
        KMeans::fit(&data, &kconfig)?
    };
    let k = kmeans.k();
    let gmm = def.method == pb::ClusteringMethod::GaussianMixture as i32;
    let (labels, centroids, iterations, converged) = if gmm {
        let g = GaussianMixture::fit(
            &data,
            &GaussianMixtureConfig {
                k,
                seed: def.seed,
                ..GaussianMixtureConfig::default()
            },
        )?;
        let labels: Vec<usize> = (0..data.rows()).map(|i| g.predict(data.row(i))).collect();
        let means: Vec<Vec<f64>> = (0..k).map(|i| g.means().row(i).to_vec()).collect();
        (labels, means, g.n_iter(), g.converged())
    } else {
        let centroids: Vec<Vec<f64>> = (0..k).map(|i| kmeans.centroids().row(i).to_vec()).collect();
        (
            kmeans.labels().to_vec(),
            centroids,
            kmeans.n_iter(),
            kmeans.converged(),
        )
    };
    // Keep indexes stable across runs: match the centroids to the previous run's of the same
    // definition version and k (its centroids mapped through the new scaling).
    let (labels, centroids) = match previous
        .filter(|p| p.version == version && p.centroids.len() == k)
        .and_then(|p| {
            let mapped: Vec<Vec<f64>> = p
                .centroids
                .iter()
                .map(|c| scaler.transform(&p.scaler.inverse(c)))
                .collect();
            crate::clustering::match_centroids(&centroids, &mapped)
        }) {
        Some(to) => {
            let mut reordered = centroids.clone();
            for (i, c) in centroids.into_iter().enumerate() {
                reordered[to[i]] = c;
            }
            (labels.into_iter().map(|l| to[l]).collect(), reordered)
        }
        None => (labels, centroids),
    };
    let silhouette = silhouette_score_sampled(&data, &labels, sample, def.seed).unwrap_or(0.0);
    let mut aris = Vec::new();
    for r in 1..=2u64 {
        let rerun = KMeans::fit(
            &data,
            &KMeansConfig {
                k,
                seed: def.seed.wrapping_add(r),
                ..kconfig.clone()
            },
        )?;
        aris.push(adjusted_rand_index(kmeans.labels(), rerun.labels())?);
    }
    let distances: Vec<f64> = (0..data.rows())
        .map(|i| squared_distance(data.row(i), &centroids[labels[i]]).sqrt())
        .collect();
    let inertia: f64 = distances.iter().map(|d| d * d).sum();
    let mut sizes = vec![0i64; k];
    for l in &labels {
        sizes[*l] += 1;
    }
    let output = pb::ClusterOutput {
        segment_id: segment_id.to_owned(),
        segment_version: version,
        customers: i64::try_from(data.rows()).unwrap_or(i64::MAX),
        iterations: i32::try_from(iterations).unwrap_or(i32::MAX),
        converged,
        inertia,
        silhouette,
        silhouette_sample_size: i64::try_from(sample).unwrap_or(0),
        clusters: (0..k)
            .map(|i| pb::Cluster {
                index: i32::try_from(i).unwrap_or(0),
                size: sizes[i],
                centroid_scaled: centroids[i].clone(),
                centroid: scaler.inverse(&centroids[i]),
            })
            .collect(),
        features: def.features.clone(),
        #[allow(clippy::cast_precision_loss)]
        stability_ari: aris.iter().sum::<f64>() / aris.len().max(1) as f64,
        k: i32::try_from(k).unwrap_or(0),
    };
    Ok(ClusterResult {
        model: ClusterModel {
            version,
            scaler,
            centroids,
        },
        labels,
        distances,
        output,
    })
}

/// Assigns one profile to a fitted clustering: (cluster, distance).
#[must_use]
pub fn assign_cluster(
    model: &ClusterModel,
    def: &pb::ClusterDefinition,
    s: &Scored,
) -> (usize, f64) {
    let raw: Vec<f64> = def
        .features
        .iter()
        .map(|f| cluster_feature(s, *f))
        .collect();
    nearest(&model.centroids, &model.scaler.transform(&raw))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000_000;
    const NOW: i64 = 1_700_000_000_000_000;

    fn config() -> ScoringConfig {
        ScoringConfig::from_settings(&clientele_runtime::settings::SegmentationSettings::default())
            .unwrap()
    }

    fn profile(id: &str, orders: &[(f64, i64)]) -> ProfileData {
        ProfileData {
            profile_id: id.into(),
            orders: orders
                .iter()
                .map(|(days, amount)| StoredOrder {
                    #[allow(clippy::cast_possible_truncation)]
                    placed_at: NOW - (*days * DAY as f64) as i64,
                    amount_minor: *amount,
                    discount_minor: 0,
                    refunded_minor: 0,
                    fully_refunded: false,
                    lines: vec![],
                })
                .collect(),
            engagement: BTreeMap::new(),
        }
    }

    fn base() -> Vec<ProfileData> {
        let mut out = Vec::new();
        for c in 0..8 {
            let amounts = [18_000, 22_500, 19_000, 24_000, 21_000, 17_500];
            let orders: Vec<(f64, i64)> = [1.0, 20.0, 40.0, 60.0, 90.0, 120.0]
                .iter()
                .zip(amounts)
                .map(|(d, a)| (d + f64::from(c), a + i64::from(c) * 300))
                .collect();
            out.push(profile(&format!("champ{c}"), &orders));
        }
        for c in 0..10 {
            out.push(profile(
                &format!("mid{c}"),
                &[
                    (30.0 + f64::from(c) * 9.0, 4_000),
                    (80.0 + f64::from(c) * 7.0, 6_500),
                ],
            ));
            out.push(profile(
                &format!("one{c}"),
                &[(5.0 + f64::from(c) * 40.0, 2_000)],
            ));
        }
        out
    }

    #[test]
    fn a_small_base_gets_rfm_scores_clv_fits_and_lifecycle_states() {
        let cfg = config();
        let mut scored: Vec<Scored> = base().iter().map(|d| features_of(d, NOW, &cfg)).collect();
        let (model, converged) = score_base(&mut scored, &cfg, None);
        assert!(converged, "both CLV fits converge");
        assert!(model.cut_points.is_some());
        let champ = &scored[0];
        assert_eq!(champ.rfm.as_ref().unwrap().1, "Champions");
        assert_eq!(champ.lifecycle, Some(LifecycleState::Active));
        let p = champ.predicted.unwrap();
        assert!(p.clv > 0.0 && (0.0..=1.0).contains(&p.p_alive));
        // Real-time scoring against the batch's cut points reproduces the batch score.
        let mut again = features_of(&base()[0], NOW, &cfg);
        score_one(&mut again, &model, &cfg);
        assert_eq!(again.rfm, champ.rfm);
    }

    #[test]
    fn cluster_indexes_follow_the_previous_runs_centroids() {
        let cfg = config();
        let scored: Vec<Scored> = base().iter().map(|d| features_of(d, NOW, &cfg)).collect();
        let refs: Vec<&Scored> = scored.iter().collect();
        let def = pb::ClusterDefinition {
            k: 3,
            method: pb::ClusteringMethod::Kmeans as i32,
            features: vec![1, 2, 3],
            scaling: pb::FeatureScaling::Standard as i32,
            log1p_features: vec![2, 3],
            seed: 5,
            n_init: 3,
            ..Default::default()
        };
        let first = cluster_segment("c", 1, &def, &refs, None).unwrap();
        // A previous run that found the same groups under other numbers: index i there is
        // index (i + 1) % 3 here.
        let mut previous = first.model.clone();
        previous.centroids.rotate_right(1);
        let second = cluster_segment("c", 1, &def, &refs, Some(&previous)).unwrap();
        for (a, b) in first.labels.iter().zip(&second.labels) {
            assert_eq!(*b, (a + 1) % 3);
        }
        assert_eq!(second.model.centroids, previous.centroids);
        for (i, c) in second.output.clusters.iter().enumerate() {
            assert_eq!(c.index, i32::try_from(i).unwrap());
            assert_eq!(c.size, first.output.clusters[(i + 2) % 3].size);
        }
        // Another definition version is not matched: its indexes mean something new.
        let other = cluster_segment("c", 2, &def, &refs, Some(&previous)).unwrap();
        assert_eq!(other.labels, first.labels);
    }

    #[test]
    fn a_configured_rfm_map_replaces_the_standard_one_and_must_cover_every_cell() {
        use clientele_runtime::settings::{RfmSegmentSetting, SegmentationSettings};
        let rule = |name: &str, r: [u8; 2], fm: [u8; 2]| RfmSegmentSetting {
            name: name.into(),
            recency: r,
            frequency_monetary: fm,
        };
        let mut settings = SegmentationSettings {
            rfm_segments: vec![
                rule("VIP", [4, 5], [4, 5]),
                rule("Everyone else", [1, 5], [1, 5]),
            ],
            ..SegmentationSettings::default()
        };
        let cfg = ScoringConfig::from_settings(&settings).unwrap();
        let mut scored: Vec<Scored> = base().iter().map(|d| features_of(d, NOW, &cfg)).collect();
        score_base(&mut scored, &cfg, None);
        assert_eq!(scored[0].rfm.as_ref().unwrap().1, "VIP");
        let names: BTreeSet<&str> = scored
            .iter()
            .filter_map(|s| s.rfm.as_ref().map(|(_, n)| n.as_str()))
            .collect();
        assert_eq!(names, BTreeSet::from(["Everyone else", "VIP"]));
        let proto = cfg.to_proto();
        assert_eq!(proto.rfm_name_rules.len(), 2);
        assert_eq!(
            proto.rfm_name_rules[0].segment,
            pb::RfmSegment::Other as i32
        );

        settings.rfm_segments.pop();
        let e = ScoringConfig::from_settings(&settings).unwrap_err();
        assert!(e.contains("does not cover R1 FM1"), "{e}");
        settings.rfm_segments = vec![rule("Backwards", [5, 1], [1, 5])];
        let e = ScoringConfig::from_settings(&settings).unwrap_err();
        assert!(e.contains("`Backwards`"), "{e}");
        settings.rfm_segments = vec![rule("", [1, 5], [1, 5])];
        let e = ScoringConfig::from_settings(&settings).unwrap_err();
        assert!(e.contains("rfm_segments[0].name"), "{e}");
    }

    #[test]
    fn fully_refunded_orders_do_not_count() {
        let cfg = config();
        let mut d = profile("p", &[(1.0, 1_000), (2.0, 3_000)]);
        d.orders[0].fully_refunded = true;
        let s = features_of(&d, NOW, &cfg);
        assert_eq!(s.window.frequency, 1);
        assert_eq!(s.window.monetary_total_minor, 3_000);
    }

    #[test]
    fn rules_see_features_scores_traits_and_segments() {
        let cfg = config();
        let mut scored: Vec<Scored> = base().iter().map(|d| features_of(d, NOW, &cfg)).collect();
        score_base(&mut scored, &cfg, None);
        let rule = clientele_rules::compile(
            r#"orders >= 5 and rfm_segment == "Champions" and trait("vip") == true and segment("big")"#,
            &rule_schema(&["big".into()]),
        )
        .unwrap();
        let facts = ProfileFacts {
            traits: HashMap::from([("vip".to_owned(), Value::Bool(true))]),
            consents: BTreeSet::new(),
        };
        let segments = BTreeSet::from(["big".to_owned()]);
        let view = RuleView {
            scored: &scored[0],
            facts: Some(&facts),
            segments: &segments,
        };
        assert!(rule.matches(&view));
        let none = BTreeSet::new();
        let view = RuleView {
            scored: &scored[0],
            facts: Some(&facts),
            segments: &none,
        };
        assert!(!rule.matches(&view));
    }

    #[test]
    fn rule_errors_name_the_expression_field_with_line_and_column() {
        let seg = pb::Segment {
            segment_id: "x".into(),
            display_name: "x".into(),
            definition: Some(pb::segment::Definition::Rule(pb::RuleDefinition {
                expression: "orders > 1 and\nrecncy_days < 3".into(),
            })),
            ..Default::default()
        };
        let e = compile_definition(&seg, &config(), &[]).unwrap_err();
        assert_eq!(e.field, "segment.rule.expression");
        assert!(e.message.contains("2:1"), "{}", e.message);
        assert!(e.message.contains("byte offset 15"), "{}", e.message);
    }

    #[test]
    fn scaler_round_trips_log_and_standard_scaling() {
        let rows = vec![vec![0.0, 10.0], vec![9.0, 30.0], vec![99.0, 20.0]];
        let s = Scaler::fit(&rows, vec![true, false], false);
        for r in &rows {
            let back = s.inverse(&s.transform(r));
            for (a, b) in back.iter().zip(r) {
                assert!((a - b).abs() < 1e-9);
            }
        }
    }
}
