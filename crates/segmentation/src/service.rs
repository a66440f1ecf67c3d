//! The tonic implementation of `clientele.v1.SegmentationService`: validates every request
//! (INVALID_ARGUMENT names the field; rule errors carry line:column), and delegates to the
//! [`SegmentationStore`] and the [`Engine`] (batch runs, real-time re-scoring).
//!
//! Nothing is written for a request that fails validation; each write is one store
//! transaction, so a failure never leaves half of it visible.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::time::Duration;

use clientele_proto::v1 as pb;
use clientele_proto::v1::segmentation_service_server::{
    SegmentationService, SegmentationServiceServer,
};
use clientele_runtime::server::Mount;
use clientele_runtime::status::{invalid_field, not_found};
use clientele_runtime::time::{now_micros, timestamp};
use futures::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::engine::{Engine, EngineError};
use crate::scoring::{self, FieldError, compile_definition, is_segment_id, kind_of};
use crate::store::{ChangeRow, MemberRow, RunRecord, ScoreRow, SegmentRecord, StoreError};

/// Default and largest ListSegments page.
const DEFAULT_SEGMENT_PAGE: i64 = 50;
const MAX_SEGMENT_PAGE: i64 = 500;
/// Default and largest ListRecomputes page.
const DEFAULT_RUN_PAGE: i64 = 20;
const MAX_RUN_PAGE: i64 = 100;
/// Default and largest ListSegmentMembers chunk.
const DEFAULT_MEMBER_CHUNK: i64 = 1_000;
const MAX_MEMBER_CHUNK: i64 = 10_000;
/// Heartbeat interval of WatchMembershipChanges while idle.
const HEARTBEAT: Duration = Duration::from_secs(30);

/// Maps store failures to precise statuses; database details are logged, not returned.
impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::SegmentNotFound(id) => not_found("segment", &id),
            StoreError::RunNotFound(id) => not_found("recompute run", &id),
            StoreError::SegmentDeleted(_) => Status::failed_precondition(e.to_string()),
            StoreError::VersionMismatch { .. } | StoreError::CursorMoved(_) => {
                Status::aborted(e.to_string())
            }
            StoreError::Db(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) => {
                tracing::error!(error = %e, "database unavailable");
                Status::unavailable("database unavailable; retry")
            }
            other => {
                tracing::error!(error = %other, "segmentation store failure");
                Status::internal("internal error")
            }
        }
    }
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Store(s) => s.into(),
            EngineError::NoRun => Status::failed_precondition(e.to_string()),
            EngineError::UnknownProfile(id) => not_found("profile", &id),
            EngineError::Upstream(s) => {
                tracing::warn!(error = %s, "profile service call failed");
                Status::unavailable(format!("profile service unavailable: {}", s.message()))
            }
        }
    }
}

impl From<FieldError> for Status {
    fn from(e: FieldError) -> Self {
        invalid_field(&e.field, e.message)
    }
}

/// The cursor string of change log position `seq`.
#[must_use]
pub fn change_cursor(seq: i64) -> String {
    format!("mc:{seq}")
}

fn parse_change_cursor(c: &str) -> Option<i64> {
    c.strip_prefix("mc:")?
        .parse()
        .ok()
        .filter(|n: &i64| *n >= 0)
}

fn encode_token(parts: &[&str]) -> String {
    hex::encode(parts.join("\u{1f}"))
}

fn decode_token(token: &str, n: usize) -> Option<Vec<String>> {
    let raw = String::from_utf8(hex::decode(token).ok()?).ok()?;
    let parts: Vec<String> = raw.split('\u{1f}').map(str::to_owned).collect();
    (parts.len() == n).then_some(parts)
}

fn check_profile_id(field: &str, id: &str) -> Result<String, Status> {
    if id.is_empty() {
        return Err(invalid_field(field, "required"));
    }
    uuid::Uuid::parse_str(id)
        .map(|u| u.to_string())
        .map_err(|_| invalid_field(field, format!("`{id}` is not a UUID")))
}

fn check_segment_id(field: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() {
        Err(invalid_field(field, "required"))
    } else if is_segment_id(id) {
        Ok(())
    } else {
        Err(invalid_field(field, "must match [a-z0-9][a-z0-9_-]{0,63}"))
    }
}

fn check_printable(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() || v.len() > 128 || !v.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(invalid_field(
            field,
            "must be 1 to 128 bytes of printable ASCII",
        ));
    }
    Ok(())
}

fn money(amount: f64, currency: &str) -> pb::Money {
    #[allow(clippy::cast_possible_truncation)]
    pb::Money {
        amount_minor: amount.round() as i64,
        currency: currency.to_owned(),
    }
}

fn run_to_proto(r: &RunRecord, with_outputs: bool) -> pb::Recompute {
    pb::Recompute {
        run_id: r.run_id.clone(),
        state: r.state,
        phase: r.phase,
        processed: r.processed,
        total: r.total,
        create_time: Some(timestamp(r.created_at)),
        start_time: r.start_time.map(timestamp),
        finish_time: r.finish_time.map(timestamp),
        error_message: r.error_message.clone(),
        data_as_of: r.data_as_of.map(timestamp),
        outputs: if with_outputs {
            r.outputs.clone()
        } else {
            None
        },
        changes_cursor: r.changes_cursor.clone(),
        requested_by: r.requested_by.clone(),
    }
}

fn change_to_proto(c: &ChangeRow) -> pb::MembershipChange {
    pb::MembershipChange {
        cursor: if c.seq > 0 {
            change_cursor(c.seq)
        } else {
            String::new()
        },
        change_id: c.change_id.clone(),
        profile_id: c.profile_id.clone(),
        segment: Some(pb::SegmentRef {
            segment_id: c.segment_id.clone(),
            cluster_index: (c.cluster_index >= 0)
                .then(|| i32::try_from(c.cluster_index).unwrap_or(0)),
        }),
        r#type: c.change_type,
        reason: c.reason,
        run_id: c.run_id.clone(),
        occurred_at: Some(timestamp(c.occurred_at)),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The SegmentationService.
#[derive(Debug, Clone)]
pub struct SegmentationServiceImpl {
    engine: Engine,
}

impl SegmentationServiceImpl {
    /// A service over `engine`.
    #[must_use]
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }

    /// The engine (for the consumer and tests).
    #[must_use]
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Adds the service to `mount` with the scope of each method.
    pub fn mount(self, mount: &mut Mount) {
        mount.add(
            "clientele.v1.SegmentationService",
            SegmentationServiceServer::new(self),
            &[
                ("DefineSegment", "segments:write"),
                ("GetSegment", "segments:read"),
                ("ListSegments", "segments:read"),
                ("DeleteSegment", "segments:write"),
                ("GetScoringConfig", "segments:read"),
                ("GetProfileSegments", "segments:read"),
                ("ScoreProfile", "segments:write"),
                ("ListSegmentMembers", "segments:read"),
                ("GetSegmentSummary", "segments:read"),
                ("GetSegmentFlows", "segments:read"),
                ("StartRecompute", "segments:admin"),
                ("GetRecompute", "segments:read"),
                ("ListRecomputes", "segments:read"),
                ("WatchMembershipChanges", "segments:read"),
            ],
        );
    }

    async fn with_size(&self, mut record: SegmentRecord) -> Result<pb::Segment, Status> {
        let id = record.segment.segment_id.clone();
        let sizes = self
            .engine
            .store
            .segment_sizes(std::slice::from_ref(&id))
            .await?;
        record.segment.size = sizes.get(&id).copied().unwrap_or(0);
        Ok(record.segment)
    }

    /// The scores and memberships of a profile as the API shows them.
    fn profile_segments(
        &self,
        profile_id: &str,
        scores: Option<&(ScoreRow, String, i64)>,
        members: &[MemberRow],
        kinds: &HashMap<String, i32>,
    ) -> pb::ProfileSegments {
        let config = &self.engine.config;
        let currency = &config.reporting_currency;
        let mut out = pb::ProfileSegments {
            profile_id: profile_id.to_owned(),
            ..Default::default()
        };
        if let Some((s, run_id, at)) = scores {
            out.run_id.clone_from(run_id);
            out.scored_at = Some(timestamp(*at));
            if let (Some((r, f, m)), Some(name)) = (s.rfm, &s.rfm_name) {
                out.rfm = Some(pb::RfmScore {
                    recency: i32::try_from(r).unwrap_or(0),
                    frequency: i32::try_from(f).unwrap_or(0),
                    monetary: i32::try_from(m).unwrap_or(0),
                    segment: scoring::rfm_segment_enum(name) as i32,
                    segment_name: name.clone(),
                    recency_days: s.recency_days.unwrap_or(0.0),
                    frequency_orders: i32::try_from(s.frequency.unwrap_or(0)).unwrap_or(i32::MAX),
                    #[allow(clippy::cast_precision_loss)]
                    monetary_value: Some(money(s.monetary_minor.unwrap_or(0) as f64, currency)),
                });
            }
            if let Some(l) = s.lifecycle {
                out.lifecycle = Some(pb::LifecycleStatus {
                    state: i32::try_from(l).unwrap_or(0),
                    since: s.lifecycle_since.map(timestamp),
                });
            }
            if let (Some(clv), Some(p)) = (s.clv, s.p_alive) {
                out.predicted = Some(pb::PredictedValue {
                    clv: Some(money(clv, currency)),
                    p_alive: p,
                    expected_purchases: s.exp_purchases.unwrap_or(0.0),
                    expected_order_value: Some(money(s.exp_aov.unwrap_or(0.0), currency)),
                    horizon: Some(prost_types::Duration {
                        seconds: i64::from(config.horizon_days) * 86_400,
                        nanos: 0,
                    }),
                });
            }
        }
        let mut members: Vec<&MemberRow> = members.iter().collect();
        members.sort_by(|a, b| a.segment_id.cmp(&b.segment_id));
        out.memberships = members
            .into_iter()
            .map(|m| pb::Membership {
                segment_id: m.segment_id.clone(),
                kind: kinds.get(&m.segment_id).copied().unwrap_or(0),
                cluster_index: (m.cluster_index >= 0)
                    .then(|| i32::try_from(m.cluster_index).unwrap_or(0)),
                centroid_distance: if m.cluster_index >= 0 {
                    m.distance
                } else {
                    None
                },
                entered_at: Some(timestamp(m.entered_at)),
            })
            .collect();
        out
    }

    async fn kinds(&self) -> Result<HashMap<String, i32>, Status> {
        Ok(self
            .engine
            .store
            .live_segments()
            .await?
            .into_iter()
            .map(|r| (r.segment.segment_id, r.kind))
            .collect())
    }

    /// Checks a SegmentRef against its segment; returns the cluster filter.
    async fn check_ref(
        &self,
        field: &str,
        r: Option<&pb::SegmentRef>,
    ) -> Result<(SegmentRecord, Option<i64>), Status> {
        let r = r.ok_or_else(|| invalid_field(field, "required"))?;
        check_segment_id(&format!("{field}.segment_id"), &r.segment_id)?;
        let record = self.engine.store.get_segment(&r.segment_id).await?;
        if record.deleted {
            return Err(not_found("segment", &r.segment_id));
        }
        let cluster = match r.cluster_index {
            None => None,
            Some(c) => {
                let f = format!("{field}.cluster_index");
                let Some(pb::segment::Definition::Cluster(def)) = &record.segment.definition else {
                    return Err(invalid_field(&f, "only CLUSTER segments have clusters"));
                };
                let k = if def.k > 0 { def.k } else { 50 };
                if !(0..k).contains(&c) {
                    return Err(invalid_field(&f, format!("must be 0..{k}")));
                }
                Some(i64::from(c))
            }
        };
        Ok((record, cluster))
    }

    async fn snapshot_run(&self, field: &str, run_id: &str) -> Result<RunRecord, Status> {
        let run =
            if run_id.is_empty() {
                self.engine.store.latest_run().await?.ok_or_else(|| {
                    Status::failed_precondition("no recompute run has succeeded yet")
                })?
            } else {
                let run = self.engine.store.get_run(run_id).await?;
                if run.state != pb::RecomputeState::Succeeded as i32 {
                    return Err(Status::failed_precondition(format!(
                        "{field}: run `{run_id}` has not succeeded"
                    )));
                }
                run
            };
        if !self.engine.store.run_retained(&run.run_id).await? {
            // An empty run (no profiles) has no rows either; only refuse older runs.
            let latest = self.engine.store.latest_run().await?;
            if latest.is_none_or(|l| l.run_id != run.run_id) {
                return Err(Status::failed_precondition(format!(
                    "{field}: the snapshot of run `{}` is no longer retained",
                    run.run_id
                )));
            }
        }
        Ok(run)
    }
}

#[tonic::async_trait]
impl SegmentationService for SegmentationServiceImpl {
    async fn define_segment(
        &self,
        request: Request<pb::DefineSegmentRequest>,
    ) -> Result<Response<pb::DefineSegmentResponse>, Status> {
        let req = request.into_inner();
        let segment = req
            .segment
            .ok_or_else(|| invalid_field("segment", "required"))?;
        check_segment_id("segment.segment_id", &segment.segment_id)?;
        if segment.display_name.is_empty() || segment.display_name.len() > 128 {
            return Err(invalid_field(
                "segment.display_name",
                "must be 1 to 128 bytes",
            ));
        }
        if segment.description.len() > 2048 {
            return Err(invalid_field("segment.description", "at most 2048 bytes"));
        }
        if req.expected_version < 0 {
            return Err(invalid_field("expected_version", "must not be negative"));
        }
        let mut referencable = self.engine.referencable_segments().await?;
        referencable.retain(|id| id != &segment.segment_id);
        compile_definition(&segment, &self.engine.config, &referencable)?;
        let kind = segment
            .definition
            .as_ref()
            .map_or(pb::SegmentKind::Unspecified, kind_of);
        let (record, created) = self
            .engine
            .store
            .define_segment(&segment, kind as i32, req.expected_version, now_micros())
            .await?;
        Ok(Response::new(pb::DefineSegmentResponse {
            segment: Some(self.with_size(record).await?),
            created,
        }))
    }

    async fn get_segment(
        &self,
        request: Request<pb::GetSegmentRequest>,
    ) -> Result<Response<pb::GetSegmentResponse>, Status> {
        let id = request.into_inner().segment_id;
        check_segment_id("segment_id", &id)?;
        let record = self.engine.store.get_segment(&id).await?;
        if record.deleted {
            return Err(not_found("segment", &id));
        }
        Ok(Response::new(pb::GetSegmentResponse {
            segment: Some(self.with_size(record).await?),
        }))
    }

    async fn list_segments(
        &self,
        request: Request<pb::ListSegmentsRequest>,
    ) -> Result<Response<pb::ListSegmentsResponse>, Status> {
        let req = request.into_inner();
        for (i, k) in req.kinds.iter().enumerate() {
            match pb::SegmentKind::try_from(*k) {
                Ok(pb::SegmentKind::Unspecified) | Err(_) => {
                    return Err(invalid_field(
                        &format!("kinds[{i}]"),
                        "must be a known kind",
                    ));
                }
                Ok(_) => {}
            }
        }
        if req.page_size < 0 {
            return Err(invalid_field("page_size", "must not be negative"));
        }
        let size = match i64::from(req.page_size) {
            0 => DEFAULT_SEGMENT_PAGE,
            n => n.min(MAX_SEGMENT_PAGE),
        };
        let after = if req.page_token.is_empty() {
            String::new()
        } else {
            decode_token(&req.page_token, 1)
                .and_then(|mut p| p.pop())
                .ok_or_else(|| invalid_field("page_token", "not a token from ListSegments"))?
        };
        let mut records = self
            .engine
            .store
            .list_segments(&req.kinds, &after, size + 1)
            .await?;
        let more = i64::try_from(records.len()).unwrap_or(0) > size;
        records.truncate(usize::try_from(size).unwrap_or(0));
        let ids: Vec<String> = records
            .iter()
            .map(|r| r.segment.segment_id.clone())
            .collect();
        let sizes = self.engine.store.segment_sizes(&ids).await?;
        let next = if more {
            ids.last().map(|l| encode_token(&[l])).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListSegmentsResponse {
            segments: records
                .into_iter()
                .map(|mut r| {
                    r.segment.size = sizes.get(&r.segment.segment_id).copied().unwrap_or(0);
                    r.segment
                })
                .collect(),
            next_page_token: next,
        }))
    }

    async fn delete_segment(
        &self,
        request: Request<pb::DeleteSegmentRequest>,
    ) -> Result<Response<pb::DeleteSegmentResponse>, Status> {
        let id = request.into_inner().segment_id;
        check_segment_id("segment_id", &id)?;
        let changes = self.engine.store.delete_segment(&id, now_micros()).await?;
        if !changes.is_empty() {
            self.engine.changed.notify_waiters();
        }
        Ok(Response::new(pb::DeleteSegmentResponse {}))
    }

    async fn get_scoring_config(
        &self,
        _request: Request<pb::GetScoringConfigRequest>,
    ) -> Result<Response<pb::GetScoringConfigResponse>, Status> {
        Ok(Response::new(pb::GetScoringConfigResponse {
            config: Some(self.engine.config.to_proto()),
        }))
    }

    async fn get_profile_segments(
        &self,
        request: Request<pb::GetProfileSegmentsRequest>,
    ) -> Result<Response<pb::GetProfileSegmentsResponse>, Status> {
        let id = check_profile_id("profile_id", &request.into_inner().profile_id)?;
        let id = self
            .engine
            .store
            .resolve_profile(&id)
            .await?
            .ok_or_else(|| not_found("profile", &id))?;
        let scores = self.engine.store.profile_scores(&id).await?;
        let members = self
            .engine
            .store
            .memberships_of(std::slice::from_ref(&id))
            .await?;
        let kinds = self.kinds().await?;
        Ok(Response::new(pb::GetProfileSegmentsResponse {
            profile: Some(self.profile_segments(&id, scores.as_ref(), &members, &kinds)),
        }))
    }

    async fn score_profile(
        &self,
        request: Request<pb::ScoreProfileRequest>,
    ) -> Result<Response<pb::ScoreProfileResponse>, Status> {
        let req = request.into_inner();
        let id = check_profile_id("profile_id", &req.profile_id)?;
        let id = self
            .engine
            .store
            .resolve_profile(&id)
            .await?
            .ok_or_else(|| not_found("profile", &id))?;
        let current = self
            .engine
            .store
            .memberships_of(std::slice::from_ref(&id))
            .await?;
        let (rescored, changes) = self
            .engine
            .rescore(std::slice::from_ref(&id), req.dry_run)
            .await?;
        let r = rescored
            .into_iter()
            .next()
            .ok_or_else(|| not_found("profile", &id))?;
        let now = now_micros();
        let kinds = self.kinds().await?;
        let changes = if req.dry_run {
            // What would change, without cursors.
            let before: BTreeMap<&str, i64> = current
                .iter()
                .map(|m| (m.segment_id.as_str(), m.cluster_index))
                .collect();
            let after: BTreeMap<&str, i64> = r
                .members
                .iter()
                .map(|m| (m.segment_id.as_str(), m.cluster_index))
                .collect();
            let mut out = Vec::new();
            let segs: BTreeSet<&str> = before.keys().chain(after.keys()).copied().collect();
            for s in segs {
                let (b, a) = (before.get(s), after.get(s));
                if b == a {
                    continue;
                }
                let mk = |c: i64, t: pb::MembershipChangeType| ChangeRow {
                    seq: 0,
                    change_id: uuid::Uuid::new_v4().to_string(),
                    profile_id: id.clone(),
                    segment_id: s.to_owned(),
                    cluster_index: c,
                    change_type: t as i32,
                    reason: pb::MembershipChangeReason::Realtime as i32,
                    run_id: String::new(),
                    occurred_at: now,
                };
                if let Some(c) = b {
                    out.push(mk(*c, pb::MembershipChangeType::Exited));
                }
                if let Some(c) = a {
                    out.push(mk(*c, pb::MembershipChangeType::Entered));
                }
            }
            out
        } else {
            changes
        };
        let entered: HashMap<&str, i64> = current
            .iter()
            .filter(|m| {
                r.members
                    .iter()
                    .any(|n| n.segment_id == m.segment_id && n.cluster_index == m.cluster_index)
            })
            .map(|m| (m.segment_id.as_str(), m.entered_at))
            .collect();
        let members: Vec<MemberRow> = r
            .members
            .iter()
            .map(|m| MemberRow {
                entered_at: entered.get(m.segment_id.as_str()).copied().unwrap_or(now),
                ..m.clone()
            })
            .collect();
        let run_id = self
            .engine
            .store
            .latest_run()
            .await?
            .map(|x| x.run_id)
            .unwrap_or_default();
        let scores = (r.row.clone(), run_id, now);
        Ok(Response::new(pb::ScoreProfileResponse {
            profile: Some(self.profile_segments(&id, Some(&scores), &members, &kinds)),
            changes: changes.iter().map(change_to_proto).collect(),
        }))
    }

    type ListSegmentMembersStream = BoxStream<pb::ListSegmentMembersResponse>;

    async fn list_segment_members(
        &self,
        request: Request<pb::ListSegmentMembersRequest>,
    ) -> Result<Response<Self::ListSegmentMembersStream>, Status> {
        let req = request.into_inner();
        let (record, cluster) = self.check_ref("segment", req.segment.as_ref()).await?;
        if req.page_size < 0 {
            return Err(invalid_field("page_size", "must not be negative"));
        }
        let size = match i64::from(req.page_size) {
            0 => DEFAULT_MEMBER_CHUNK,
            n => n.min(MAX_MEMBER_CHUNK),
        };
        let segment_id = record.segment.segment_id.clone();
        let cluster_s = cluster.map(|c| c.to_string()).unwrap_or_default();
        let (run_id, mut after) = if req.page_token.is_empty() {
            if !req.run_id.is_empty() {
                check_profile_id("run_id", &req.run_id)?;
            }
            (
                self.snapshot_run("run_id", &req.run_id).await?.run_id,
                String::new(),
            )
        } else {
            let parts = decode_token(&req.page_token, 4)
                .filter(|p| p[1] == segment_id && p[2] == cluster_s)
                .ok_or_else(|| {
                    invalid_field("page_token", "not a token of this segment's member listing")
                })?;
            let run = self.snapshot_run("page_token", &parts[0]).await?;
            (run.run_id, parts[3].clone())
        };
        let store = self.engine.store.clone();
        let total = store
            .run_member_count(&run_id, &segment_id, cluster)
            .await?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let rows = match store
                    .run_members(&run_id, &segment_id, cluster, &after, size + 1)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                let more = i64::try_from(rows.len()).unwrap_or(0) > size;
                let rows: Vec<(String, i64)> = rows
                    .into_iter()
                    .take(usize::try_from(size).unwrap_or(0))
                    .collect();
                if let Some((last, _)) = rows.last() {
                    after.clone_from(last);
                }
                let next = if more {
                    encode_token(&[&run_id, &segment_id, &cluster_s, &after])
                } else {
                    String::new()
                };
                let msg = pb::ListSegmentMembersResponse {
                    members: rows
                        .into_iter()
                        .map(|(p, c)| pb::SegmentMember {
                            profile_id: p,
                            cluster_index: (c >= 0).then(|| i32::try_from(c).unwrap_or(0)),
                        })
                        .collect(),
                    next_page_token: next,
                    run_id: run_id.clone(),
                    total_members: total,
                };
                if tx.send(Ok(msg)).await.is_err() || !more {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_segment_summary(
        &self,
        request: Request<pb::GetSegmentSummaryRequest>,
    ) -> Result<Response<pb::GetSegmentSummaryResponse>, Status> {
        let req = request.into_inner();
        let (record, cluster) = self.check_ref("segment", req.segment.as_ref()).await?;
        if !req.run_id.is_empty() {
            check_profile_id("run_id", &req.run_id)?;
        }
        let run = self.snapshot_run("run_id", &req.run_id).await?;
        let store = &self.engine.store;
        let s = store
            .run_summary(&run.run_id, &record.segment.segment_id, cluster)
            .await?;
        let (scored, total_revenue) = store.run_totals(&run.run_id).await?;
        let currency = &self.engine.config.reporting_currency;
        #[allow(clippy::cast_precision_loss)]
        let ratio = |a: i64, b: i64| if b > 0 { a as f64 / b as f64 } else { 0.0 };
        #[allow(clippy::cast_precision_loss)]
        Ok(Response::new(pb::GetSegmentSummaryResponse {
            run_id: run.run_id.clone(),
            size: s.size,
            share_of_customers: ratio(s.size, scored).min(1.0),
            mean_recency_score: s.mean_rfm.0,
            mean_frequency_score: s.mean_rfm.1,
            mean_monetary_score: s.mean_rfm.2,
            mean_recency_days: s.mean_recency_days,
            mean_frequency_orders: s.mean_frequency,
            revenue: Some(money(s.revenue as f64, currency)),
            total_revenue: Some(money(total_revenue as f64, currency)),
            revenue_share: ratio(s.revenue, total_revenue),
            mean_predicted_clv: Some(money(s.mean_clv, currency)),
            mean_p_alive: s.mean_p_alive,
        }))
    }

    async fn get_segment_flows(
        &self,
        request: Request<pb::GetSegmentFlowsRequest>,
    ) -> Result<Response<pb::GetSegmentFlowsResponse>, Status> {
        use pb::flow_dimension::Dimension as D;
        use pb::flow_group::Group as G;
        let req = request.into_inner();
        for (field, id) in [
            ("from_run_id", &req.from_run_id),
            ("to_run_id", &req.to_run_id),
        ] {
            check_profile_id(field, id)?;
        }
        let dimension = req
            .dimension
            .and_then(|d| d.dimension)
            .ok_or_else(|| invalid_field("dimension", "required"))?;
        let from = self.snapshot_run("from_run_id", &req.from_run_id).await?;
        let to = self.snapshot_run("to_run_id", &req.to_run_id).await?;
        if (from.finish_time, &from.run_id) >= (to.finish_time, &to.run_id) {
            return Err(invalid_field("to_run_id", "must be newer than from_run_id"));
        }
        let store = &self.engine.store;
        // profile → groups at each run.
        type Groups = HashMap<String, Vec<Option<G>>>;
        let (a, b): (Groups, Groups) = match dimension {
            D::RfmSegments(true) | D::LifecycleStates(true) => {
                let rfm = matches!(dimension, D::RfmSegments(_));
                let dim = if rfm { "rfm" } else { "lifecycle" };
                let to_group = |v: String| {
                    if rfm {
                        Some(G::RfmSegmentName(v))
                    } else {
                        Some(G::LifecycleState(v.parse().unwrap_or(0)))
                    }
                };
                let a = store.run_score_groups(&from.run_id, dim).await?;
                let b = store.run_score_groups(&to.run_id, dim).await?;
                (
                    a.into_iter().map(|(p, g)| (p, vec![to_group(g)])).collect(),
                    b.into_iter().map(|(p, g)| (p, vec![to_group(g)])).collect(),
                )
            }
            D::RfmSegments(false) => {
                return Err(invalid_field(
                    "dimension.rfm_segments",
                    "must be true when chosen",
                ));
            }
            D::LifecycleStates(false) => {
                return Err(invalid_field(
                    "dimension.lifecycle_states",
                    "must be true when chosen",
                ));
            }
            D::ClusterSegmentId(id) => {
                check_segment_id("dimension.cluster_segment_id", &id)?;
                let record = store.get_segment(&id).await?;
                if record.kind != pb::SegmentKind::Cluster as i32 {
                    return Err(invalid_field(
                        "dimension.cluster_segment_id",
                        "must be a CLUSTER segment",
                    ));
                }
                let version = |r: &RunRecord| {
                    r.outputs.as_ref().and_then(|o| {
                        o.clusters
                            .iter()
                            .find(|c| c.segment_id == id)
                            .map(|c| c.segment_version)
                    })
                };
                if version(&from) != version(&to) {
                    return Err(Status::failed_precondition(format!(
                        "the definition of `{id}` changed between the two runs; cluster indexes are not comparable"
                    )));
                }
                let ids = vec![id];
                let rows = |rows: Vec<(String, String, i64)>| -> Groups {
                    rows.into_iter()
                        .map(|(p, _, c)| {
                            (
                                p,
                                vec![Some(G::ClusterIndex(i32::try_from(c).unwrap_or(0)))],
                            )
                        })
                        .collect()
                };
                (
                    rows(store.run_member_rows(&from.run_id, &ids).await?),
                    rows(store.run_member_rows(&to.run_id, &ids).await?),
                )
            }
            D::Segments(list) => {
                let ids = list.segment_ids;
                if ids.len() < 2 || ids.len() > 50 {
                    return Err(invalid_field(
                        "dimension.segments.segment_ids",
                        "2 to 50 ids",
                    ));
                }
                let mut seen = BTreeSet::new();
                for (i, id) in ids.iter().enumerate() {
                    let f = format!("dimension.segments.segment_ids[{i}]");
                    check_segment_id(&f, id)?;
                    if !seen.insert(id) {
                        return Err(invalid_field(&f, "duplicate id"));
                    }
                }
                let rows = |rows: Vec<(String, String, i64)>| -> Groups {
                    let mut g: Groups = HashMap::new();
                    for (p, s, _) in rows {
                        g.entry(p).or_default().push(Some(G::SegmentId(s)));
                    }
                    g
                };
                (
                    rows(store.run_member_rows(&from.run_id, &ids).await?),
                    rows(store.run_member_rows(&to.run_id, &ids).await?),
                )
            }
        };
        let outside = vec![None];
        let profiles: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        let mut cells: BTreeMap<(String, String), (Option<G>, Option<G>, i64)> = BTreeMap::new();
        for p in profiles {
            for ga in a.get(p).unwrap_or(&outside) {
                for gb in b.get(p).unwrap_or(&outside) {
                    let key = (format!("{ga:?}"), format!("{gb:?}"));
                    cells
                        .entry(key)
                        .or_insert_with(|| (ga.clone(), gb.clone(), 0))
                        .2 += 1;
                }
            }
        }
        Ok(Response::new(pb::GetSegmentFlowsResponse {
            cells: cells
                .into_values()
                .map(|(f, t, n)| pb::FlowCell {
                    from: Some(pb::FlowGroup { group: f }),
                    to: Some(pb::FlowGroup { group: t }),
                    profiles: n,
                })
                .collect(),
        }))
    }

    async fn start_recompute(
        &self,
        request: Request<pb::StartRecomputeRequest>,
    ) -> Result<Response<pb::StartRecomputeResponse>, Status> {
        let req = request.into_inner();
        check_printable("idempotency_key", &req.idempotency_key)?;
        check_printable("requested_by", &req.requested_by)?;
        let record = RunRecord {
            run_id: uuid::Uuid::new_v4().to_string(),
            idempotency_key: req.idempotency_key,
            requested_by: req.requested_by,
            state: pb::RecomputeState::Pending as i32,
            phase: 0,
            processed: 0,
            total: 0,
            created_at: now_micros(),
            start_time: None,
            finish_time: None,
            error_message: String::new(),
            data_as_of: None,
            outputs: None,
            changes_cursor: String::new(),
            model: None,
        };
        let (run, created) = self.engine.store.start_run(&record).await?;
        if created {
            let engine = self.engine.clone();
            let id = run.run_id.clone();
            tokio::spawn(async move { engine.run_recompute_or_fail(&id).await });
        }
        Ok(Response::new(pb::StartRecomputeResponse {
            run: Some(run_to_proto(&run, true)),
            created,
        }))
    }

    async fn get_recompute(
        &self,
        request: Request<pb::GetRecomputeRequest>,
    ) -> Result<Response<pb::GetRecomputeResponse>, Status> {
        let id = check_profile_id("run_id", &request.into_inner().run_id)?;
        let run = self.engine.store.get_run(&id).await?;
        Ok(Response::new(pb::GetRecomputeResponse {
            run: Some(run_to_proto(&run, true)),
        }))
    }

    async fn list_recomputes(
        &self,
        request: Request<pb::ListRecomputesRequest>,
    ) -> Result<Response<pb::ListRecomputesResponse>, Status> {
        let req = request.into_inner();
        for (i, s) in req.states.iter().enumerate() {
            match pb::RecomputeState::try_from(*s) {
                Ok(pb::RecomputeState::Unspecified) | Err(_) => {
                    return Err(invalid_field(
                        &format!("states[{i}]"),
                        "must be a known state",
                    ));
                }
                Ok(_) => {}
            }
        }
        if req.page_size < 0 {
            return Err(invalid_field("page_size", "must not be negative"));
        }
        let size = match i64::from(req.page_size) {
            0 => DEFAULT_RUN_PAGE,
            n => n.min(MAX_RUN_PAGE),
        };
        let before = if req.page_token.is_empty() {
            None
        } else {
            let p = decode_token(&req.page_token, 2)
                .and_then(|p| Some((p[0].parse::<i64>().ok()?, p[1].clone())))
                .ok_or_else(|| invalid_field("page_token", "not a token from ListRecomputes"))?;
            Some(p)
        };
        let mut runs = self
            .engine
            .store
            .list_runs(&req.states, before, size + 1)
            .await?;
        let more = i64::try_from(runs.len()).unwrap_or(0) > size;
        runs.truncate(usize::try_from(size).unwrap_or(0));
        let next = match runs.last() {
            Some(l) if more => encode_token(&[&l.created_at.to_string(), &l.run_id]),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListRecomputesResponse {
            runs: runs.iter().map(|r| run_to_proto(r, false)).collect(),
            next_page_token: next,
        }))
    }

    type WatchMembershipChangesStream = BoxStream<pb::WatchMembershipChangesResponse>;

    async fn watch_membership_changes(
        &self,
        request: Request<pb::WatchMembershipChangesRequest>,
    ) -> Result<Response<Self::WatchMembershipChangesStream>, Status> {
        use pb::watch_membership_changes_request::Start;
        let req = request.into_inner();
        let store = self.engine.store.clone();
        let end = store.changes_end().await?;
        let mut after = match req.start {
            Some(Start::AfterCursor(c)) => {
                let n = parse_change_cursor(&c).ok_or_else(|| {
                    invalid_field("after_cursor", "not a membership-change cursor")
                })?;
                if n > end {
                    return Err(Status::out_of_range(
                        "after_cursor is beyond the end of the log",
                    ));
                }
                n
            }
            Some(Start::FromNow(true)) => end,
            Some(Start::FromNow(false)) => {
                return Err(invalid_field("from_now", "must be true when chosen"));
            }
            None => return Err(invalid_field("start", "set after_cursor or from_now")),
        };
        let mut filters: Vec<(String, Option<i64>)> = Vec::new();
        for (i, s) in req.segments.iter().enumerate() {
            check_segment_id(&format!("segments[{i}].segment_id"), &s.segment_id)?;
            if let Some(c) = s.cluster_index
                && c < 0
            {
                return Err(invalid_field(
                    &format!("segments[{i}].cluster_index"),
                    "must not be negative",
                ));
            }
            filters.push((s.segment_id.clone(), s.cluster_index.map(i64::from)));
        }
        for (i, t) in req.types.iter().enumerate() {
            match pb::MembershipChangeType::try_from(*t) {
                Ok(pb::MembershipChangeType::Unspecified) | Err(_) => {
                    return Err(invalid_field(
                        &format!("types[{i}]"),
                        "must be a known type",
                    ));
                }
                Ok(_) => {}
            }
        }
        let types = req.types;
        let changed = self.engine.changed.clone();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let mut last_sent = tokio::time::Instant::now();
            loop {
                let notified = changed.notified();
                let rows = match store.changes_after(after, 500).await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                let empty = rows.is_empty();
                let mut sent = false;
                for c in rows {
                    after = c.seq;
                    let seg_ok = filters.is_empty()
                        || filters.iter().any(|(s, ci)| {
                            *s == c.segment_id && ci.is_none_or(|ci| ci == c.cluster_index)
                        });
                    if !seg_ok || !(types.is_empty() || types.contains(&c.change_type)) {
                        continue;
                    }
                    let msg = pb::WatchMembershipChangesResponse {
                        kind: Some(pb::watch_membership_changes_response::Kind::Change(
                            change_to_proto(&c),
                        )),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    sent = true;
                }
                if sent {
                    last_sent = tokio::time::Instant::now();
                } else if !empty || last_sent.elapsed() >= HEARTBEAT {
                    let msg = pb::WatchMembershipChangesResponse {
                        kind: Some(
                            pb::watch_membership_changes_response::Kind::HeartbeatCursor(
                                change_cursor(after),
                            ),
                        ),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    last_sent = tokio::time::Instant::now();
                }
                if empty {
                    tokio::select! {
                        () = notified => {},
                        () = tokio::time::sleep(Duration::from_millis(500)) => {},
                        () = tx.closed() => return,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
