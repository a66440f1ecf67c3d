//! A readable plain-text rendering of `GetResultsResponse`, for the `clientele experiments
//! results` command: one block per metric, one row per variant, lifts as percentages (or
//! minor units for CONTINUOUS means) with their 95 % intervals, then the SRM verdict.

use std::fmt::Write as _;

use clientele_proto::v1 as pb;

fn pct(x: f64) -> String {
    format!("{:+.2}%", x * 100.0)
}

fn interval(e: Option<&pb::Estimate>, f: impl Fn(f64) -> String) -> String {
    e.map_or_else(
        || "-".to_owned(),
        |e| format!("{} [{}, {}]", f(e.point), f(e.ci_lower), f(e.ci_upper)),
    )
}

fn p_value(p: f64) -> String {
    if p < 0.0001 {
        "<0.0001".to_owned()
    } else {
        format!("{p:.4}")
    }
}

/// Renders `results` as a text table (columns padded to their widest cell; no trailing
/// spaces). Deterministic: the same response renders the same text.
#[must_use]
pub fn render_results_table(results: &pb::GetResultsResponse) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Experiment {} — {} exposed units",
        results.experiment_key, results.total_units
    );
    for m in &results.metrics {
        let role = match pb::MetricRole::try_from(m.role) {
            Ok(pb::MetricRole::Primary) => "primary",
            Ok(pb::MetricRole::Guardrail) => "guardrail",
            _ => "metric",
        };
        let binary = m.r#type == pb::MetricType::Binary as i32;
        let kind = if binary {
            "binary".to_owned()
        } else {
            format!("continuous, {} minor units", m.currency)
        };
        let _ = writeln!(out, "\n{} ({role}, {kind})", m.metric_key);
        let mut rows: Vec<Vec<String>> = vec![
            [
                "variant",
                "units",
                "conv",
                "rate",
                "mean",
                "abs lift (95% CI)",
                "rel lift (95% CI)",
                "p",
                "p holm",
                "p seq",
                "cuped rel lift",
                "cuped p",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        ];
        for v in &m.variants {
            let c = v.vs_control.as_ref();
            let abs = |x: f64| {
                if binary { pct(x) } else { format!("{x:+.2}") }
            };
            let dash = || "-".to_owned();
            rows.push(vec![
                format!("{} {}", v.variant_index, v.variant_key),
                v.units.to_string(),
                v.converted_units.to_string(),
                format!("{:.2}%", v.conversion_rate * 100.0),
                format!("{:.4}", v.mean),
                c.map_or_else(dash, |c| interval(c.absolute_lift.as_ref(), abs)),
                c.map_or_else(dash, |c| interval(c.relative_lift.as_ref(), pct)),
                c.map_or_else(dash, |c| p_value(c.p_value)),
                c.map_or_else(dash, |c| p_value(c.p_value_holm)),
                c.and_then(|c| c.sequential.as_ref())
                    .map_or_else(dash, |s| p_value(s.p_value)),
                c.and_then(|c| c.cuped.as_ref())
                    .map_or_else(dash, |k| interval(k.relative_lift.as_ref(), pct)),
                c.and_then(|c| c.cuped.as_ref())
                    .map_or_else(dash, |k| p_value(k.p_value)),
            ]);
        }
        let widths: Vec<usize> = (0..rows[0].len())
            .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
            .collect();
        for r in &rows {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            let _ = writeln!(out, "  {}", line.join("  ").trim_end());
        }
        for note in &m.notes {
            let _ = writeln!(out, "  note: {note}");
        }
    }
    match &results.srm {
        Some(s) => {
            let verdict = if s.mismatch {
                "MISMATCH — assignment or exposure logging is broken; do not trust these results"
            } else {
                "ok"
            };
            let _ = writeln!(
                out,
                "\nSample ratio: chi2 = {:.3}, df = {}, p = {} — {verdict}",
                s.chi_square,
                s.degrees_of_freedom,
                p_value(s.p_value)
            );
        }
        None => {
            let _ = writeln!(out, "\nSample ratio: no exposed units yet");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> pb::GetResultsResponse {
        let est = |p, l, u| pb::Estimate {
            point: p,
            ci_lower: l,
            ci_upper: u,
        };
        pb::GetResultsResponse {
            experiment_key: "checkout".into(),
            total_units: 2000,
            srm: Some(pb::SampleRatioMismatch {
                chi_square: 0.2,
                degrees_of_freedom: 1,
                p_value: 0.65,
                mismatch: false,
                observed_units: vec![990, 1010],
                expected_units: vec![1000.0, 1000.0],
            }),
            metrics: vec![pb::MetricResult {
                metric_key: "purchase".into(),
                role: pb::MetricRole::Primary as i32,
                r#type: pb::MetricType::Binary as i32,
                currency: String::new(),
                variants: vec![
                    pb::VariantResult {
                        variant_index: 0,
                        variant_key: "control".into(),
                        units: 990,
                        converted_units: 99,
                        conversion_rate: 0.1,
                        mean: 0.1,
                        std_dev: 0.3,
                        vs_control: None,
                    },
                    pb::VariantResult {
                        variant_index: 1,
                        variant_key: "treatment".into(),
                        units: 1010,
                        converted_units: 121,
                        conversion_rate: 0.1198,
                        mean: 0.1198,
                        std_dev: 0.32,
                        vs_control: Some(pb::Comparison {
                            absolute_lift: Some(est(0.0198, -0.008, 0.047)),
                            relative_lift: Some(est(0.198, -0.08, 0.47)),
                            p_value: 0.16,
                            p_value_holm: 0.16,
                            sequential: None,
                            cuped: None,
                        }),
                    },
                ],
                notes: vec!["CUPED: covariate has zero variance; CUPED theta is undefined".into()],
            }],
            ..pb::GetResultsResponse::default()
        }
    }

    #[test]
    fn table_shows_each_variant_with_lifts_and_the_srm_verdict() {
        let text = render_results_table(&sample());
        assert!(text.starts_with("Experiment checkout — 2000 exposed units\n"));
        assert!(text.contains("purchase (primary, binary)"));
        assert!(text.contains("0 control"));
        assert!(text.contains("+1.98% [-0.80%, +4.70%]"), "{text}");
        assert!(text.contains("+19.80% [-8.00%, +47.00%]"), "{text}");
        assert!(text.contains("note: CUPED: covariate has zero variance"));
        assert!(text.contains("Sample ratio: chi2 = 0.200, df = 1, p = 0.6500 — ok"));
        assert!(text.lines().all(|l| l == l.trim_end()));
    }

    #[test]
    fn columns_line_up() {
        let text = render_results_table(&sample());
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("  ") && !l.contains("note"))
            .collect();
        assert_eq!(rows.len(), 3);
        let col = |r: &str| r.find("units").or_else(|| r.find(char::is_numeric));
        assert!(col(rows[0]).is_some());
        let units_col = rows[0].find("units").unwrap_or(0);
        assert!(rows[1][units_col..].starts_with("990"), "{text}");
        assert!(rows[2][units_col..].starts_with("1010"), "{text}");
    }

    #[test]
    fn mismatch_and_empty_results_are_spelled_out() {
        let mut r = sample();
        if let Some(s) = r.srm.as_mut() {
            s.mismatch = true;
            s.p_value = 0.00001;
        }
        assert!(render_results_table(&r).contains("p = <0.0001 — MISMATCH"));
        r.srm = None;
        assert!(render_results_table(&r).contains("no exposed units yet"));
    }
}
