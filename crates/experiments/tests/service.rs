//! ExperimentService behaviour, calling the tonic service trait directly (no network): the
//! create → start → assign → expose → convert → results flow, stickiness, exactly-once
//! exposures and conversions, SRM, agreement with the stats module, and precise errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use clientele_experiments::assignment::assign_variant;
use clientele_experiments::definition;
use clientele_experiments::holdout::HoldoutConfig;
use clientele_experiments::stats::{self, ConversionCounts, MetricMoments};
use clientele_proto::v1 as pb;
use clientele_proto::v1::experiment_service_server::ExperimentService;
use clientele_runtime::status::violated_field;
use support::{
    Engine, binary_metric, experiment, fixture, fixture_with, later, revenue_metric, unit_ids, usd,
};
use tonic::{Code, Request};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

async fn the_full_flow_yields_results_for_every_metric(e: Engine) {
    let f = fixture(e).await;
    let mut def = experiment("checkout", &[0.5, 0.5]);
    let mut primary = binary_metric("purchase");
    primary.minimum_effect = 0.05;
    primary.cuped_lookback = Some(support::days(30));
    def.primary_metric = Some(primary);
    def.guardrail_metrics = vec![revenue_metric("revenue", "USD")];
    let created = f.create(def).await;
    assert_eq!(created.status, pb::ExperimentStatus::Draft as i32);
    assert_eq!(created.version, 1);
    let started = f.start("checkout").await;
    assert_eq!(started.status, pb::ExperimentStatus::Running as i32);
    assert!(started.start_time.is_some());

    for i in 0..200 {
        let unit = format!("u{i}");
        let v = f
            .expose("checkout", &unit, Some(f64::from(i % 17)))
            .await
            .unwrap();
        if (i + v) % 3 == 0 {
            f.convert("purchase", &unit, &format!("p{i}"), None).await;
            f.convert("revenue", &unit, &format!("r{i}"), usd(1000 + i64::from(i)))
                .await;
        }
    }
    let r = f.results("checkout").await;
    assert_eq!(r.total_units, 200);
    assert_eq!(r.metrics.len(), 2);
    let p = &r.metrics[0];
    assert_eq!(p.metric_key, "purchase");
    assert_eq!(p.role, pb::MetricRole::Primary as i32);
    assert_eq!(p.variants.len(), 2);
    assert!(p.variants[0].vs_control.is_none());
    let c = p.variants[1].vs_control.as_ref().unwrap();
    assert!(c.absolute_lift.is_some() && c.relative_lift.is_some());
    assert!((0.0..=1.0).contains(&c.p_value));
    assert_eq!(
        c.p_value_holm, c.p_value,
        "one comparison: Holm changes nothing"
    );
    assert!(c.sequential.is_some(), "minimum_effect set");
    assert!(c.cuped.is_some(), "cuped_lookback set: {:?}", p.notes);
    let rev = &r.metrics[1];
    assert_eq!(
        (rev.role, rev.currency.as_str()),
        (pb::MetricRole::Guardrail as i32, "USD")
    );
    assert!(
        rev.variants[1]
            .vs_control
            .as_ref()
            .unwrap()
            .sequential
            .is_none()
    );
    assert!(rev.variants.iter().all(|v| v.mean > 0.0));
    let srm = r.srm.unwrap();
    assert_eq!(srm.observed_units.iter().sum::<i64>(), 200);
    let text = clientele_experiments::render_results_table(&f.results("checkout").await);
    assert!(text.contains("purchase (primary, binary)"));
}

async fn exposed_units_keep_their_variant_when_weights_change(e: Engine) {
    let f = fixture(e).await;
    f.create_and_start(experiment("sticky", &[0.5, 0.5])).await;
    let mut exposed = Vec::new();
    for i in 0..60 {
        let unit = format!("u{i}");
        exposed.push((unit.clone(), f.expose("sticky", &unit, None).await.unwrap()));
    }
    // Ramp everything to the treatment.
    let mut patch = experiment("sticky", &[0.0, 1.0]);
    patch.variants[0].weight = 0.0;
    let updated = f
        .service
        .update_experiment(Request::new(pb::UpdateExperimentRequest {
            experiment: Some(patch),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["variants".into()],
            }),
            expected_version: 0,
        }))
        .await
        .unwrap()
        .into_inner()
        .experiment
        .unwrap();
    assert_eq!(updated.variants[1].weight, 1.0);
    assert!(exposed.iter().any(|(_, v)| *v == 0));
    for (unit, v) in &exposed {
        let a = f.assign("sticky", unit).await;
        assert!(a.in_experiment);
        assert_eq!(a.variant_index, *v, "{unit} keeps its variant");
    }
    for i in 100..130 {
        let a = f.assign("sticky", &format!("u{i}")).await;
        assert_eq!(a.variant_index, 1, "new units follow the new weights");
    }
}

async fn an_exposed_variant_equals_assign_variant_for_the_stored_spec(e: Engine) {
    let f = fixture(e).await;
    let mut def = experiment("compat", &[0.2, 0.3, 0.5]);
    def.coverage = 0.8;
    def.seed = "compat-seed".into();
    def.namespace = Some(pb::Namespace {
        id: "ns".into(),
        range_start: 0.1,
        range_end: 0.9,
    });
    let stored = f.create_and_start(def).await;
    let spec = definition::spec(&stored);
    let mut seen = 0;
    for i in 0..100 {
        let unit = format!("고객-{i}");
        let expected = assign_variant(&spec, &unit).variant();
        let got = f.expose("compat", &unit, None).await;
        assert_eq!(got.map(|v| usize::try_from(v).unwrap()), expected, "{unit}");
        seen += usize::from(got.is_some());
    }
    assert!(seen > 30);
}

async fn a_conversion_is_recorded_once_and_a_changed_payload_conflicts(e: Engine) {
    let f = fixture(e).await;
    let mut def = experiment("conv", &[0.5, 0.5]);
    def.primary_metric = Some(revenue_metric("spend", "USD"));
    f.create_and_start(def).await;
    f.expose("conv", "u1", None).await.unwrap();
    let at = Some(later(1));
    let req = |amount| pb::RecordConversionRequest {
        metric_key: "spend".into(),
        unit_ids: unit_ids("profile_id", "u1"),
        occurred_at: at,
        value: usd(amount),
        idempotency_key: "order-1".into(),
    };
    let first = f
        .service
        .record_conversion(Request::new(req(500)))
        .await
        .unwrap();
    assert!(!first.into_inner().replayed);
    let again = f
        .service
        .record_conversion(Request::new(req(500)))
        .await
        .unwrap();
    assert!(again.into_inner().replayed);
    let err = f
        .service
        .record_conversion(Request::new(req(900)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let mut eur = req(500);
    eur.idempotency_key = "order-2".into();
    eur.value = Some(pb::Money {
        amount_minor: 500,
        currency: "EUR".into(),
    });
    let err = f
        .service
        .record_conversion(Request::new(eur))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violated_field(&err).as_deref(), Some("value.currency"));
    let r = f.results("conv").await;
    let v = r.metrics[0].variants.iter().find(|v| v.units == 1).unwrap();
    assert_eq!(v.converted_units, 1);
    assert!(close(v.mean, 500.0), "counted once: {}", v.mean);
}

async fn srm_is_flagged_for_a_skewed_exposure_set_only(e: Engine) {
    let f = fixture(e).await;
    f.create_and_start(experiment("balanced", &[0.5, 0.5]))
        .await;
    f.create_and_start(experiment("skewed", &[0.5, 0.5])).await;
    let (mut control, mut treatment) = (0, 0);
    for i in 0..400 {
        let unit = format!("u{i}");
        f.expose("balanced", &unit, None).await.unwrap();
        // Log every control exposure but only half the treatment ones: a logging bug.
        let a = f.assign("skewed", &unit).await;
        let log = a.variant_index == 0 || i % 2 == 0;
        if log {
            f.expose("skewed", &unit, None).await.unwrap();
            if a.variant_index == 0 {
                control += 1
            } else {
                treatment += 1
            }
        }
    }
    let balanced = f.results("balanced").await.srm.unwrap();
    assert!(!balanced.mismatch, "p = {}", balanced.p_value);
    let skewed = f.results("skewed").await.srm.unwrap();
    assert!(skewed.mismatch, "p = {}", skewed.p_value);
    assert_eq!(skewed.observed_units, vec![control, treatment]);
    assert!(skewed.p_value < 0.001);
}

async fn results_equal_the_stats_module_for_the_same_aggregates(e: Engine) {
    let f = fixture(e).await;
    let mut def = experiment("stats", &[0.34, 0.33, 0.33]);
    def.guardrail_metrics = vec![revenue_metric("basket", "USD")];
    f.create_and_start(def).await;
    let mut conv = [ConversionCounts::new(0, 0); 3];
    let mut values: [Vec<f64>; 3] = Default::default();
    for i in 0..300_i64 {
        let unit = format!("u{i}");
        let v = usize::try_from(f.expose("stats", &unit, None).await.unwrap()).unwrap();
        conv[v].units += 1;
        let buys = (i * 7 + i64::try_from(v).unwrap() * 3) % 5 < 2;
        let amount = if buys { 500 + (i * 37) % 900 } else { 0 };
        if buys {
            conv[v].conversions += 1;
            f.convert("purchase", &unit, &format!("p{i}"), None).await;
            f.convert("basket", &unit, &format!("b{i}"), usd(amount))
                .await;
        }
        #[allow(clippy::cast_precision_loss)]
        values[v].push(amount as f64);
    }
    let r = f.results("stats").await;
    let expected = stats::compare_conversions_to_control(conv[0], &conv[1..], 0.05).unwrap();
    for t in &expected {
        let got = r.metrics[0].variants[t.variant]
            .vs_control
            .as_ref()
            .unwrap();
        let abs = got.absolute_lift.as_ref().unwrap();
        assert!(close(abs.point, t.comparison.absolute_lift.value));
        assert!(close(abs.ci_lower, t.comparison.absolute_lift.ci.lower));
        assert!(close(abs.ci_upper, t.comparison.absolute_lift.ci.upper));
        let rel = got.relative_lift.as_ref().unwrap();
        assert!(close(rel.point, t.comparison.relative_lift.unwrap().value));
        assert!(close(got.p_value, t.comparison.p_value));
        assert!(close(got.p_value_holm, t.adjusted_p_value));
    }
    let moments: Vec<MetricMoments> = values
        .iter()
        .map(|v| MetricMoments::from_values(v))
        .collect();
    let expected = stats::compare_means_to_control(&moments[0], &moments[1..], 0.05).unwrap();
    for t in &expected {
        let got = r.metrics[1].variants[t.variant]
            .vs_control
            .as_ref()
            .unwrap();
        let abs = got.absolute_lift.as_ref().unwrap();
        assert!(close(abs.point, t.comparison.absolute_lift.value));
        assert!(close(abs.ci_lower, t.comparison.absolute_lift.ci.lower));
        assert!(close(got.p_value, t.comparison.p_value));
        assert!(close(got.p_value_holm, t.adjusted_p_value));
        assert!(close(
            r.metrics[1].variants[t.variant].mean,
            t.comparison.treatment_mean
        ));
    }
}

async fn draft_stopped_and_released_experiments_assign_with_a_reason(e: Engine) {
    let f = fixture(e).await;
    f.create(experiment("life", &[0.5, 0.5])).await;
    let a = f.assign("life", "u1").await;
    assert_eq!(
        (a.in_experiment, a.reason),
        (false, pb::AssignmentReason::NotRunning as i32)
    );
    let err = f
        .service
        .get_results(Request::new(pb::GetResultsRequest {
            experiment_key: "life".into(),
            metric_keys: vec![],
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let stop = |release| pb::StopExperimentRequest {
        key: "life".into(),
        release_variant_index: release,
        reason: "done".into(),
    };
    let err = f
        .service
        .stop_experiment(Request::new(stop(None)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "a draft cannot stop");
    f.start("life").await;
    f.start("life").await; // idempotent
    let err = f
        .service
        .stop_experiment(Request::new(stop(Some(7))))
        .await
        .unwrap_err();
    assert_eq!(
        violated_field(&err).as_deref(),
        Some("release_variant_index")
    );
    f.service
        .stop_experiment(Request::new(stop(Some(1))))
        .await
        .unwrap();
    f.service
        .stop_experiment(Request::new(stop(Some(1))))
        .await
        .unwrap(); // idempotent
    let err = f
        .service
        .stop_experiment(Request::new(stop(None)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = f
        .service
        .start_experiment(Request::new(pb::StartExperimentRequest {
            key: "life".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "stopping is final");
    let a = f.assign("life", "u1").await;
    assert_eq!(
        (a.in_experiment, a.reason, a.variant_index),
        (false, pb::AssignmentReason::Released as i32, 1)
    );
}

async fn bad_input_names_the_field_and_writes_nothing(e: Engine) {
    let f = fixture(e).await;
    let mut cases: Vec<(pb::Experiment, &str)> = Vec::new();
    let base = || experiment("bad", &[0.5, 0.5]);
    let mut x = base();
    x.key = "Bad Key".into();
    cases.push((x, "experiment.key"));
    let mut x = base();
    x.variants[1].weight = 0.7;
    cases.push((x, "experiment.variants"));
    let mut x = base();
    x.variants[1].weight = f64::NAN;
    cases.push((x, "experiment.variants[1].weight"));
    let mut x = base();
    x.variants[1].key = "control".into();
    cases.push((x, "experiment.variants[1].key"));
    let mut x = base();
    x.hash_version = 3;
    cases.push((x, "experiment.hash_version"));
    let mut x = base();
    x.holdout = 0;
    cases.push((x, "experiment.holdout"));
    let mut x = base();
    x.coverage = 1.5;
    cases.push((x, "experiment.coverage"));
    let mut x = base();
    x.targeting = Some(pb::Targeting {
        rule_expression: r#"trait("vip") == true and"#.into(),
        ..pb::Targeting::default()
    });
    cases.push((x, "experiment.targeting.rule_expression"));
    let mut x = base();
    x.guardrail_metrics = vec![binary_metric("purchase")];
    cases.push((x, "experiment.guardrail_metrics[0].key"));
    let mut x = base();
    x.primary_metric = Some(pb::Metric {
        currency: String::new(),
        ..revenue_metric("rev", "USD")
    });
    cases.push((x, "experiment.primary_metric.currency"));
    let mut x = base();
    x.primary_metric.as_mut().unwrap().conversion_window = None;
    cases.push((x, "experiment.primary_metric.conversion_window"));
    for (exp, field) in cases {
        let err = f
            .service
            .create_experiment(Request::new(pb::CreateExperimentRequest {
                experiment: Some(exp),
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert_eq!(
            violated_field(&err).as_deref(),
            Some(field),
            "{}",
            err.message()
        );
    }
    let mut x = base();
    x.targeting = Some(pb::Targeting {
        rule_expression: "orders > 3".into(),
        ..pb::Targeting::default()
    });
    let err = f
        .service
        .create_experiment(Request::new(pb::CreateExperimentRequest {
            experiment: Some(x),
        }))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("at 1:1"),
        "rule errors give the position: {}",
        err.message()
    );
    // Nothing was written.
    let err = f
        .service
        .get_experiment(Request::new(pb::GetExperimentRequest { key: "bad".into() }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("`bad`"));

    f.create_and_start(experiment("ok", &[0.5, 0.5])).await;
    let assign = |key: &str, unit: &str, profile: &str| pb::AssignRequest {
        experiment_key: key.into(),
        unit_id: unit.into(),
        profile_id: profile.into(),
        ..pb::AssignRequest::default()
    };
    for (req, field) in [
        (assign("", "u1", ""), "experiment_key"),
        (assign("ok", "", ""), "unit_id"),
        (assign("ok", &"x".repeat(300), ""), "unit_id"),
        (assign("ok", "u1", "not-a-uuid"), "profile_id"),
    ] {
        let err = f.service.assign(Request::new(req)).await.unwrap_err();
        assert_eq!(violated_field(&err).as_deref(), Some(field));
    }
    let err = f
        .service
        .assign(Request::new(assign("missing", "u1", "")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("`missing`"));
    let expose = |variant, pre| pb::LogExposureRequest {
        experiment_key: "ok".into(),
        unit_id: "u1".into(),
        variant_index: variant,
        pre_period_value: pre,
        ..pb::LogExposureRequest::default()
    };
    let err = f
        .service
        .log_exposure(Request::new(expose(5, None)))
        .await
        .unwrap_err();
    assert_eq!(violated_field(&err).as_deref(), Some("variant_index"));
    let err = f
        .service
        .log_exposure(Request::new(expose(0, Some(f64::INFINITY))))
        .await
        .unwrap_err();
    assert_eq!(violated_field(&err).as_deref(), Some("pre_period_value"));
    let real = f.assign("ok", "u1").await.variant_index;
    let err = f
        .service
        .log_exposure(Request::new(expose(1 - real, None)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "not its assignment");
    let conv = |key: &str, idem: &str| pb::RecordConversionRequest {
        metric_key: key.into(),
        unit_ids: unit_ids("profile_id", "u1"),
        occurred_at: Some(later(1)),
        value: None,
        idempotency_key: idem.into(),
    };
    for (req, field) in [
        (conv("", "k"), "metric_key"),
        (conv("purchase", ""), "idempotency_key"),
        (conv("purchase", "bad\u{1}key"), "idempotency_key"),
        (
            pb::RecordConversionRequest {
                occurred_at: None,
                ..conv("purchase", "k")
            },
            "occurred_at",
        ),
        (
            pb::RecordConversionRequest {
                occurred_at: Some(later(3600)),
                ..conv("purchase", "k")
            },
            "occurred_at",
        ),
        (
            pb::RecordConversionRequest {
                unit_ids: unit_ids("Bad", "u"),
                ..conv("purchase", "k")
            },
            "unit_ids[\"Bad\"]",
        ),
    ] {
        let err = f
            .service
            .record_conversion(Request::new(req))
            .await
            .unwrap_err();
        assert_eq!(violated_field(&err).as_deref(), Some(field));
    }
    let err = f
        .service
        .get_results(Request::new(pb::GetResultsRequest {
            experiment_key: "ok".into(),
            metric_keys: vec!["nope".into()],
        }))
        .await
        .unwrap_err();
    assert_eq!(violated_field(&err).as_deref(), Some("metric_keys[0]"));
}

async fn running_experiments_refuse_changes_to_assignment_fields(e: Engine) {
    let f = fixture(e).await;
    f.create_and_start(experiment("frozen", &[0.5, 0.5])).await;
    let update = |paths: Vec<&str>, e: pb::Experiment, v| pb::UpdateExperimentRequest {
        experiment: Some(e),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.into_iter().map(String::from).collect(),
        }),
        expected_version: v,
    };
    let mut x = experiment("frozen", &[0.5, 0.5]);
    x.seed = "other".into();
    let err = f
        .service
        .update_experiment(Request::new(update(vec!["seed"], x, 0)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = f
        .service
        .update_experiment(Request::new(update(
            vec!["key"],
            experiment("frozen", &[0.5, 0.5]),
            0,
        )))
        .await
        .unwrap_err();
    assert_eq!(
        violated_field(&err).as_deref(),
        Some("update_mask.paths[0]")
    );
    let err = f
        .service
        .update_experiment(Request::new(update(
            vec!["hypothesis"],
            experiment("frozen", &[0.5, 0.5]),
            1,
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "stale expected_version");
    let ok = f
        .service
        .update_experiment(Request::new(update(
            vec!["hypothesis"],
            experiment("frozen", &[0.5, 0.5]),
            2,
        )))
        .await
        .unwrap();
    assert_eq!(ok.into_inner().experiment.unwrap().version, 3);
}

async fn the_global_holdout_excludes_units_and_is_queryable(e: Engine) {
    let f = fixture_with(e, HoldoutConfig::enabled(0.2).unwrap()).await;
    let mut def = experiment("promo", &[0.5, 0.5]);
    def.holdout = pb::HoldoutParticipation::Exclude as i32;
    f.create_and_start(def).await;
    let mut held = 0;
    for i in 0..200 {
        let unit = uuid::Uuid::from_u128(i).to_string();
        let h = f
            .service
            .is_in_holdout(Request::new(pb::IsInHoldoutRequest {
                unit_id: unit.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(h.in_holdout, f.service.holdout().contains(&unit));
        let a = f.assign("promo", &unit).await;
        if h.in_holdout {
            held += 1;
            assert_eq!(a.reason, pb::AssignmentReason::GlobalHoldout as i32);
        } else {
            assert!(a.in_experiment);
        }
    }
    assert!((20..60).contains(&held), "{held}");
    let cfg = f
        .service
        .get_holdout(Request::new(pb::GetHoldoutRequest {}))
        .await
        .unwrap()
        .into_inner()
        .holdout
        .unwrap();
    assert!(cfg.enabled && (cfg.fraction - 0.2).abs() < 1e-12);
}

async fn targeting_uses_the_callers_attributes_tier_and_segments(e: Engine) {
    let f = fixture(e).await;
    let mut def = experiment("vip", &[0.5, 0.5]);
    def.targeting = Some(pb::Targeting {
        segments: vec![],
        tier_ids: vec!["gold".into()],
        rule_expression: r#"trait("country") == "KR""#.into(),
    });
    f.create_and_start(def).await;
    let req = |country: &str, tier: &str| pb::BatchAssignRequest {
        unit_ids: unit_ids("profile_id", "u1"),
        attributes: [(
            "country".to_owned(),
            pb::Value {
                kind: Some(pb::value::Kind::StringValue(country.into())),
            },
        )]
        .into(),
        context: Some(pb::TargetingContext {
            segments: vec![],
            tier_id: tier.into(),
        }),
        experiment_keys: vec!["vip".into(), "unknown".into()],
        ..pb::BatchAssignRequest::default()
    };
    let r = f
        .service
        .batch_assign(Request::new(req("KR", "gold")))
        .await
        .unwrap()
        .into_inner();
    assert!(r.assignments[0].in_experiment);
    assert_eq!(
        r.assignments[1].reason,
        pb::AssignmentReason::ExperimentNotFound as i32
    );
    for (country, tier) in [("US", "gold"), ("KR", "silver")] {
        let r = f
            .service
            .batch_assign(Request::new(req(country, tier)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.assignments[0].reason,
            pb::AssignmentReason::TargetingNotMatched as i32
        );
    }
}

/// 20 concurrent LogExposure calls for one unit record exactly one first exposure.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_exposures_of_one_unit_are_logged_once_on_postgres() {
    let f = fixture(Engine::Postgres).await;
    f.create_and_start(experiment("race", &[0.5, 0.5])).await;
    let v = f.assign("race", "u1").await.variant_index;
    let calls = (0..20).map(|_| {
        let service = f.service.clone();
        tokio::spawn(async move {
            service
                .log_exposure(Request::new(pb::LogExposureRequest {
                    experiment_key: "race".into(),
                    unit_id: "u1".into(),
                    variant_index: v,
                    ..pb::LogExposureRequest::default()
                }))
                .await
                .unwrap()
                .into_inner()
        })
    });
    let results: Vec<pb::LogExposureResponse> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(results.iter().filter(|r| r.first_exposure).count(), 1);
    let first = results[0].first_exposed_at;
    assert!(results.iter().all(|r| r.first_exposed_at == first));
    assert_eq!(f.results("race").await.total_units, 1);
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() { super::$name(super::Engine::Postgres).await })*
        }
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() { super::$name(super::Engine::Sqlite).await })*
        }
    };
}

on_both!(
    the_full_flow_yields_results_for_every_metric,
    exposed_units_keep_their_variant_when_weights_change,
    an_exposed_variant_equals_assign_variant_for_the_stored_spec,
    a_conversion_is_recorded_once_and_a_changed_payload_conflicts,
    srm_is_flagged_for_a_skewed_exposure_set_only,
    results_equal_the_stats_module_for_the_same_aggregates,
    draft_stopped_and_released_experiments_assign_with_a_reason,
    bad_input_names_the_field_and_writes_nothing,
    running_experiments_refuse_changes_to_assignment_fields,
    the_global_holdout_excludes_units_and_is_queryable,
    targeting_uses_the_callers_attributes_tier_and_segments,
);
