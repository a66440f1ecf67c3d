//! The other services the decision path reads, each behind a small trait with a gRPC
//! implementation, so the decision path states exactly what it needs:
//!
//! * [`ConsentSource`] — ProfileService.GetProfile: does the profile exist, which consent
//!   purposes are GRANTED, its traits.
//! * [`SegmentSource`] — SegmentationService.GetProfileSegments: segment memberships and the
//!   lifecycle state.
//! * [`ExperimentSource`] — ExperimentService.Assign: the variant of an experiment-gated offer.
//!
//! The global holdout is not fetched: it is computed locally with the same
//! [`HoldoutConfig`](clientele_experiments::holdout::HoldoutConfig) (fraction and seed from
//! settings) as ExperimentService, so both agree on who is held out without a call.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use clientele_proto::v1 as pb;
use clientele_runtime::client::{ClientInterceptor, lazy_channel};
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Intercepted = InterceptedService<Channel, ClientInterceptor>;

/// What the decision path needs from a profile.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileFacts {
    /// Consent purposes currently GRANTED.
    pub granted: BTreeSet<i32>,
    /// Stored traits.
    pub traits: BTreeMap<String, pb::Value>,
}

/// Reads consent and traits. `Ok(None)` means the profile is unknown or erased.
#[async_trait]
pub trait ConsentSource: Send + Sync + std::fmt::Debug {
    /// The profile's facts, or `None` if it does not exist.
    async fn profile(&self, profile_id: &str) -> Result<Option<ProfileFacts>, Status>;
}

/// A profile's segment standing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SegmentFacts {
    /// Segment ids the profile is in (clusters as `id#index`).
    pub segments: BTreeSet<String>,
    /// `pb::LifecycleState`, if the profile has one.
    pub lifecycle: Option<i32>,
    /// Rule features SegmentationService publishes for the profile (see
    /// [`crate::eligibility_rule::OFFER_RULE_FEATURES`]); absent ones are unknown.
    pub features: BTreeMap<String, clientele_rules::Value>,
}

/// The rule features in a GetProfileSegments answer: RFM raw values and scores, lifecycle
/// and predicted value. A part segmentation has not computed is left out (unknown to rules).
pub fn segment_features(p: &pb::ProfileSegments) -> BTreeMap<String, clientele_rules::Value> {
    use clientele_rules::Value;
    let mut f = BTreeMap::new();
    let mut num = |k: &str, v: f64| {
        if v.is_finite() {
            f.insert(k.to_string(), Value::Number(v));
        }
    };
    if let Some(r) = &p.rfm {
        num("recency_days", r.recency_days);
        num("orders", f64::from(r.frequency_orders));
        num("frequency", f64::from(r.frequency_orders));
        #[allow(clippy::cast_precision_loss)]
        if let Some(m) = &r.monetary_value {
            num("monetary_minor", m.amount_minor as f64);
        }
        num("r_score", f64::from(r.recency));
        num("f_score", f64::from(r.frequency));
        num("m_score", f64::from(r.monetary));
    }
    if let Some(pv) = &p.predicted {
        #[allow(clippy::cast_precision_loss)]
        if let Some(c) = &pv.clv {
            num("clv_minor", c.amount_minor as f64);
        }
        num("p_alive", pv.p_alive);
        num("expected_purchases", pv.expected_purchases);
    }
    if let Some(r) = &p.rfm
        && !r.segment_name.is_empty()
    {
        f.insert("rfm_segment".into(), Value::String(r.segment_name.clone()));
    }
    if let Some(name) = p.lifecycle.as_ref().and_then(|l| lifecycle_name(l.state)) {
        f.insert("lifecycle".into(), Value::String(name.into()));
    }
    f
}

/// The rule-language name of a `pb::LifecycleState` (as segmentation's rules see it).
pub fn lifecycle_name(state: i32) -> Option<&'static str> {
    Some(match pb::LifecycleState::try_from(state).ok()? {
        pb::LifecycleState::New => "new",
        pb::LifecycleState::Active => "active",
        pb::LifecycleState::AtRisk => "at_risk",
        pb::LifecycleState::Lapsed => "lapsed",
        pb::LifecycleState::Churned => "churned",
        pb::LifecycleState::Unspecified => return None,
    })
}

/// A trait or attribute value as rules see it (timestamps as Unix seconds).
pub fn rule_value(v: &pb::Value) -> Option<clientele_rules::Value> {
    use clientele_rules::Value;
    use pb::value::Kind;
    #[allow(clippy::cast_precision_loss)]
    Some(match v.kind.as_ref()? {
        Kind::StringValue(s) => Value::String(s.clone()),
        Kind::IntValue(i) => Value::Number(*i as f64),
        Kind::DoubleValue(d) => Value::Number(*d),
        Kind::BoolValue(b) => Value::Bool(*b),
        Kind::TimestampValue(t) => Value::Number(t.seconds as f64),
    })
}

/// Reads segment memberships.
#[async_trait]
pub trait SegmentSource: Send + Sync + std::fmt::Debug {
    /// The profile's segments; a profile segmentation has not scored yet has none.
    async fn segments(&self, profile_id: &str) -> Result<SegmentFacts, Status>;
}

/// An experiment assignment that placed the unit in a variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arm {
    /// Variant index (0 = control).
    pub variant_index: i32,
    /// Variant key.
    pub variant_key: String,
}

/// Assigns profiles to experiment variants.
#[async_trait]
pub trait ExperimentSource: Send + Sync + std::fmt::Debug {
    /// The profile's arm, or `Err(reason)` text when it is not in the experiment.
    async fn assign(
        &self,
        experiment_key: &str,
        profile_id: &str,
        log_exposure: bool,
    ) -> Result<Result<Arm, String>, Status>;
}

fn channel(endpoint: &str, token: Option<&str>) -> Result<Intercepted, Status> {
    let ch = lazy_channel(endpoint)
        .map_err(|e| Status::internal(format!("bad endpoint `{endpoint}`: {e}")))?;
    Ok(InterceptedService::new(ch, ClientInterceptor::new(token)?))
}

/// [`ConsentSource`] over ProfileService.
///
/// Concurrent reads are batched: at most [`PROFILE_BATCHES_IN_FLIGHT`] reads are sent at a
/// time, and the profiles asked for meanwhile go out together in the next one
/// (BatchGetProfiles, up to [`PROFILE_BATCH`] ids). Nothing waits for a batch to fill: a read
/// alone goes out at once (GetProfile), so this only changes anything when many profiles
/// miss Decide's read model at once (a cold replica), where it turns hundreds of reads into
/// a few.
#[derive(Debug, Clone)]
pub struct GrpcProfiles {
    client: pb::profile_service_client::ProfileServiceClient<Intercepted>,
    batcher: std::sync::Arc<std::sync::Mutex<ProfileBatcher>>,
}

/// Profile reads sent at a time by one [`GrpcProfiles`].
pub const PROFILE_BATCHES_IN_FLIGHT: usize = 4;
/// Most ids per BatchGetProfiles (the service's limit is 500).
pub const PROFILE_BATCH: usize = 200;

type ProfileReply = tokio::sync::oneshot::Sender<Result<Option<ProfileFacts>, Status>>;

#[derive(Debug, Default)]
struct ProfileBatcher {
    waiting: Vec<(String, ProfileReply)>,
    in_flight: usize,
}

impl GrpcProfiles {
    /// A client of the ProfileService at `endpoint`.
    pub fn new(endpoint: &str, token: Option<&str>) -> Result<Self, Status> {
        Ok(Self {
            client: pb::profile_service_client::ProfileServiceClient::new(channel(
                endpoint, token,
            )?),
            batcher: std::sync::Arc::default(),
        })
    }

    /// Sends the waiting reads, a batch at a time, until none is left.
    async fn drain(self) {
        loop {
            let batch: Vec<(String, ProfileReply)> = {
                let mut b = self
                    .batcher
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if b.waiting.is_empty() {
                    b.in_flight -= 1;
                    return;
                }
                let n = b.waiting.len().min(PROFILE_BATCH);
                b.waiting.drain(..n).collect()
            };
            let mut ids: Vec<String> = batch.iter().map(|(id, _)| id.clone()).collect();
            ids.sort_unstable();
            ids.dedup();
            let found = if ids.len() == 1 {
                None
            } else {
                self.batch_get(&ids).await
            };
            for (id, reply) in batch {
                let r = match &found {
                    Some(Ok(m)) => Ok(m.get(&id).cloned().flatten()),
                    Some(Err(s)) => Err(s.clone()),
                    None => self.get_one(&id).await,
                };
                let _ = reply.send(r);
            }
        }
    }

    /// `ids` read at once: `None` when the batch must be read one by one instead (an id the
    /// batch call refuses, or an answer that does not match the request).
    async fn batch_get(
        &self,
        ids: &[String],
    ) -> Option<Result<std::collections::HashMap<String, Option<ProfileFacts>>, Status>> {
        let res = self
            .client
            .clone()
            .batch_get_profiles(pb::BatchGetProfilesRequest {
                profile_ids: ids.to_vec(),
            })
            .await;
        let r = match res {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::InvalidArgument => return None,
            Err(s) => return Some(Err(upstream("ProfileService", s))),
        };
        let missing: BTreeSet<&str> = r.missing_profile_ids.iter().map(String::as_str).collect();
        let present = ids.iter().filter(|id| !missing.contains(id.as_str()));
        if present.clone().count() != r.profiles.len() {
            return None;
        }
        // Found profiles come in request order (a merged-away id yields its survivor).
        let mut out: std::collections::HashMap<String, Option<ProfileFacts>> = present
            .cloned()
            .zip(r.profiles.into_iter().map(|p| Some(facts(p))))
            .collect();
        for id in missing {
            out.insert(id.to_string(), None);
        }
        Some(Ok(out))
    }

    async fn get_one(&self, profile_id: &str) -> Result<Option<ProfileFacts>, Status> {
        let res = self
            .client
            .clone()
            .get_profile(pb::GetProfileRequest {
                profile_id: profile_id.to_string(),
            })
            .await;
        match res {
            Ok(r) => Ok(Some(facts(r.into_inner().profile.unwrap_or_default()))),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(upstream("ProfileService", s)),
        }
    }
}

fn facts(profile: pb::Profile) -> ProfileFacts {
    let granted = profile
        .consents
        .iter()
        .filter(|c| c.status == pb::ConsentStatus::Granted as i32)
        .map(|c| c.purpose)
        .collect();
    ProfileFacts {
        granted,
        traits: profile.traits.into_iter().collect(),
    }
}

#[async_trait]
impl ConsentSource for GrpcProfiles {
    async fn profile(&self, profile_id: &str) -> Result<Option<ProfileFacts>, Status> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return self.get_one(profile_id).await;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start = {
            let mut b = self
                .batcher
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            b.waiting.push((profile_id.to_string(), tx));
            let start = b.in_flight < PROFILE_BATCHES_IN_FLIGHT;
            if start {
                b.in_flight += 1;
            }
            start
        };
        if start {
            // Its own task: a cancelled request must not strand the reads batched with it.
            runtime.spawn(self.clone().drain());
        }
        rx.await
            .unwrap_or_else(|_| Err(Status::unavailable("ProfileService read dropped")))
    }
}

/// [`SegmentSource`] over SegmentationService.
#[derive(Debug, Clone)]
pub struct GrpcSegments(pb::segmentation_service_client::SegmentationServiceClient<Intercepted>);

impl GrpcSegments {
    /// A client of the SegmentationService at `endpoint`.
    pub fn new(endpoint: &str, token: Option<&str>) -> Result<Self, Status> {
        Ok(Self(
            pb::segmentation_service_client::SegmentationServiceClient::new(channel(
                endpoint, token,
            )?),
        ))
    }
}

/// The key a membership is known by in decisions: the segment id, `id#k` for cluster `k`.
pub fn membership_key(segment_id: &str, cluster_index: Option<i32>) -> String {
    match cluster_index {
        Some(k) => format!("{segment_id}#{k}"),
        None => segment_id.to_string(),
    }
}

#[async_trait]
impl SegmentSource for GrpcSegments {
    async fn segments(&self, profile_id: &str) -> Result<SegmentFacts, Status> {
        let res = self
            .0
            .clone()
            .get_profile_segments(pb::GetProfileSegmentsRequest {
                profile_id: profile_id.to_string(),
            })
            .await;
        let p = match res {
            Ok(r) => r.into_inner().profile.unwrap_or_default(),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(SegmentFacts::default()),
            Err(s) => return Err(upstream("SegmentationService", s)),
        };
        let features = segment_features(&p);
        Ok(SegmentFacts {
            segments: p
                .memberships
                .iter()
                .flat_map(|m| {
                    let mut keys = vec![m.segment_id.clone()];
                    if m.cluster_index.is_some() {
                        keys.push(membership_key(&m.segment_id, m.cluster_index));
                    }
                    keys
                })
                .collect(),
            lifecycle: p.lifecycle.map(|l| l.state),
            features,
        })
    }
}

/// [`ExperimentSource`] over ExperimentService.
#[derive(Debug, Clone)]
pub struct GrpcExperiments(pb::experiment_service_client::ExperimentServiceClient<Intercepted>);

impl GrpcExperiments {
    /// A client of the ExperimentService at `endpoint`.
    pub fn new(endpoint: &str, token: Option<&str>) -> Result<Self, Status> {
        Ok(Self(
            pb::experiment_service_client::ExperimentServiceClient::new(channel(endpoint, token)?),
        ))
    }
}

#[async_trait]
impl ExperimentSource for GrpcExperiments {
    async fn assign(
        &self,
        experiment_key: &str,
        profile_id: &str,
        log_exposure: bool,
    ) -> Result<Result<Arm, String>, Status> {
        let res = self
            .0
            .clone()
            .assign(pb::AssignRequest {
                experiment_key: experiment_key.to_string(),
                unit_id: profile_id.to_string(),
                profile_id: profile_id.to_string(),
                ..Default::default()
            })
            .await
            .map_err(|s| upstream("ExperimentService", s))?
            .into_inner();
        let a = res.assignment.unwrap_or_default();
        if a.reason == pb::AssignmentReason::Assigned as i32 {
            if log_exposure {
                self.0
                    .clone()
                    .log_exposure(pb::LogExposureRequest {
                        experiment_key: experiment_key.to_string(),
                        unit_id: profile_id.to_string(),
                        variant_index: a.variant_index,
                        profile_id: profile_id.to_string(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|s| upstream("ExperimentService", s))?;
            }
            Ok(Ok(Arm {
                variant_index: a.variant_index,
                variant_key: a.variant_key,
            }))
        } else {
            let reason = pb::AssignmentReason::try_from(a.reason)
                .map_or_else(|_| a.reason.to_string(), |r| r.as_str_name().to_string());
            Ok(Err(reason))
        }
    }
}

/// A source for a dependency that is not configured: every call is UNAVAILABLE naming the
/// missing endpoint, so misconfiguration is loud rather than silently permissive.
#[derive(Debug, Clone)]
pub struct NotConfigured(pub &'static str);

#[async_trait]
impl ConsentSource for NotConfigured {
    async fn profile(&self, _: &str) -> Result<Option<ProfileFacts>, Status> {
        Err(missing(self.0))
    }
}

#[async_trait]
impl SegmentSource for NotConfigured {
    async fn segments(&self, _: &str) -> Result<SegmentFacts, Status> {
        Err(missing(self.0))
    }
}

#[async_trait]
impl ExperimentSource for NotConfigured {
    async fn assign(&self, _: &str, _: &str, _: bool) -> Result<Result<Arm, String>, Status> {
        Err(missing(self.0))
    }
}

fn missing(what: &str) -> Status {
    Status::unavailable(format!("endpoints.{what} is not configured"))
}

fn upstream(service: &str, s: Status) -> Status {
    tracing::warn!(service, code = ?s.code(), message = s.message(), "upstream call failed");
    Status::unavailable(format!("{service} unavailable: {}", s.message()))
}
