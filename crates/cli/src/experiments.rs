//! `clientele experiments create|start|stop|results`: define an A/B test, run it, stop it
//! (optionally releasing the winner), and read its statistics as a table.

use anyhow::{Context, bail};
use clientele_proto::v1 as pb;
use clientele_proto::v1::experiment_service_client::ExperimentServiceClient;

use crate::client::{ConnectionOptions, OutputFormat, authed_channel, emit};

/// Experiment subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ExperimentsCommand {
    /// Create a draft experiment.
    Create(Box<CreateArgs>),
    /// Start a draft experiment (assignment begins).
    Start {
        /// Experiment key.
        key: String,
    },
    /// Stop a running experiment; `--release` sends every unit to one variant from now on.
    Stop {
        /// Experiment key.
        key: String,
        /// Variant key to release to everyone.
        #[arg(long)]
        release: Option<String>,
        /// Why it was stopped.
        #[arg(long, default_value = "stopped from the CLI")]
        reason: String,
    },
    /// Show per-variant results: lifts with 95% intervals, p-values, sample-ratio check.
    Results {
        /// Experiment key.
        key: String,
    },
    /// Assign one unit (a profile id for the default hash attribute) and print its variant;
    /// `--expose` also logs its first exposure, as a client showing the variant would.
    Assign {
        /// Experiment key.
        key: String,
        /// The unit id (value of the experiment's hash attribute).
        unit_id: String,
        /// Log the exposure (only the first one per unit counts).
        #[arg(long)]
        expose: bool,
    },
}

/// Arguments of `experiments create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Experiment key (`[a-z0-9][a-z0-9_.-]*`, at most 64 bytes); also the hashing seed.
    pub key: String,
    /// What the experiment is expected to show.
    #[arg(long, default_value = "")]
    pub hypothesis: String,
    /// A variant as `key=weight` (weights sum to 1); the first is the control. Repeat.
    #[arg(long = "variant", required = true, num_args = 1, value_parser = parse_variant)]
    pub variants: Vec<(String, f64)>,
    /// Share of eligible units in the experiment, 0 to 1.
    #[arg(long, default_value_t = 1.0)]
    pub coverage: f64,
    /// Primary metric: `key:binary` or `key:continuous:CURRENCY` (e.g. `revenue:continuous:USD`),
    /// recorded with RecordConversion; append `@EVENT` to derive it from ingested events instead:
    /// `@order_completed` (purchases after exposure; a continuous metric sums order totals net
    /// of refunds), another kind in lower case (`@cart_abandoned`) or `@custom:NAME`.
    #[arg(long, value_parser = parse_metric)]
    pub metric: pb::Metric,
    /// A guardrail metric, same syntax as `--metric` (repeatable).
    #[arg(long = "guardrail", value_parser = parse_metric)]
    pub guardrails: Vec<pb::Metric>,
    /// Days after exposure in which a conversion counts.
    #[arg(long, default_value_t = 14)]
    pub conversion_window_days: i64,
    /// Only units in this segment (repeatable).
    #[arg(long = "segment")]
    pub segments: Vec<String>,
}

/// `key=weight` → a variant key and its weight.
pub fn parse_variant(s: &str) -> Result<(String, f64), String> {
    let (k, w) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected key=weight"))?;
    let w: f64 = w.parse().map_err(|_| format!("`{w}` is not a number"))?;
    if k.is_empty() || !(0.0..=1.0).contains(&w) {
        return Err(format!(
            "`{s}`: a key and a weight between 0 and 1 are needed"
        ));
    }
    Ok((k.to_string(), w))
}

/// `order_completed`, `cart_abandoned`, … or `custom:NAME` → an event metric source.
pub fn parse_event_source(s: &str) -> Result<pb::EventMetricSource, String> {
    if let Some(name) = s.strip_prefix("custom:") {
        if name.is_empty() {
            return Err("`custom:` needs the custom event name".into());
        }
        return Ok(pb::EventMetricSource {
            kind: pb::EventKind::Custom as i32,
            custom_event_name: name.to_string(),
        });
    }
    match pb::EventKind::from_str_name(&format!("EVENT_KIND_{}", s.to_ascii_uppercase())) {
        Some(k) if k != pb::EventKind::Unspecified && k != pb::EventKind::Custom => {
            Ok(pb::EventMetricSource {
                kind: k as i32,
                custom_event_name: String::new(),
            })
        }
        _ => Err(format!(
            "`{s}` is not an event kind (e.g. order_completed, cart_abandoned, custom:NAME)"
        )),
    }
}

/// `key:binary` or `key:continuous:CUR` → a recorded metric (conversions are recorded with
/// `RecordConversion`); with `@EVENT` appended, a metric derived from ingested events.
pub fn parse_metric(s: &str) -> Result<pb::Metric, String> {
    let (s, event) = match s.split_once('@') {
        Some((m, e)) => (m, Some(parse_event_source(e)?)),
        None => (s, None),
    };
    let parts: Vec<&str> = s.split(':').collect();
    let (key, kind, currency) = match parts.as_slice() {
        [k, "binary"] => (*k, pb::MetricType::Binary, ""),
        [k, "continuous", c] => (*k, pb::MetricType::Continuous, *c),
        _ => {
            return Err(format!(
                "`{s}`: expected key:binary or key:continuous:CURRENCY"
            ));
        }
    };
    Ok(pb::Metric {
        key: key.to_string(),
        name: key.to_string(),
        r#type: kind as i32,
        goal: pb::MetricGoal::Increase as i32,
        source: Some(match event {
            Some(e) => pb::metric::Source::Event(e),
            None => pb::metric::Source::Recorded(pb::RecordedMetricSource {}),
        }),
        currency: currency.to_string(),
        ..Default::default()
    })
}

fn status_name(code: i32) -> &'static str {
    match pb::ExperimentStatus::try_from(code) {
        Ok(pb::ExperimentStatus::Draft) => "draft",
        Ok(pb::ExperimentStatus::Running) => "running",
        Ok(pb::ExperimentStatus::Stopped) => "stopped",
        _ => "unknown",
    }
}

fn print_experiment(e: &pb::Experiment, output: OutputFormat) -> anyhow::Result<()> {
    let text = match output {
        OutputFormat::Json => serde_json::json!({
            "key": e.key,
            "status": status_name(e.status),
            "version": e.version,
            "variants": e.variants.iter().map(|v| serde_json::json!({"key": v.key, "weight": v.weight})).collect::<Vec<_>>(),
            "coverage": e.coverage,
        })
        .to_string(),
        OutputFormat::Human => {
            let variants: Vec<String> = e
                .variants
                .iter()
                .map(|v| format!("{}={}", v.key, v.weight))
                .collect();
            format!(
                "experiment {}: {} (version {}), variants {}, coverage {}",
                e.key,
                status_name(e.status),
                e.version,
                variants.join(", "),
                e.coverage
            )
        }
    };
    emit(&format!("{text}\n"))
}

/// Runs one experiments subcommand.
pub async fn run(command: ExperimentsCommand, options: &ConnectionOptions) -> anyhow::Result<()> {
    let mut client = ExperimentServiceClient::new(authed_channel(options)?);
    match command {
        ExperimentsCommand::Create(a) => {
            let window = prost_types::Duration {
                seconds: a.conversion_window_days.saturating_mul(86_400),
                nanos: 0,
            };
            let experiment = pb::Experiment {
                key: a.key.clone(),
                display_name: a.key.clone(),
                hypothesis: a.hypothesis,
                variants: a
                    .variants
                    .iter()
                    .map(|(k, w)| pb::Variant {
                        key: k.clone(),
                        name: k.clone(),
                        weight: *w,
                    })
                    .collect(),
                coverage: a.coverage,
                hash_version: 2,
                holdout: pb::HoldoutParticipation::Exclude as i32,
                primary_metric: Some(pb::Metric {
                    conversion_window: Some(window),
                    ..a.metric
                }),
                guardrail_metrics: a
                    .guardrails
                    .into_iter()
                    .map(|m| pb::Metric {
                        conversion_window: Some(window),
                        ..m
                    })
                    .collect(),
                targeting: (!a.segments.is_empty()).then(|| pb::Targeting {
                    segments: a
                        .segments
                        .iter()
                        .map(|s| pb::SegmentRef {
                            segment_id: s.clone(),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let r = client
                .create_experiment(pb::CreateExperimentRequest {
                    experiment: Some(experiment),
                })
                .await?
                .into_inner();
            print_experiment(
                &r.experiment.context("server returned no experiment")?,
                options.output,
            )
        }
        ExperimentsCommand::Start { key } => {
            let r = client
                .start_experiment(pb::StartExperimentRequest { key })
                .await?
                .into_inner();
            print_experiment(
                &r.experiment.context("server returned no experiment")?,
                options.output,
            )
        }
        ExperimentsCommand::Stop {
            key,
            release,
            reason,
        } => {
            let release_variant_index = match release {
                None => None,
                Some(v) => {
                    let e = client
                        .get_experiment(pb::GetExperimentRequest { key: key.clone() })
                        .await?
                        .into_inner()
                        .experiment
                        .context("server returned no experiment")?;
                    let Some(i) = e.variants.iter().position(|x| x.key == v) else {
                        bail!("experiment {key} has no variant `{v}`");
                    };
                    Some(i32::try_from(i)?)
                }
            };
            let r = client
                .stop_experiment(pb::StopExperimentRequest {
                    key,
                    release_variant_index,
                    reason,
                })
                .await?
                .into_inner();
            print_experiment(
                &r.experiment.context("server returned no experiment")?,
                options.output,
            )
        }
        ExperimentsCommand::Assign {
            key,
            unit_id,
            expose,
        } => {
            let a = client
                .assign(pb::AssignRequest {
                    experiment_key: key.clone(),
                    unit_id: unit_id.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .assignment
                .context("server returned no assignment")?;
            let reason = pb::AssignmentReason::try_from(a.reason)
                .map_or("UNKNOWN", |r| r.as_str_name())
                .trim_start_matches("ASSIGNMENT_REASON_")
                .to_ascii_lowercase();
            let mut first_exposure = None;
            if expose && a.in_experiment {
                let r = client
                    .log_exposure(pb::LogExposureRequest {
                        experiment_key: key,
                        unit_id: unit_id.clone(),
                        variant_index: a.variant_index,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                first_exposure = Some(r.first_exposure);
            }
            let text = match options.output {
                OutputFormat::Json => serde_json::json!({
                    "unit_id": unit_id,
                    "variant_index": a.variant_index,
                    "variant_key": a.variant_key,
                    "in_experiment": a.in_experiment,
                    "reason": reason,
                    "first_exposure": first_exposure,
                })
                .to_string(),
                OutputFormat::Human => {
                    let exposure = match first_exposure {
                        Some(true) => ", exposure logged",
                        Some(false) => ", exposed before",
                        None => "",
                    };
                    format!(
                        "{unit_id}: variant {} {} ({reason}){exposure}",
                        a.variant_index, a.variant_key
                    )
                }
            };
            emit(&format!("{text}\n"))
        }
        ExperimentsCommand::Results { key } => {
            let r = client
                .get_results(pb::GetResultsRequest {
                    experiment_key: key,
                    metric_keys: vec![],
                })
                .await?
                .into_inner();
            emit(&clientele_experiments::render_results_table(&r))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn variants_parse_as_key_and_weight() {
        assert_eq!(
            parse_variant("control=0.5").unwrap(),
            ("control".into(), 0.5)
        );
        assert!(parse_variant("control").is_err());
        assert!(parse_variant("a=1.5").is_err());
        assert!(parse_variant("=0.5").is_err());
    }

    #[test]
    fn metrics_parse_binary_and_continuous_with_currency() {
        let m = parse_metric("converted:binary").unwrap();
        assert_eq!(m.r#type, pb::MetricType::Binary as i32);
        let m = parse_metric("revenue:continuous:KRW").unwrap();
        assert_eq!(
            (m.r#type, m.currency.as_str()),
            (pb::MetricType::Continuous as i32, "KRW")
        );
        assert!(parse_metric("revenue:continuous").is_err());
        assert!(parse_metric("x:ratio").is_err());
    }

    #[test]
    fn metrics_with_an_event_suffix_are_derived_from_ingested_events() {
        let m = parse_metric("revenue:continuous:USD@order_completed").unwrap();
        assert_eq!(
            m.source,
            Some(pb::metric::Source::Event(pb::EventMetricSource {
                kind: pb::EventKind::OrderCompleted as i32,
                custom_event_name: String::new(),
            }))
        );
        let m = parse_metric("quiz:binary@custom:acme.quiz_completed").unwrap();
        assert!(matches!(
            m.source,
            Some(pb::metric::Source::Event(ref e)) if e.custom_event_name == "acme.quiz_completed"
        ));
        assert!(parse_metric("x:binary@nonsense").is_err());
        assert!(parse_metric("x:binary@custom:").is_err());
        assert!(matches!(
            parse_metric("x:binary").unwrap().source,
            Some(pb::metric::Source::Recorded(_))
        ));
    }
}
