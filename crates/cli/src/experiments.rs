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
}

/// Arguments of `experiments create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Experiment key (`[a-z0-9][a-z0-9_-]*`); also the hashing seed.
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
    /// Primary metric: `key:binary` or `key:continuous:CURRENCY` (e.g. `revenue:continuous:USD`).
    #[arg(long, value_parser = parse_metric)]
    pub metric: pb::Metric,
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

/// `key:binary` or `key:continuous:CUR` → a recorded metric (conversions are recorded with
/// `RecordConversion`).
pub fn parse_metric(s: &str) -> Result<pb::Metric, String> {
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
        source: Some(pb::metric::Source::Recorded(pb::RecordedMetricSource {})),
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
                    conversion_window: Some(prost_types::Duration {
                        seconds: a.conversion_window_days * 86_400,
                        nanos: 0,
                    }),
                    ..a.metric
                }),
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
}
