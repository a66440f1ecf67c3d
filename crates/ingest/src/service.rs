//! The tonic implementation of `clientele.v1.IngestService`.
//!
//! Every ingesting RPC runs the same pipeline per batch: validate each event (a bad event is
//! REJECTED naming its field; the others continue), deduplicate within the batch, resolve all
//! identifier sets in ONE ProfileService.BatchResolve call, except those the
//! [`crate::identity_cache`] answers (erased identifiers make the event SUPPRESSED), then commit the batch in one store transaction (the log rows with their dedup
//! keys and aggregate deltas together) before answering. Only committed events are ever acknowledged. A bounded
//! number of batches is processed at once; beyond it callers get RESOURCE_EXHAUSTED after a
//! short wait instead of queueing without bound.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clientele_proto::v1 as pb;
use clientele_proto::v1::ingest_service_server::{IngestService, IngestServiceServer};
use clientele_proto::v1::profile_service_client::ProfileServiceClient;
use clientele_runtime::client::ClientInterceptor;
use clientele_runtime::server::Mount;
use clientele_runtime::settings::IngestSettings;
use clientele_runtime::status::{invalid_field, violated_field};
use clientele_runtime::time::now_micros;
use futures::StreamExt as _;
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio_stream::Stream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::identity_cache::IdentityCache;
use crate::store::{
    CommitTurn, EventQuery, EventStore, LookedUpKeys, NewEvent, Outcome, StoreError, StreamMark,
};
use crate::validate::{self, FieldError, Limits, ValidEvent};

/// Most events in one IngestBatch or stream batch.
pub const MAX_BATCH_EVENTS: usize = 500;
/// Largest batch, bytes of encoded events.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Default and largest ListProfileEvents page.
pub const DEFAULT_PAGE: i64 = 100;
/// Largest ListProfileEvents page.
pub const MAX_PAGE: i64 = 1000;
/// Batch results replayed on `open` at most.
const MAX_REPLAY: u64 = 10_000;
/// Batches of one IngestStream being validated and resolved at once.
const PREPARE_AHEAD: usize = 2;
/// Batches of one IngestStream committing at once (only one holds the log lock; the next
/// sends its batch and looks up its keys meanwhile).
const COMMIT_AHEAD: usize = 2;
/// Idle IngestStream heartbeat interval.
const HEARTBEAT: Duration = Duration::from_secs(20);

/// The ProfileService client ingest uses (bearer token and trace context added).
pub type ProfileClient = ProfileServiceClient<InterceptedService<Channel, ClientInterceptor>>;

/// Maps store failures to precise statuses; database details are logged, not returned.
impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Sequence { .. } => Status::aborted(format!(
                "{e}; another stream of this producer is active (the newest stream wins)"
            )),
            StoreError::CursorMoved(_) => Status::aborted(e.to_string()),
            StoreError::Db(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) => {
                tracing::error!(error = %e, "database unavailable");
                Status::unavailable("database unavailable; retry")
            }
            other => {
                tracing::error!(error = %other, "event store failure");
                Status::internal("internal error")
            }
        }
    }
}

/// The IngestService.
#[derive(Debug, Clone)]
pub struct IngestServiceImpl {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn EventStore>,
    profiles: ProfileClient,
    settings: IngestSettings,
    admission: Semaphore,
    /// Fired after each commit: wakes the forwarder and WatchEvents streams.
    committed: Arc<Notify>,
    /// Live IngestStream generation per producer id (the newest stream wins).
    producers: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Identifiers already linked to a live profile; shared with the change feed consumer
    /// ([`Self::erasure`]), which applies merges and erasures to it.
    identities: Arc<IdentityCache>,
    /// Set once this process has checked that the log hands out positions above the ones
    /// ProfileService already holds for it ([`IngestServiceImpl::check_log_positions`]).
    positions_checked: tokio::sync::OnceCell<()>,
}

/// One event's path in the pipeline.
#[derive(Debug, Clone)]
enum Slot {
    /// Final before the store (rejected, suppressed).
    Done(pb::EventResult),
    /// Goes to the store as `new[i]`.
    New(usize),
    /// Repeats an earlier event of the same batch: (its index, same content?).
    Repeat(usize, bool),
}

/// A validated and resolved batch, ready to commit.
#[derive(Debug)]
struct Prepared {
    event_ids: Vec<String>,
    slots: Vec<Slot>,
    new: Vec<NewEvent>,
    /// Prefix of field paths in messages (`events` gives `events[3].…`).
    prefix: String,
    /// The log's answer for the batch's keys, looked up beside its BatchResolve.
    looked_up: Option<LookedUpKeys>,
}

fn rejected(
    index: usize,
    event_id: &str,
    code: tonic::Code,
    field: &str,
    message: String,
) -> pb::EventResult {
    pb::EventResult {
        index: i32::try_from(index).unwrap_or(i32::MAX),
        event_id: event_id.to_string(),
        status: pb::EventStatus::Rejected as i32,
        error: Some(pb::EventError {
            code: code as i32,
            field_path: field.to_string(),
            message,
            retryable: matches!(
                code,
                tonic::Code::Unavailable | tonic::Code::Internal | tonic::Code::ResourceExhausted
            ),
        }),
        ..Default::default()
    }
}

fn field_message(prefix: &str, index: usize, e: &FieldError) -> String {
    if e.field.is_empty() {
        format!("{prefix}[{index}]: {}", e.message)
    } else {
        format!("{prefix}[{index}].{}: {}", e.field, e.message)
    }
}

impl Prepared {
    /// Final results from the store's outcomes for `new`.
    fn finish(&self, outcomes: &[Outcome]) -> Vec<pb::EventResult> {
        let mut out: Vec<pb::EventResult> = Vec::with_capacity(self.slots.len());
        for (i, slot) in self.slots.iter().enumerate() {
            let id = &self.event_ids[i];
            let r = match slot {
                Slot::Done(r) => r.clone(),
                Slot::New(n) => {
                    let base = pb::EventResult {
                        index: i32::try_from(i).unwrap_or(i32::MAX),
                        event_id: id.clone(),
                        ..Default::default()
                    };
                    match &outcomes[*n] {
                        Outcome::Accepted => pb::EventResult {
                            status: pb::EventStatus::Accepted as i32,
                            profile_id: self.new[*n].profile_id.clone(),
                            ..base
                        },
                        Outcome::Duplicate(pid) => pb::EventResult {
                            status: pb::EventStatus::Duplicate as i32,
                            profile_id: pid.clone(),
                            ..base
                        },
                        Outcome::Conflict(pid) => pb::EventResult {
                            profile_id: pid.clone(),
                            conflicting_duplicate: true,
                            ..rejected(
                                i,
                                id,
                                tonic::Code::AlreadyExists,
                                "event_id",
                                format!(
                                    "{}[{i}].event_id: an event with this (source, event_id) was already accepted with different content",
                                    self.prefix
                                ),
                            )
                        },
                    }
                }
                Slot::Repeat(first, same) => {
                    let f = &out[*first];
                    let accepted_or_dup = f.status == pb::EventStatus::Accepted as i32
                        || f.status == pb::EventStatus::Duplicate as i32;
                    if *same && accepted_or_dup {
                        pb::EventResult {
                            index: i32::try_from(i).unwrap_or(i32::MAX),
                            event_id: id.clone(),
                            status: pb::EventStatus::Duplicate as i32,
                            profile_id: f.profile_id.clone(),
                            ..Default::default()
                        }
                    } else if *same {
                        pb::EventResult {
                            index: i32::try_from(i).unwrap_or(i32::MAX),
                            ..f.clone()
                        }
                    } else {
                        pb::EventResult {
                            profile_id: f.profile_id.clone(),
                            conflicting_duplicate: true,
                            ..rejected(
                                i,
                                id,
                                tonic::Code::AlreadyExists,
                                "event_id",
                                format!(
                                    "{}[{i}].event_id: repeats events[{first}] of this batch with different content",
                                    self.prefix
                                ),
                            )
                        }
                    }
                }
            };
            out.push(r);
        }
        out
    }
}

fn batch_result(sequence: u64, results: &[pb::EventResult]) -> pb::BatchResult {
    let mut b = pb::BatchResult {
        sequence,
        ..Default::default()
    };
    for r in results {
        match pb::EventStatus::try_from(r.status).unwrap_or_default() {
            pb::EventStatus::Accepted => {
                b.accepted += 1;
                continue;
            }
            pb::EventStatus::Duplicate => b.duplicates += 1,
            pb::EventStatus::Suppressed => b.suppressed += 1,
            _ => b.rejected += 1,
        }
        b.non_accepted.push(r.clone());
    }
    b
}

impl IngestServiceImpl {
    /// A service over `store`, resolving identities and forwarding aggregates through
    /// `profiles`.
    pub fn new(
        store: Arc<dyn EventStore>,
        profiles: ProfileClient,
        settings: IngestSettings,
    ) -> Self {
        let permits = usize::try_from(settings.max_in_flight_batches.max(1)).unwrap_or(1);
        let identities = Arc::new(IdentityCache::new(
            settings.identity_cache_entries,
            Duration::from_secs(settings.identity_cache_ttl_secs.max(1)),
        ));
        Self {
            inner: Arc::new(Inner {
                store,
                profiles,
                admission: Semaphore::new(permits),
                committed: Arc::new(Notify::new()),
                producers: Mutex::new(HashMap::new()),
                identities,
                settings,
                positions_checked: tokio::sync::OnceCell::new(),
            }),
        }
    }

    /// Before this process's first append: asks ProfileService for the highest position it
    /// holds for this log (a position probe of ApplyAggregates) and, when the log's sequence is
    /// below it (the log was restored to an older point), moves the sequence past it, so new
    /// events are not ignored as already counted. Runs once per process; a failure (e.g.
    /// ProfileService unreachable) fails the batch with UNAVAILABLE and is retried by the next.
    async fn check_log_positions(&self) -> Result<(), Status> {
        self.inner
            .positions_checked
            .get_or_try_init(|| async {
                let feed = self.inner.store.log_identity().await?;
                let probe = self
                    .inner
                    .profiles
                    .clone()
                    .apply_aggregates(pb::ApplyAggregatesRequest {
                        deltas: Vec::new(),
                        feed,
                    })
                    .await;
                let held = match probe {
                    Ok(r) => r.into_inner().feed_position,
                    // A ProfileService older than the probe (during a rolling upgrade) refuses
                    // an empty call: nothing to check against; the next process start checks.
                    Err(s) if s.code() == tonic::Code::InvalidArgument => {
                        tracing::warn!(error = %s.message(), "ProfileService does not answer position probes yet; the log's positions are not checked by this process");
                        return Ok(());
                    }
                    Err(s) => {
                        return Err(Status::unavailable(format!(
                            "checking the log's positions with ProfileService: {}",
                            s.message()
                        )));
                    }
                };
                if self.inner.store.ensure_positions_above(held).await? {
                    tracing::warn!(
                        position = held,
                        "the event log's sequence was below the position ProfileService holds for it (restored from an older backup?); moved it past"
                    );
                }
                Ok::<(), Status>(())
            })
            .await?;
        Ok(())
    }

    /// Starts the background tasks (the aggregate forwarder, the erasure follower and the
    /// pruning of expired keys) in one replica at a time: the holder of the `ingest.background`
    /// leader lock on `target`; and, in every replica, the identity cache's feed follower.
    pub fn spawn_background(&self, target: clientele_runtime::db::DatabaseTarget) {
        if self.inner.identities.enabled() {
            tokio::spawn(self.cache_follower().run(self.inner.store.clone()));
        }
        let svc = self.clone();
        tokio::spawn(async move {
            clientele_runtime::leader::lead(target, "ingest.background", move || {
                let forwarder = svc.forwarder();
                let erasure = svc.erasure();
                let wake = svc.inner.committed.clone();
                let prune = crate::forwarder::prune_forever(
                    svc.inner.store.clone(),
                    svc.inner.settings.dedup_window_days,
                );
                async move {
                    tokio::join!(forwarder.run(wake), erasure.run(), prune);
                }
            })
            .await;
        });
    }

    /// A forwarder over this service's store and ProfileService client (for tests and tools
    /// that want to deliver the aggregate deltas synchronously).
    pub fn forwarder(&self) -> crate::forwarder::Forwarder {
        crate::forwarder::Forwarder::new(
            self.inner.store.clone(),
            self.inner.profiles.clone(),
            self.inner.settings.forward_batch_size,
        )
    }

    /// The event store (for tests and tools).
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.inner.store
    }

    /// The consumer of ProfileService.WatchChanges that deletes erased people's events (for
    /// tests and tools that want to apply the feed synchronously).
    pub fn erasure(&self) -> crate::erasure::ErasureConsumer {
        crate::erasure::ErasureConsumer::new(self.inner.store.clone(), self.inner.profiles.clone())
            .with_identity_cache(self.inner.identities.clone())
    }

    /// A follower of the change feed into this replica's identity cache (every replica runs
    /// one; see [`crate::erasure::CacheFollower`]).
    pub fn cache_follower(&self) -> crate::erasure::CacheFollower {
        crate::erasure::CacheFollower::new(
            self.inner.profiles.clone(),
            self.inner.identities.clone(),
        )
    }

    /// The identity cache (for tests and tools).
    pub fn identity_cache(&self) -> &Arc<IdentityCache> {
        &self.inner.identities
    }

    /// Mounts the service with the scope each method needs.
    pub fn mount(self, mount: &mut Mount) {
        mount.add(
            "clientele.v1.IngestService",
            IngestServiceServer::new(self).max_decoding_message_size(MAX_BATCH_BYTES + 1024 * 1024),
            &[
                ("Ingest", "ingest:write"),
                ("IngestBatch", "ingest:write"),
                ("IngestStream", "ingest:write"),
                ("ListProfileEvents", "ingest:read"),
                ("WatchEvents", "ingest:read"),
            ],
        );
    }

    fn limits(&self) -> Limits {
        let s = &self.inner.settings;
        Limits {
            now: now_micros(),
            max_future_skew: i64::try_from(s.max_future_skew_secs)
                .unwrap_or(300)
                .saturating_mul(1_000_000),
            max_age: (s.max_event_age_days > 0)
                .then(|| i64::from(s.max_event_age_days) * 86_400_000_000),
        }
    }

    async fn admit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Status> {
        let wait = Duration::from_millis(self.inner.settings.admission_timeout_ms);
        match tokio::time::timeout(wait, self.inner.admission.acquire()).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(Status::resource_exhausted(
                "ingestion is at capacity (the database is behind); retry with backoff",
            )),
        }
    }

    /// Validates, deduplicates within the batch and resolves identities (one BatchResolve).
    async fn prepare(&self, events: Vec<pb::Event>, prefix: &str) -> Result<Prepared, Status> {
        let limits = self.limits();
        let mut event_ids = Vec::with_capacity(events.len());
        let mut slots = Vec::with_capacity(events.len());
        let mut valid: Vec<(usize, ValidEvent)> = Vec::new();
        let mut first_of: HashMap<(String, String), (usize, [u8; 32])> = HashMap::new();
        for (i, e) in events.into_iter().enumerate() {
            event_ids.push(e.event_id.clone());
            match validate::validate_event(e, &limits) {
                Err(fe) => slots.push(Slot::Done(rejected(
                    i,
                    &event_ids[i],
                    tonic::Code::InvalidArgument,
                    &fe.field,
                    field_message(prefix, i, &fe),
                ))),
                Ok(v) => {
                    let key = (v.source.clone(), v.event_id.clone());
                    if let Some((first, hash)) = first_of.get(&key) {
                        slots.push(Slot::Repeat(*first, *hash == v.hash));
                    } else {
                        first_of.insert(key, (i, v.hash));
                        slots.push(Slot::New(usize::MAX));
                        valid.push((i, v));
                    }
                }
            }
        }
        // Sets the identity cache answers (every identifier cached on one profile) skip
        // ProfileService; the others go in one BatchResolve. An identifier ProfileService
        // refuses (say, a malformed phone number) rejects its event and the call is repeated
        // without it.
        let resolve_started = std::time::Instant::now();
        let cache = &self.inner.identities;
        let generation = cache.generation();
        let mut pending: Vec<usize> = Vec::with_capacity(valid.len());
        let mut resolved: HashMap<usize, pb::ResolveResponse> = HashMap::new();
        let empty = pb::IdentifierSet::default();
        let hits = cache.lookup(
            valid
                .iter()
                .map(|(_, v)| v.event.identifiers.as_ref().unwrap_or(&empty)),
        );
        for (v, hit) in hits.into_iter().enumerate() {
            match hit {
                Some(profile_id) => {
                    resolved.insert(
                        v,
                        pb::ResolveResponse {
                            profile_id,
                            ..Default::default()
                        },
                    );
                }
                None => pending.push(v),
            }
        }
        let (hits, misses) = (resolved.len(), pending.len());
        if cache.enabled() {
            let requests = &clientele_runtime::metrics::METRICS.cache_requests;
            requests
                .with_label_values(&["ingest_identity", "hit"])
                .inc_by(hits as u64);
            requests
                .with_label_values(&["ingest_identity", "miss"])
                .inc_by(misses as u64);
        }
        // The log's key lookup runs beside the BatchResolve round trip instead of inside the
        // commit, which then only waits for its turn and appends (one batch's latency less by
        // the lookup's, at window 2 the stream's throughput more by as much).
        let keys: Vec<(&str, &str)> = valid
            .iter()
            .map(|(_, v)| (v.source.as_str(), v.event_id.as_str()))
            .collect();
        let look_up = async {
            match self.inner.store.look_up_keys(&keys).await {
                Ok(found) => found,
                Err(e) => {
                    // The commit looks the keys up itself (and reports a failing database).
                    tracing::debug!(error = %e, "key lookup ahead of the commit failed");
                    None
                }
            }
        };
        let resolve = async {
            let mut attempts = 0;
            while !pending.is_empty() {
                attempts += 1;
                let sets: Vec<pb::IdentifierSet> = pending
                    .iter()
                    .map(|&v| valid[v].1.event.identifiers.clone().unwrap_or_default())
                    .collect();
                let mut client = self.inner.profiles.clone();
                match client.batch_resolve(pb::BatchResolveRequest { sets }).await {
                    Ok(r) => {
                        let results = r.into_inner().results;
                        if results.len() != pending.len() {
                            return Err(Status::internal(
                                "identity resolution returned a short reply",
                            ));
                        }
                        cache.fill_many(
                            generation,
                            pending.iter().zip(&results).map(|(&v, res)| {
                                (valid[v].1.event.identifiers.as_ref().unwrap_or(&empty), res)
                            }),
                        );
                        for (&v, res) in pending.iter().zip(results) {
                            resolved.insert(v, res);
                        }
                        pending.clear();
                    }
                    Err(s) if s.code() == tonic::Code::InvalidArgument && attempts <= 8 => {
                        let field = violated_field(&s).unwrap_or_default();
                        let parsed = field
                            .strip_prefix("sets[")
                            .and_then(|r| r.split_once(']'))
                            .and_then(|(n, rest)| Some((n.parse::<usize>().ok()?, rest)));
                        let Some((pos, rest)) = parsed.filter(|(p, _)| *p < pending.len()) else {
                            return Err(Status::internal(format!(
                                "identity resolution refused the batch: {}",
                                s.message()
                            )));
                        };
                        let v = pending.remove(pos);
                        let i = valid[v].0;
                        let rel = format!("identifiers{rest}");
                        let msg = s
                            .message()
                            .split_once(": ")
                            .map_or(s.message(), |(_, m)| m)
                            .to_string();
                        slots[i] = Slot::Done(rejected(
                            i,
                            &event_ids[i],
                            tonic::Code::InvalidArgument,
                            &rel,
                            format!("{prefix}[{i}].{rel}: {msg}"),
                        ));
                    }
                    Err(s) => {
                        tracing::warn!(code = ?s.code(), error = %s.message(), "identity resolution failed");
                        return Err(Status::unavailable(format!(
                            "identity resolution unavailable: {}",
                            s.message()
                        )));
                    }
                }
            }
            Ok::<(), Status>(())
        };
        let (looked_up, resolved_ok) = tokio::join!(look_up, resolve);
        resolved_ok?;
        tracing::debug!(
            sets = valid.len(),
            cache_hits = hits,
            cache_misses = misses,
            resolve_ms = resolve_started.elapsed().as_secs_f64() * 1e3,
            "batch resolved"
        );
        let mut new = Vec::with_capacity(valid.len());
        for (v, (i, ev)) in valid.into_iter().enumerate() {
            let Some(res) = resolved.remove(&v) else {
                continue; // rejected by ProfileService above
            };
            if res.erased || res.profile_id.is_empty() {
                slots[i] = Slot::Done(pb::EventResult {
                    index: i32::try_from(i).unwrap_or(i32::MAX),
                    event_id: event_ids[i].clone(),
                    status: pb::EventStatus::Suppressed as i32,
                    suppression: pb::SuppressionReason::ErasedIdentifier as i32,
                    ..Default::default()
                });
                continue;
            }
            let aggregate_key = ev.aggregate_key();
            let (stored, redacted) = validate::redact(ev.event);
            slots[i] = Slot::New(new.len());
            new.push(NewEvent {
                aggregate_key,
                source: ev.source,
                event_id: ev.event_id,
                hash: ev.hash.to_vec(),
                profile_id: res.profile_id,
                kind: ev.kind as i32,
                custom_name: ev.custom_name,
                occurred_at: ev.occurred_at,
                body: stored.encode_to_vec(),
                redacted,
                effect: ev.effect,
            });
        }
        Ok(Prepared {
            event_ids,
            slots,
            new,
            prefix: prefix.to_string(),
            looked_up,
        })
    }

    /// Commits a prepared batch; `turn` orders it after the stream's previous batch.
    async fn commit(
        &self,
        mut p: Prepared,
        stream: Option<(&str, u64)>,
        mut turn: CommitTurn,
    ) -> Result<Vec<pb::EventResult>, Status> {
        turn.looked_up = p.looked_up.take();
        self.check_log_positions().await?;
        let now = now_micros();
        let commit_started = std::time::Instant::now();
        let outcomes = match stream {
            None => {
                self.inner
                    .store
                    .commit_in_turn(&p.new, None, now, turn)
                    .await?
            }
            Some((producer_id, sequence)) => {
                let encode = |o: &[Outcome]| batch_result(sequence, &p.finish(o)).encode_to_vec();
                self.inner
                    .store
                    .commit_in_turn(
                        &p.new,
                        Some(StreamMark {
                            producer_id,
                            sequence,
                            result: &encode,
                        }),
                        now,
                        turn,
                    )
                    .await?
            }
        };
        tracing::debug!(
            events = p.new.len(),
            commit_ms = commit_started.elapsed().as_secs_f64() * 1e3,
            "batch committed"
        );
        if !p.new.is_empty() {
            self.inner.committed.notify_waiters();
        }
        Ok(p.finish(&outcomes))
    }

    /// The whole pipeline for one batch, under admission control.
    async fn ingest_events(
        &self,
        events: Vec<pb::Event>,
        prefix: &str,
    ) -> Result<Vec<pb::EventResult>, Status> {
        let _permit = self.admit().await?;
        let p = self.prepare(events, prefix).await?;
        self.commit(p, None, CommitTurn::default()).await
    }

    fn check_batch(field: &str, events: &[pb::Event]) -> Result<(), Status> {
        if events.is_empty() || events.len() > MAX_BATCH_EVENTS {
            return Err(invalid_field(
                field,
                format!("1 to {MAX_BATCH_EVENTS} events are required"),
            ));
        }
        let bytes: usize = events.iter().map(Message::encoded_len).sum();
        if bytes > MAX_BATCH_BYTES {
            return Err(invalid_field(field, "batch larger than 4 MiB"));
        }
        Ok(())
    }
}

fn page_fingerprint(req: &pb::ListProfileEventsRequest, kinds: &[i32], names: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(req.profile_id.as_bytes());
    for k in kinds {
        h.update(k.to_le_bytes());
    }
    h.update([0xff]);
    for n in names {
        h.update(n.as_bytes());
        h.update([0]);
    }
    let t =
        |t: &Option<prost_types::Timestamp>| t.as_ref().and_then(clientele_runtime::time::micros);
    h.update(format!(
        "{:?}{:?}{}",
        t(&req.start_time),
        t(&req.end_time),
        req.oldest_first
    ));
    hex::encode(&h.finalize()[..8])
}

fn encode_token(fp: &str, at: i64, seq: i64) -> String {
    hex::encode(format!("v1|{fp}|{at}|{seq}"))
}

fn decode_token(token: &str, fp: &str) -> Option<(i64, i64)> {
    let raw = String::from_utf8(hex::decode(token).ok()?).ok()?;
    let mut parts = raw.split('|');
    if parts.next()? != "v1" || parts.next()? != fp {
        return None;
    }
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn parse_cursor(c: &str) -> Option<i64> {
    c.strip_prefix("log:")?
        .parse()
        .ok()
        .filter(|n: &i64| *n >= 0)
}

fn cursor(seq: i64) -> String {
    format!("log:{seq}")
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl IngestService for IngestServiceImpl {
    async fn ingest(
        &self,
        request: Request<pb::IngestRequest>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        let event = request
            .into_inner()
            .event
            .ok_or_else(|| invalid_field("event", "is required"))?;
        let mut results = self.ingest_events(vec![event], "events").await?;
        let mut r = results.pop().ok_or_else(|| Status::internal("no result"))?;
        if let Some(e) = r.error.take() {
            let code = tonic::Code::from(e.code);
            return Err(if code == tonic::Code::InvalidArgument {
                let field = if e.field_path.is_empty() {
                    "event".to_string()
                } else {
                    format!("event.{}", e.field_path)
                };
                let msg = e
                    .message
                    .split_once(": ")
                    .map_or(e.message.as_str(), |(_, m)| m);
                invalid_field(&field, msg)
            } else {
                Status::new(code, e.message.replacen("events[0]", "event", 1))
            });
        }
        Ok(Response::new(pb::IngestResponse { result: Some(r) }))
    }

    async fn ingest_batch(
        &self,
        request: Request<pb::IngestBatchRequest>,
    ) -> Result<Response<pb::IngestBatchResponse>, Status> {
        let events = request.into_inner().events;
        Self::check_batch("events", &events)?;
        let results = self.ingest_events(events, "events").await?;
        Ok(Response::new(pb::IngestBatchResponse { results }))
    }

    type IngestStreamStream = BoxStream<pb::IngestStreamResponse>;

    async fn ingest_stream(
        &self,
        request: Request<Streaming<pb::IngestStreamRequest>>,
    ) -> Result<Response<Self::IngestStreamStream>, Status> {
        let mut incoming = request.into_inner();
        let first = incoming
            .message()
            .await?
            .ok_or_else(|| invalid_field("open", "the stream ended before `open`"))?;
        let Some(pb::ingest_stream_request::Kind::Open(open)) = first.kind else {
            return Err(invalid_field("open", "the first message must be `open`"));
        };
        let pid = open.producer_id.clone();
        let pid_ok = !pid.is_empty()
            && pid.len() <= 128
            && pid
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'));
        if !pid_ok {
            return Err(invalid_field(
                "open.producer_id",
                "must be 1 to 128 bytes of [A-Za-z0-9_.:-]",
            ));
        }
        // The newest stream of a producer wins: bump its generation, older streams abort.
        let mut generation = {
            let mut map = self
                .inner
                .producers
                .lock()
                .map_err(|_| Status::internal("producer registry poisoned"))?;
            let tx = map
                .entry(pid.clone())
                .or_insert_with(|| watch::channel(0).0);
            tx.send_modify(|g| *g += 1);
            tx.subscribe()
        };
        generation.mark_unchanged();
        let durable = self.inner.store.durable_sequence(&pid).await?;
        let (out_tx, out_rx) = mpsc::channel::<Result<pb::IngestStreamResponse, Status>>(64);
        let svc = self.clone();
        tokio::spawn(async move {
            let result = svc
                .run_stream(
                    pid.clone(),
                    open.last_received_ack,
                    durable,
                    incoming,
                    &out_tx,
                    generation,
                )
                .await;
            if let Err(s) = result {
                let _ = out_tx.send(Err(s)).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out_rx),
        )))
    }

    async fn list_profile_events(
        &self,
        request: Request<pb::ListProfileEventsRequest>,
    ) -> Result<Response<pb::ListProfileEventsResponse>, Status> {
        let req = request.into_inner();
        let id = uuid::Uuid::parse_str(&req.profile_id)
            .map_err(|_| invalid_field("profile_id", "must be a UUID"))?
            .to_string();
        let mut kinds = Vec::with_capacity(req.kinds.len());
        for (i, k) in req.kinds.iter().enumerate() {
            match pb::EventKind::try_from(*k) {
                Ok(pb::EventKind::Unspecified) | Err(_) => {
                    return Err(invalid_field(
                        &format!("kinds[{i}]"),
                        "must be a known kind",
                    ));
                }
                Ok(_) => kinds.push(*k),
            }
        }
        kinds.sort_unstable();
        kinds.dedup();
        if req.custom_event_names.len() > 20 {
            return Err(invalid_field("custom_event_names", "at most 20 names"));
        }
        if !req.custom_event_names.is_empty()
            && !kinds.is_empty()
            && !kinds.contains(&(pb::EventKind::Custom as i32))
        {
            return Err(invalid_field(
                "custom_event_names",
                "only with EVENT_KIND_CUSTOM in `kinds` or `kinds` empty",
            ));
        }
        let mut names = req.custom_event_names.clone();
        names.sort();
        names.dedup();
        let start = req
            .start_time
            .as_ref()
            .map(|t| {
                clientele_runtime::time::micros(t)
                    .ok_or_else(|| invalid_field("start_time", "invalid time"))
            })
            .transpose()?;
        let end = req
            .end_time
            .as_ref()
            .map(|t| {
                clientele_runtime::time::micros(t)
                    .ok_or_else(|| invalid_field("end_time", "invalid time"))
            })
            .transpose()?;
        if let (Some(s), Some(e)) = (start, end)
            && e <= s
        {
            return Err(invalid_field("end_time", "must be after start_time"));
        }
        let fp = page_fingerprint(&req, &kinds, &names);
        let after = if req.page_token.is_empty() {
            None
        } else {
            Some(decode_token(&req.page_token, &fp).ok_or_else(|| {
                invalid_field("page_token", "invalid, or used with different filters")
            })?)
        };
        let limit = match i64::from(req.page_size) {
            n if n <= 0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        // The profile's current id and the ids merged into it; NOT_FOUND when missing/erased.
        let mut client = self.inner.profiles.clone();
        let profile = client
            .get_profile(pb::GetProfileRequest {
                profile_id: id.clone(),
            })
            .await?
            .into_inner()
            .profile
            .ok_or_else(|| Status::not_found(format!("profile `{id}` not found")))?;
        let mut ids = vec![profile.profile_id.clone()];
        ids.extend(profile.merged_profile_ids.iter().cloned());
        if !ids.contains(&id) {
            ids.push(id.clone());
        }
        let rows = self
            .inner
            .store
            .list(&EventQuery {
                profile_ids: ids,
                kinds,
                custom_names: names,
                start,
                end,
                after,
                oldest_first: req.oldest_first,
                limit: limit + 1,
            })
            .await?;
        let more = rows.len() as i64 > limit;
        let page: Vec<_> = rows
            .into_iter()
            .take(usize::try_from(limit).unwrap_or(100))
            .collect();
        let next_page_token = match (more, page.last()) {
            (true, Some(last)) => encode_token(&fp, last.occurred_at, last.seq),
            _ => String::new(),
        };
        let events = page
            .iter()
            .map(|r| r.to_proto(Some(&profile.profile_id)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(pb::ListProfileEventsResponse {
            events,
            next_page_token,
        }))
    }

    type WatchEventsStream = BoxStream<pb::WatchEventsResponse>;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let req = request.into_inner();
        if req.consumer.is_empty() || req.consumer.len() > 64 {
            return Err(invalid_field("consumer", "must be 1 to 64 bytes"));
        }
        let mut kinds = Vec::new();
        for (i, k) in req.kinds.iter().enumerate() {
            match pb::EventKind::try_from(*k) {
                Ok(pb::EventKind::Unspecified) | Err(_) => {
                    return Err(invalid_field(
                        &format!("kinds[{i}]"),
                        "must be a known kind",
                    ));
                }
                Ok(_) => kinds.push(*k),
            }
        }
        use pb::watch_events_request::Start;
        let end = self.inner.store.log_end().await?;
        let mut after = match req.start {
            Some(Start::AfterCursor(c)) => {
                let n = parse_cursor(&c)
                    .ok_or_else(|| invalid_field("after_cursor", "not a cursor"))?;
                if n > end {
                    return Err(Status::out_of_range(
                        "after_cursor is beyond the end of the log",
                    ));
                }
                n
            }
            Some(Start::From(f)) if f == pb::WatchStart::Earliest as i32 => 0,
            Some(Start::From(f)) if f == pb::WatchStart::Latest as i32 => end,
            _ => {
                return Err(invalid_field(
                    "start",
                    "set after_cursor or from (EARLIEST or LATEST)",
                ));
            }
        };
        let store = self.inner.store.clone();
        let committed = self.inner.committed.clone();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let mut last_sent = tokio::time::Instant::now();
            loop {
                let notified = committed.notified();
                let rows = match store.log_after(after, 500).await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                let empty = rows.is_empty();
                let mut sent_any = false;
                for r in rows {
                    after = r.seq;
                    if !kinds.is_empty() && !kinds.contains(&r.kind) {
                        continue;
                    }
                    let event = match r.to_proto(None) {
                        Ok(e) => e,
                        Err(e) => {
                            let _ = tx.send(Err(Status::from(e))).await;
                            return;
                        }
                    };
                    let msg = pb::WatchEventsResponse {
                        kind: Some(pb::watch_events_response::Kind::Record(pb::EventRecord {
                            cursor: cursor(r.seq),
                            event: Some(event),
                        })),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    sent_any = true;
                }
                if sent_any {
                    last_sent = tokio::time::Instant::now();
                } else if last_sent.elapsed() >= HEARTBEAT || (!empty && !sent_any) {
                    let msg = pb::WatchEventsResponse {
                        kind: Some(pb::watch_events_response::Kind::HeartbeatCursor(cursor(
                            after,
                        ))),
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

// ---------------------------------------------------------------------------------------------
// IngestStream
// ---------------------------------------------------------------------------------------------

/// What the commit stage reports to the stream loop.
enum Done {
    Batch(pb::BatchResult),
    Failed(Status),
}

impl IngestServiceImpl {
    fn opened(&self, durable: u64) -> pb::IngestStreamResponse {
        pb::IngestStreamResponse {
            kind: Some(pb::ingest_stream_response::Kind::Opened(
                pb::IngestStreamOpened {
                    last_durable_sequence: durable,
                    max_unacked_batches: self.inner.settings.stream_max_unacked_batches.max(1),
                    ack_interval_ms: self.inner.settings.stream_ack_interval_ms.max(1),
                },
            )),
        }
    }

    /// Stored results of `from..=through` (expired ones marked so).
    async fn stored_results(
        &self,
        pid: &str,
        from: u64,
        through: u64,
    ) -> Result<Vec<pb::BatchResult>, Status> {
        if from > through {
            return Ok(Vec::new());
        }
        let from = from.max(through.saturating_sub(MAX_REPLAY - 1));
        let stored: HashMap<u64, Vec<u8>> = self
            .inner
            .store
            .batch_results(pid, from, through)
            .await?
            .into_iter()
            .collect();
        Ok((from..=through)
            .map(|seq| {
                stored
                    .get(&seq)
                    .and_then(|b| pb::BatchResult::decode(b.as_slice()).ok())
                    .unwrap_or(pb::BatchResult {
                        sequence: seq,
                        results_expired: true,
                        ..Default::default()
                    })
            })
            .collect())
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_stream(
        &self,
        pid: String,
        last_received_ack: u64,
        durable_at_open: u64,
        mut incoming: Streaming<pb::IngestStreamRequest>,
        out: &mpsc::Sender<Result<pb::IngestStreamResponse, Status>>,
        mut generation: watch::Receiver<u64>,
    ) -> Result<(), Status> {
        let send = |m: pb::IngestStreamResponse| async move {
            out.send(Ok(m))
                .await
                .map_err(|_| Status::cancelled("client went away"))
        };
        let ack = |through: u64, batches: Vec<pb::BatchResult>| pb::IngestStreamResponse {
            kind: Some(pb::ingest_stream_response::Kind::Ack(pb::IngestStreamAck {
                durable_through_sequence: through,
                batches,
            })),
        };
        send(self.opened(durable_at_open)).await?;
        let mut durable = durable_at_open;
        let replay = self
            .stored_results(&pid, last_received_ack.saturating_add(1), durable)
            .await?;
        if !replay.is_empty() {
            send(ack(durable, replay)).await?;
        }
        let max_unacked = u64::from(self.inner.settings.stream_max_unacked_batches.max(1));
        let interval =
            Duration::from_millis(u64::from(self.inner.settings.stream_ack_interval_ms.max(1)));

        // Two stages: prepare (validate + resolve) batch n+1 while batch n commits.
        let (prep_tx, prep_rx) =
            mpsc::channel::<(u64, Vec<pb::Event>)>(usize::try_from(max_unacked).unwrap_or(16));
        let (commit_tx, commit_rx) = mpsc::channel::<(u64, Result<Prepared, Status>)>(1);
        let (done_tx, mut done_rx) =
            mpsc::channel::<Done>(usize::try_from(max_unacked).unwrap_or(16) + 1);
        let preparer = {
            let svc = self.clone();
            tokio::spawn(async move {
                // Up to PREPARE_AHEAD batches resolve at once (their BatchResolve round trips
                // overlap); they reach the committer in sequence order.
                let mut prepared = tokio_stream::wrappers::ReceiverStream::new(prep_rx)
                    .map(|(seq, events)| {
                        let svc = svc.clone();
                        async move {
                            let p = match svc.inner.admission.acquire().await {
                                Ok(_permit) => svc.prepare(events, "events").await,
                                Err(_) => Err(Status::unavailable("shutting down")),
                            };
                            (seq, p)
                        }
                    })
                    .buffered(PREPARE_AHEAD);
                while let Some(item) = prepared.next().await {
                    if commit_tx.send(item).await.is_err() {
                        return;
                    }
                }
            })
        };
        let committer = {
            let svc = self.clone();
            let pid = pid.clone();
            tokio::spawn(async move {
                // Up to COMMIT_AHEAD batches commit at once: each sends its batch and looks up
                // its keys while the previous one holds the log lock, and takes the lock after
                // it (`CommitTurn`); results come back in sequence order.
                let mut previous: Option<tokio::sync::oneshot::Receiver<()>> = None;
                let mut commits = tokio_stream::wrappers::ReceiverStream::new(commit_rx)
                    .map(|(seq, p): (u64, Result<Prepared, Status>)| {
                        let (locked, next) = tokio::sync::oneshot::channel();
                        let turn = CommitTurn {
                            after: previous.replace(next),
                            locked: Some(locked),
                            looked_up: None,
                        };
                        let svc = svc.clone();
                        let pid = pid.clone();
                        async move {
                            match p {
                                Ok(p) => match svc.inner.admission.acquire().await {
                                    Ok(_permit) => svc
                                        .commit(p, Some((&pid, seq)), turn)
                                        .await
                                        .map(|res| batch_result(seq, &res)),
                                    Err(_) => Err(Status::unavailable("shutting down")),
                                },
                                Err(s) => Err(s),
                            }
                        }
                    })
                    .buffered(COMMIT_AHEAD);
                while let Some(r) = commits.next().await {
                    let failed = r.is_err();
                    let msg = match r {
                        Ok(b) => Done::Batch(b),
                        Err(s) => Done::Failed(s),
                    };
                    if done_tx.send(msg).await.is_err() || failed {
                        return;
                    }
                }
            })
        };
        let _guard = AbortOnDrop(vec![preparer, committer]);

        let mut prep_tx = Some(prep_tx);
        let mut last_seen: Option<u64> = None;
        let mut acked = durable;
        let mut unsent: Vec<pb::BatchResult> = Vec::new();
        let mut replays: Vec<(u64, u64)> = Vec::new();
        let mut last_ack = tokio::time::Instant::now();
        let mut in_flight: u64 = 0;
        loop {
            let ack_due = (!unsent.is_empty() || !replays.is_empty()).then(|| last_ack + interval);
            let heartbeat_at = last_ack + HEARTBEAT;
            tokio::select! {
                msg = incoming.message(), if prep_tx.is_some() => {
                    let Some(msg) = msg? else {
                        prep_tx = None; // half-closed: finish what was sent, then end
                        if in_flight == 0 {
                            break;
                        }
                        continue;
                    };
                    let batch = match msg.kind {
                        Some(pb::ingest_stream_request::Kind::Batch(b)) => b,
                        Some(pb::ingest_stream_request::Kind::Open(_)) => {
                            return Err(invalid_field("open", "`open` was already sent"));
                        }
                        None => return Err(invalid_field("kind", "set `batch`")),
                    };
                    let seq = batch.sequence;
                    let ok_seq = match last_seen {
                        Some(prev) => seq == prev + 1,
                        None => seq >= 1 && seq <= durable_at_open + 1,
                    };
                    if !ok_seq {
                        let expected = last_seen.map_or(durable_at_open + 1, |p| p + 1);
                        return Err(Status::failed_precondition(format!(
                            "batch sequence {seq} out of order; expected {expected}"
                        )));
                    }
                    last_seen = Some(seq);
                    Self::check_batch("batch.events", &batch.events)?;
                    if seq <= durable_at_open {
                        // Already durable: acknowledge again without re-processing.
                        match replays.last_mut() {
                            Some((_, to)) if *to + 1 == seq => *to = seq,
                            _ => replays.push((seq, seq)),
                        }
                        continue;
                    }
                    in_flight += 1;
                    if in_flight > max_unacked {
                        return Err(Status::resource_exhausted(format!(
                            "more than {max_unacked} unacknowledged batches in flight"
                        )));
                    }
                    if let Some(tx) = &prep_tx
                        && tx.send((seq, batch.events)).await.is_err()
                    {
                        return Err(Status::internal("stream pipeline stopped"));
                    }
                }
                done = done_rx.recv() => {
                    match done {
                        Some(Done::Batch(b)) => {
                            durable = b.sequence;
                            unsent.push(b);
                        }
                        Some(Done::Failed(s)) => {
                            // Send what is durable before failing, so the producer can resume.
                            if !unsent.is_empty() {
                                let _ = send(ack(durable, std::mem::take(&mut unsent))).await;
                            }
                            return Err(s);
                        }
                        // Half-closed and drained: every batch sent is durable; the final
                        // acknowledgement after the loop reports them.
                        None if prep_tx.is_none() => break,
                        None => return Err(Status::internal("stream pipeline stopped")),
                    }
                }
                () = async {
                    match ack_due {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => tokio::time::sleep_until(heartbeat_at).await,
                    }
                } => {
                    let mut batches = Vec::new();
                    for (from, to) in std::mem::take(&mut replays) {
                        batches.extend(self.stored_results(&pid, from, to).await?);
                    }
                    in_flight = in_flight.saturating_sub(durable - acked);
                    acked = durable;
                    batches.append(&mut unsent);
                    send(ack(durable, batches)).await?;
                    last_ack = tokio::time::Instant::now();
                    if prep_tx.is_none() && in_flight == 0 {
                        break;
                    }
                }
                changed = generation.changed() => {
                    if changed.is_ok() {
                        return Err(Status::aborted(
                            "another stream opened with this producer_id (the newest stream wins)",
                        ));
                    }
                }
            }
        }
        // Final acknowledgement of everything durable.
        let mut batches = Vec::new();
        for (from, to) in std::mem::take(&mut replays) {
            batches.extend(self.stored_results(&pid, from, to).await?);
        }
        batches.append(&mut unsent);
        if !batches.is_empty() || durable != acked {
            send(ack(durable, batches)).await?;
        }
        if let Ok(mut map) = self.inner.producers.lock()
            && map
                .get(&pid)
                .is_some_and(|tx| *tx.borrow() == *generation.borrow())
        {
            map.remove(&pid);
        }
        Ok(())
    }
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}
