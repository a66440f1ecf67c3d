//! The scoring engine shared by the service, the feed consumer and batch runs: the batch
//! recompute ([`Engine::run_recompute`]) and real-time re-scoring of changed profiles
//! ([`Engine::rescore`]).
//!
//! A batch run loads every profile's facts in bulk (a handful of full-table reads), computes
//! features and scores in memory in parallel with the pure modules, clusters, evaluates every
//! segment, and publishes in one transaction with chunked multi-row INSERTs. Real-time
//! re-scoring reuses the latest successful run's RFM cut points, CLV fits, clustering models
//! and top-fraction thresholds, so a profile moves between segments as soon as its facts
//! change, without a batch run.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use clientele_proto::v1 as pb;
use clientele_runtime::time::now_micros;
use rayon::prelude::*;
use tokio::sync::Notify;

use crate::scoring::{
    self, ClusterResult, Compiled, ProfileFacts, RuleView, RunModel, Scored, ScoringConfig,
    compile_definition,
};
use crate::store::{
    ChangeRow, MemberRow, RunPublication, ScoreRow, SegmentRecord, SegmentationStore, StoreError,
};

/// ProfileService client type used for traits and consent.
pub type ProfileClient = pb::profile_service_client::ProfileServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        clientele_runtime::client::ClientInterceptor,
    >,
>;

/// Profiles per BatchGetProfiles call (the contract's maximum).
const PROFILE_BATCH: usize = 500;

/// Engine failures.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// ProfileService failed.
    #[error("profile service: {0}")]
    Upstream(#[from] tonic::Status),
    /// Real-time scoring needs a successful run.
    #[error("no recompute run has succeeded yet; start one with StartRecompute")]
    NoRun,
    /// The profile is unknown or erased.
    #[error("profile `{0}` not found")]
    UnknownProfile(String),
}

/// A live segment with its compiled definition.
#[derive(Debug, Clone)]
pub struct LiveSegment {
    /// The stored record.
    pub record: SegmentRecord,
    /// The compiled definition.
    pub compiled: Compiled,
}

impl LiveSegment {
    fn id(&self) -> &str {
        &self.record.segment.segment_id
    }
}

/// One re-scored profile.
#[derive(Debug, Clone)]
pub struct Rescored {
    /// Scores.
    pub scored: Scored,
    /// Stored form of the scores.
    pub row: ScoreRow,
    /// Memberships after re-scoring.
    pub members: Vec<MemberRow>,
}

/// The engine.
#[derive(Debug, Clone)]
pub struct Engine {
    /// The store.
    pub store: Arc<dyn SegmentationStore>,
    /// Scoring configuration.
    pub config: Arc<ScoringConfig>,
    /// ProfileService (traits and consent for RULE segments); `None` evaluates rules without.
    pub profiles: Option<ProfileClient>,
    /// Notified after membership changes are committed (wakes watchers).
    pub changed: Arc<Notify>,
    /// The latest run's model and the compiled live segments, reused by re-scores while the
    /// run and the segments stamp they were loaded for are current.
    pub rescore_cache: RescoreCache,
}

/// What real-time re-scores reuse between calls: the latest run's model and the compiled live
/// segments, keyed by that run's id and the segments stamp they were loaded under. A run is
/// immutable once published and any define / redefine / delete changes the stamp, which every
/// re-score reads anyway, so a cached entry is never used stale.
#[derive(Debug, Clone, Default)]
pub struct RescoreCache(Arc<std::sync::Mutex<Option<Arc<RescoreContext>>>>);

/// One cached entry of [`RescoreCache`].
#[derive(Debug)]
struct RescoreContext {
    run_id: String,
    stamp: String,
    model: RunModel,
    /// Live segments that can be evaluated against `model` (CLUSTER ones only with a model of
    /// their current version).
    evaluated: Vec<LiveSegment>,
}

/// Non-RULE segment ids a rule may reference.
fn referencable(records: &[SegmentRecord]) -> Vec<String> {
    records
        .iter()
        .filter(|r| r.kind != pb::SegmentKind::Rule as i32)
        .map(|r| r.segment.segment_id.clone())
        .collect()
}

/// Evaluates memberships of one scored profile. `clusters` gives its cluster (and distance) in
/// a CLUSTER segment (by id) that has a model, `None` when it has none or the profile is not
/// clustered.
fn evaluate(
    s: &Scored,
    facts: Option<&ProfileFacts>,
    segments: &[LiveSegment],
    model: &RunModel,
    clusters: &dyn Fn(&str) -> Option<(usize, f64)>,
) -> Vec<MemberRow> {
    let mut out = Vec::new();
    let mut in_set = BTreeSet::new();
    for seg in segments {
        let id = seg.id();
        match &seg.compiled {
            Compiled::Rule(_) => {}
            Compiled::Cluster(_) => {
                if let Some((c, d)) = clusters(id) {
                    in_set.insert(id.to_owned());
                    out.push(MemberRow {
                        segment_id: id.to_owned(),
                        profile_id: s.profile_id.clone(),
                        cluster_index: i64::try_from(c).unwrap_or(0),
                        distance: Some(d),
                        entered_at: 0,
                    });
                }
            }
            other => {
                if scoring::is_member(other, s, model.clv_thresholds.get(id).copied()) {
                    in_set.insert(id.to_owned());
                    out.push(MemberRow {
                        segment_id: id.to_owned(),
                        profile_id: s.profile_id.clone(),
                        cluster_index: -1,
                        distance: None,
                        entered_at: 0,
                    });
                }
            }
        }
    }
    for seg in segments {
        if let Compiled::Rule(rule) = &seg.compiled {
            let view = RuleView {
                scored: s,
                facts,
                segments: &in_set,
            };
            if rule.matches(&view) {
                out.push(MemberRow {
                    segment_id: seg.id().to_owned(),
                    profile_id: s.profile_id.clone(),
                    cluster_index: -1,
                    distance: None,
                    entered_at: 0,
                });
            }
        }
    }
    out
}

fn score_row(s: &Scored, since: Option<i64>) -> ScoreRow {
    let rfm = s.rfm.as_ref();
    ScoreRow {
        profile_id: s.profile_id.clone(),
        rfm: rfm.map(|(r, _)| (i64::from(r.r), i64::from(r.f), i64::from(r.m))),
        rfm_name: rfm.map(|(_, n)| n.clone()),
        recency_days: s.window.recency_days,
        frequency: (s.window.frequency > 0).then_some(i64::from(s.window.frequency)),
        monetary_minor: (s.window.frequency > 0).then_some(s.window.monetary_total_minor),
        lifecycle: s.lifecycle.map(scoring::lifecycle_code),
        lifecycle_since: s.lifecycle.and(since),
        clv: s.predicted.map(|p| p.clv),
        p_alive: s.predicted.map(|p| p.p_alive),
        exp_purchases: s.predicted.map(|p| p.expected_purchases),
        exp_aov: s.predicted.map(|p| p.expected_aov),
    }
}

impl Engine {
    /// Live segments, compiled. A stored rule that no longer compiles (it references a
    /// segment deleted since) is skipped with a warning: it selects nobody.
    ///
    /// # Errors
    /// Store failures.
    pub async fn live_segments(&self) -> Result<Vec<LiveSegment>, EngineError> {
        let records = self.store.live_segments().await?;
        let ids = referencable(&records);
        let mut out = Vec::with_capacity(records.len());
        for record in records {
            match compile_definition(&record.segment, &self.config, &ids) {
                Ok(compiled) => out.push(LiveSegment { record, compiled }),
                Err(e) => tracing::warn!(
                    segment = %record.segment.segment_id,
                    error = %e.message,
                    "stored segment no longer compiles; it selects nobody"
                ),
            }
        }
        Ok(out)
    }

    /// The ids a new rule may reference (live non-RULE segments).
    ///
    /// # Errors
    /// Store failures.
    pub async fn referencable_segments(&self) -> Result<Vec<String>, EngineError> {
        Ok(referencable(&self.store.live_segments().await?))
    }

    /// Traits and consent of `ids` from ProfileService (missing profiles are absent).
    ///
    /// # Errors
    /// ProfileService failures.
    pub async fn profile_facts(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, ProfileFacts>, EngineError> {
        let mut out = HashMap::new();
        let Some(client) = &self.profiles else {
            return Ok(out);
        };
        for chunk in ids.chunks(PROFILE_BATCH) {
            let response = client
                .clone()
                .batch_get_profiles(pb::BatchGetProfilesRequest {
                    profile_ids: chunk.to_vec(),
                })
                .await?
                .into_inner();
            for (requested, profile) in chunk.iter().zip(response.profiles.iter()) {
                let _ = requested;
                out.insert(
                    profile.profile_id.clone(),
                    ProfileFacts::from_profile(profile),
                );
            }
        }
        Ok(out)
    }

    /// The cached model and compiled segments for (`run_id`, `stamp`), loading them when
    /// either changed.
    async fn rescore_context(
        &self,
        run_id: &str,
        stamp: &str,
    ) -> Result<Arc<RescoreContext>, EngineError> {
        if let Some(c) = self
            .rescore_cache
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .filter(|c| c.run_id == run_id && c.stamp == stamp)
        {
            return Ok(c.clone());
        }
        let run = self.store.get_run(run_id).await?;
        let model = run.model.unwrap_or_default();
        let evaluated: Vec<LiveSegment> = self
            .live_segments()
            .await?
            .into_iter()
            .filter(|s| match &s.compiled {
                Compiled::Cluster(_) => model
                    .clusters
                    .get(s.id())
                    .is_some_and(|m| m.version == s.record.version),
                _ => true,
            })
            .collect();
        let context = Arc::new(RescoreContext {
            run_id: run_id.to_owned(),
            stamp: stamp.to_owned(),
            model,
            evaluated,
        });
        *self
            .rescore_cache
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(context.clone());
        Ok(context)
    }

    /// Re-scores `ids` against the latest run (RFM cut points, CLV fits, cluster models) and,
    /// unless `dry_run`, persists scores and membership changes (reason REALTIME). Unknown ids
    /// are skipped. Returns the re-scored profiles and the changes.
    ///
    /// Round trips on PostgreSQL: one read (latest run, segments stamp, the profiles' facts
    /// and previous lifecycles), one write (`seg_apply_realtime`), plus ProfileService when a
    /// RULE segment exists; the run model and compiled segments come from
    /// [`Engine::rescore_cache`] unless the run or a segment changed.
    ///
    /// # Errors
    /// [`EngineError::NoRun`] before the first successful run; store and upstream failures.
    pub async fn rescore(
        &self,
        ids: &[String],
        dry_run: bool,
    ) -> Result<(Vec<Rescored>, Vec<ChangeRow>), EngineError> {
        let now = now_micros();
        let read = self.store.rescore_read(ids, now).await?;
        let run_id = read.latest_run.ok_or(EngineError::NoRun)?;
        let data = read.profiles;
        if data.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let context = self.rescore_context(&run_id, &read.segments_stamp).await?;
        let model = &context.model;
        let evaluated = &context.evaluated;
        let known: Vec<String> = data.iter().map(|d| d.profile_id.clone()).collect();
        let facts = if evaluated
            .iter()
            .any(|s| matches!(s.compiled, Compiled::Rule(_)))
        {
            self.profile_facts(&known).await?
        } else {
            HashMap::new()
        };
        let mut out = Vec::with_capacity(data.len());
        for d in &data {
            let mut s = scoring::features_of(d, now, &self.config);
            scoring::score_one(&mut s, model, &self.config);
            let mut clusters = BTreeMap::new();
            if s.window.frequency > 0 {
                for seg in evaluated {
                    if let (Compiled::Cluster(def), Some(m)) =
                        (&seg.compiled, model.clusters.get(seg.id()))
                    {
                        clusters.insert(seg.id().to_owned(), scoring::assign_cluster(m, def, &s));
                    }
                }
            }
            let members = evaluate(&s, facts.get(&s.profile_id), evaluated, model, &|id| {
                clusters.get(id).copied()
            });
            let since = match (read.previous.get(&s.profile_id), s.lifecycle) {
                (Some(p), Some(state)) if p.lifecycle == Some(scoring::lifecycle_code(state)) => {
                    p.lifecycle_since.or(Some(p.scored_at))
                }
                _ => Some(now),
            };
            let row = score_row(&s, since);
            out.push(Rescored {
                scored: s,
                row,
                members,
            });
        }
        if dry_run {
            return Ok((out, Vec::new()));
        }
        let rows: Vec<ScoreRow> = out.iter().map(|r| r.row.clone()).collect();
        let members: Vec<MemberRow> = out.iter().flat_map(|r| r.members.clone()).collect();
        let seg_ids: Vec<String> = evaluated.iter().map(|s| s.id().to_owned()).collect();
        let changes = self
            .store
            .apply_realtime(&run_id, &rows, &seg_ids, &members, now)
            .await?;
        if !changes.is_empty() {
            self.changed.notify_waiters();
        }
        Ok((out, changes))
    }

    async fn progress(
        &self,
        run_id: &str,
        phase: pb::RecomputePhase,
        processed: usize,
        total: usize,
        data_as_of: Option<i64>,
    ) -> Result<(), EngineError> {
        self.store
            .run_progress(
                run_id,
                phase as i32,
                i64::try_from(processed).unwrap_or(i64::MAX),
                i64::try_from(total).unwrap_or(i64::MAX),
                now_micros(),
                data_as_of,
            )
            .await?;
        Ok(())
    }

    /// Runs the batch recompute `run_id` to completion, marking it FAILED on error.
    pub async fn run_recompute_or_fail(&self, run_id: &str) {
        if let Err(e) = self.run_recompute(run_id).await {
            tracing::error!(run_id, error = %e, "recompute failed");
            if let Err(e2) = self
                .store
                .fail_run(run_id, &e.to_string(), now_micros())
                .await
            {
                tracing::error!(run_id, error = %e2, "could not record the failure");
            }
        }
    }

    /// Runs the batch recompute `run_id` (PENDING) and publishes its results.
    ///
    /// # Errors
    /// Store and upstream failures (the run is then left for the caller to fail).
    #[allow(clippy::too_many_lines)]
    pub async fn run_recompute(&self, run_id: &str) -> Result<(), EngineError> {
        self.run_recompute_timed(run_id).await.map(|_| ())
    }

    /// As [`Engine::run_recompute`], returning the wall time of each step (for benchmarks and
    /// the run log).
    ///
    /// # Errors
    /// As [`Engine::run_recompute`].
    pub async fn run_recompute_timed(
        &self,
        run_id: &str,
    ) -> Result<Vec<(&'static str, std::time::Duration)>, EngineError> {
        self.run_recompute_at(run_id, now_micros()).await
    }

    /// As [`Engine::run_recompute_timed`], scoring as of `as_of` (µs): recency, lifecycle and
    /// the engagement window are measured to that instant. Two runs over the same facts at the
    /// same `as_of` publish no membership change; between runs at different instants,
    /// profiles whose recency crosses a threshold (a rule such as `recency_days <= 90`, the
    /// lifecycle's day limits) move although no fact changed.
    ///
    /// # Errors
    /// As [`Engine::run_recompute`].
    #[allow(clippy::too_many_lines)]
    pub async fn run_recompute_at(
        &self,
        run_id: &str,
        as_of: i64,
    ) -> Result<Vec<(&'static str, std::time::Duration)>, EngineError> {
        use pb::RecomputePhase as P;
        let mut timings = Vec::new();
        let mut clock = std::time::Instant::now();
        let mut lap =
            |name: &'static str, timings: &mut Vec<(&'static str, std::time::Duration)>| {
                timings.push((name, clock.elapsed()));
                clock = std::time::Instant::now();
            };
        self.progress(run_id, P::Features, 0, 0, Some(as_of))
            .await?;
        let previous = self.store.latest_run().await?;
        // The previous run's lifecycles (for `lifecycle_since`) stream on another connection
        // while the facts load: the server works on both at once.
        let (data, prev_life) = tokio::try_join!(self.store.load_all_profiles(as_of), async {
            match &previous {
                Some(r) => self.store.run_lifecycles(&r.run_id).await,
                None => Ok(HashMap::new()),
            }
        })?;
        lap("load facts", &mut timings);
        let total = data.len();
        let config = self.config.clone();
        let mut scored: Vec<Scored> = data
            .par_iter()
            .map(|d| scoring::features_of(d, as_of, &config))
            .collect();
        drop(data);
        lap("features", &mut timings);
        self.progress(run_id, P::Rfm, total, total, None).await?;
        let prev_model = previous.as_ref().and_then(|r| r.model.clone());
        let (mut model, converged) = scoring::score_base(&mut scored, &config, prev_model.as_ref());
        lap("rfm + clv fits + lifecycle", &mut timings);
        self.progress(run_id, P::PredictedValue, total, total, None)
            .await?;
        self.progress(run_id, P::Lifecycle, total, total, None)
            .await?;
        let segments = self.live_segments().await?;
        // Clustering.
        self.progress(run_id, P::Clustering, 0, total, None).await?;
        // Per CLUSTER segment: its id and each customer's (label, distance), by position in
        // `customers`; `customer_at[i]` is the position of `scored[i]` there (profiles without
        // orders are not clustered). Kept as flat vectors: no per-profile map is built.
        let mut cluster_of: Vec<(String, Vec<usize>, Vec<f64>)> = Vec::new();
        let mut cluster_outputs = Vec::new();
        let mut customer_at: Vec<Option<usize>> = Vec::with_capacity(scored.len());
        let mut customers: Vec<&Scored> = Vec::new();
        for s in &scored {
            if s.window.frequency > 0 {
                customer_at.push(Some(customers.len()));
                customers.push(s);
            } else {
                customer_at.push(None);
            }
        }
        for seg in &segments {
            if let Compiled::Cluster(def) = &seg.compiled {
                let previous = prev_model.as_ref().and_then(|m| m.clusters.get(seg.id()));
                match scoring::cluster_segment(
                    seg.id(),
                    seg.record.version,
                    def,
                    &customers,
                    previous,
                ) {
                    Ok(ClusterResult {
                        model: fitted,
                        labels,
                        distances,
                        output,
                    }) => {
                        cluster_outputs.push(output);
                        model.clusters.insert(seg.id().to_owned(), fitted);
                        cluster_of.push((seg.id().to_owned(), labels, distances));
                    }
                    Err(e) => {
                        tracing::warn!(segment = seg.id(), error = %e, "clustering skipped");
                        cluster_outputs.push(pb::ClusterOutput {
                            segment_id: seg.id().to_owned(),
                            segment_version: seg.record.version,
                            features: def.features.clone(),
                            ..Default::default()
                        });
                    }
                }
            }
        }
        lap("clustering", &mut timings);
        // Segments.
        self.progress(run_id, P::Segments, 0, total, None).await?;
        for seg in &segments {
            if let Compiled::Predicted {
                top_fraction: Some(f),
                ..
            } = &seg.compiled
                && let Some(t) = scoring::top_fraction_threshold(&scored, *f)
            {
                model.clv_thresholds.insert(seg.id().to_owned(), t);
            }
        }
        let ids: Vec<String> = scored.iter().map(|s| s.profile_id.clone()).collect();
        let facts = if segments
            .iter()
            .any(|s| matches!(s.compiled, Compiled::Rule(_)))
        {
            self.profile_facts(&ids).await?
        } else {
            HashMap::new()
        };
        let members: Vec<MemberRow> = scored
            .par_iter()
            .zip(&customer_at)
            .flat_map_iter(|(s, at)| {
                let clusters = |id: &str| {
                    let c = (*at)?;
                    let (_, labels, distances) = cluster_of.iter().find(|(seg, ..)| seg == id)?;
                    Some((labels[c], distances[c]))
                };
                evaluate(s, facts.get(&s.profile_id), &segments, &model, &clusters)
            })
            .collect();
        lap("segments", &mut timings);
        self.progress(run_id, P::Publishing, 0, total, None).await?;
        let scores: Vec<ScoreRow> = scored
            .iter()
            .map(|s| {
                let since = match (s.lifecycle, prev_life.get(&s.profile_id)) {
                    (Some(state), Some((code, since)))
                        if *code == scoring::lifecycle_code(state) =>
                    {
                        *since
                    }
                    _ => as_of,
                };
                score_row(s, Some(since))
            })
            .collect();
        let outputs = build_outputs(
            &scored,
            &model,
            converged,
            &segments,
            &members,
            cluster_outputs,
            &config.reporting_currency,
        );
        let publication = RunPublication {
            run_id: run_id.to_owned(),
            scores,
            members,
            segments: segments
                .iter()
                .filter(|s| {
                    !matches!(s.compiled, Compiled::Cluster(_))
                        || model.clusters.contains_key(s.id())
                })
                .map(|s| (s.id().to_owned(), s.record.version))
                .collect(),
            outputs,
            model,
            now: now_micros(),
            retained_runs: config.retained_runs,
        };
        self.store.publish_run(publication).await?;
        lap("publish", &mut timings);
        self.changed.notify_waiters();
        tracing::info!(
            run_id,
            profiles = total,
            ?timings,
            "recompute run published"
        );
        Ok(timings)
    }
}

fn build_outputs(
    scored: &[Scored],
    model: &RunModel,
    converged: bool,
    segments: &[LiveSegment],
    members: &[MemberRow],
    clusters: Vec<pb::ClusterOutput>,
    currency: &str,
) -> pb::RecomputeOutputs {
    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    let mut scored_customers = 0i64;
    let mut life: BTreeMap<i64, i64> = BTreeMap::new();
    let mut total_clv = 0.0;
    for s in scored {
        if let Some((_, name)) = &s.rfm {
            scored_customers += 1;
            *counts.entry(name.as_str()).or_default() += 1;
        }
        if let Some(l) = s.lifecycle {
            *life.entry(scoring::lifecycle_code(l)).or_default() += 1;
        }
        if let Some(p) = s.predicted {
            total_clv += p.clv;
        }
    }
    let cuts = model.cut_points.as_ref();
    let mut sizes: HashMap<&str, i64> = HashMap::new();
    for m in members {
        *sizes.entry(m.segment_id.as_str()).or_default() += 1;
    }
    pb::RecomputeOutputs {
        rfm: Some(pb::RfmOutput {
            scored_customers,
            recency_day_boundaries: cuts.map(|c| c.recency_days.to_vec()).unwrap_or_default(),
            frequency_boundaries: cuts.map(|c| c.frequency.to_vec()).unwrap_or_default(),
            monetary_boundaries: cuts.map(|c| c.monetary.to_vec()).unwrap_or_default(),
            segment_counts: counts
                .into_iter()
                .map(|(name, customers)| pb::RfmSegmentCount {
                    segment_name: name.to_owned(),
                    segment: scoring::rfm_segment_enum(name) as i32,
                    customers,
                })
                .collect(),
        }),
        predicted_value: model
            .bgnbd
            .as_ref()
            .zip(model.gamma_gamma.as_ref())
            .map(|(b, g)| pb::PredictedValueOutput {
                bgnbd_r: b.r,
                bgnbd_alpha: b.alpha,
                bgnbd_a: b.a,
                bgnbd_b: b.b,
                gamma_gamma_p: g.p,
                gamma_gamma_q: g.q,
                gamma_gamma_v: g.v,
                converged,
                #[allow(clippy::cast_possible_truncation)]
                total_predicted_clv: Some(pb::Money {
                    amount_minor: total_clv.round() as i64,
                    currency: currency.to_owned(),
                }),
            }),
        lifecycle_counts: life
            .into_iter()
            .map(|(state, customers)| pb::LifecycleCount {
                state: i32::try_from(state).unwrap_or(0),
                customers,
            })
            .collect(),
        clusters,
        segments: segments
            .iter()
            .filter(|s| !matches!(s.compiled, Compiled::Cluster(_)))
            .map(|s| pb::SegmentOutput {
                segment_id: s.id().to_owned(),
                segment_version: s.record.version,
                size: sizes.get(s.id()).copied().unwrap_or(0),
                evaluation_errors: 0,
            })
            .collect(),
        entered: 0,
        exited: 0,
    }
}
