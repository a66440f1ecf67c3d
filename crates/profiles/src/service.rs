//! The tonic implementation of `clientele.v1.ProfileService`: validates every request (bad
//! input is INVALID_ARGUMENT naming the field, and nothing is written), calls the store, and
//! keeps the read-through profile cache coherent (each write invalidates at its new version).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use clientele_proto::v1 as pb;
use clientele_proto::v1::profile_service_server::{ProfileService, ProfileServiceServer};
use clientele_runtime::cache::VersionedCache;
use clientele_runtime::server::Mount;
use clientele_runtime::status::{invalid_field, not_found};
use clientele_runtime::time::{micros, now_micros, timestamp};
use prost::Message;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::change_signal::{ChangeSignal, KindSet};
use crate::identifiers::{IdentifierHasher, IdentifierKey, MAX_SET_SIZE};
use crate::model::{AggregateDelta, ConsentRecord, ProfileRecord, TraitValue};
use crate::store::{ProfileStore, StoreError};

/// Most identifier sets in one batch call.
pub const MAX_BATCH_SETS: usize = 1000;
/// Most profile ids in one BatchGetProfiles.
pub const MAX_BATCH_GET: usize = 500;
/// Most traits set or removed in one call.
pub const MAX_TRAITS_PER_CALL: usize = 100;
/// Longest string trait value, bytes.
pub const MAX_TRAIT_STRING_BYTES: usize = 1024;
/// Most aggregate deltas in one call.
pub const MAX_DELTAS: usize = 1000;

/// Maps store failures to precise statuses; database details are logged, not returned.
impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => not_found("profile", &id),
            StoreError::Erased(id) => Status::not_found(format!("profile `{id}` was erased")),
            StoreError::Limit { field, message } => invalid_field(field, message),
            StoreError::Db(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) => {
                tracing::error!(error = %e, "database unavailable");
                Status::unavailable("database unavailable; retry")
            }
            other => {
                tracing::error!(error = %other, "profile store failure");
                Status::internal("internal error")
            }
        }
    }
}

/// The scope each ProfileService method needs (the server's authorisation table; tests that
/// mount the service behind their own layers reuse it).
pub const METHOD_SCOPES: &[(&str, &str)] = &[
    ("Resolve", "profiles:write"),
    ("BatchResolve", "profiles:write"),
    ("GetProfile", "profiles:read"),
    ("BatchGetProfiles", "profiles:read"),
    ("UpdateTraits", "profiles:write"),
    ("SetConsent", "profiles:write"),
    ("ListConsentHistory", "profiles:read"),
    ("ApplyAggregates", "profiles:write"),
    ("EraseProfile", "profiles:admin"),
    ("ExportProfile", "profiles:admin"),
    ("CheckErased", "profiles:read"),
    ("WatchChanges", "profiles:read"),
];

/// The ProfileService.
#[derive(Debug, Clone)]
pub struct ProfileServiceImpl {
    store: Arc<dyn ProfileStore>,
    hasher: IdentifierHasher,
    cache: Arc<dyn VersionedCache>,
    changed: Arc<ChangeSignal>,
}

fn parse_profile_id(field: &str, id: &str) -> Result<String, Status> {
    uuid::Uuid::parse_str(id)
        .map(|u| u.to_string())
        .map_err(|_| invalid_field(field, format!("`{id}` is not a UUID")))
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
}

fn valid_currency(c: &str) -> bool {
    c.len() == 3 && c.chars().all(|c| c.is_ascii_uppercase())
}

/// Converts a stored profile to its protobuf form.
pub fn to_proto(p: &ProfileRecord) -> pb::Profile {
    pb::Profile {
        profile_id: p.id.clone(),
        merged_profile_ids: p.merged_ids.clone(),
        identifiers: p
            .identifiers
            .iter()
            .map(|i| pb::StoredIdentifier {
                r#type: i32::try_from(i.id_type).unwrap_or(0),
                namespace: i.namespace.clone(),
                stored_value: i.stored_value.clone(),
                first_seen_at: Some(timestamp(i.first_seen_at)),
            })
            .collect(),
        traits: p
            .traits
            .iter()
            .map(|(k, t)| (k.clone(), trait_to_proto(&t.value)))
            .collect(),
        consents: p.consents.iter().map(consent_to_proto).collect(),
        aggregates: Some(pb::ProfileAggregates {
            first_order_at: p.first_order_at.map(timestamp),
            last_order_at: p.last_order_at.map(timestamp),
            order_count: p.order_count,
            refund_count: p.refund_count,
            spend: p
                .spend
                .iter()
                .map(|s| pb::CurrencySpend {
                    currency: s.currency.clone(),
                    gross_minor: s.gross_minor,
                    refunded_minor: s.refunded_minor,
                })
                .collect(),
            engagement: p.engagement.clone().into_iter().collect(),
            last_seen_at: p.last_seen_at.map(timestamp),
        }),
        created_at: Some(timestamp(p.created_at)),
        updated_at: Some(timestamp(p.updated_at)),
        version: p.version,
    }
}

fn trait_to_proto(v: &TraitValue) -> pb::Value {
    use pb::value::Kind;
    pb::Value {
        kind: Some(match v {
            TraitValue::String(s) => Kind::StringValue(s.clone()),
            TraitValue::Int(i) => Kind::IntValue(*i),
            TraitValue::Double(d) => Kind::DoubleValue(*d),
            TraitValue::Bool(b) => Kind::BoolValue(*b),
            TraitValue::Timestamp(t) => Kind::TimestampValue(timestamp(*t)),
        }),
    }
}

fn trait_from_proto(field: &str, v: &pb::Value) -> Result<TraitValue, Status> {
    use pb::value::Kind;
    match &v.kind {
        None => Err(invalid_field(field, "value has no kind set")),
        Some(Kind::StringValue(s)) if s.len() > MAX_TRAIT_STRING_BYTES => Err(invalid_field(
            field,
            format!("string longer than {MAX_TRAIT_STRING_BYTES} bytes"),
        )),
        Some(Kind::StringValue(s)) => Ok(TraitValue::String(s.clone())),
        Some(Kind::IntValue(i)) => Ok(TraitValue::Int(*i)),
        Some(Kind::DoubleValue(d)) if !d.is_finite() => {
            Err(invalid_field(field, "double must be finite"))
        }
        Some(Kind::DoubleValue(d)) => Ok(TraitValue::Double(*d)),
        Some(Kind::BoolValue(b)) => Ok(TraitValue::Bool(*b)),
        Some(Kind::TimestampValue(t)) => micros(t)
            .map(TraitValue::Timestamp)
            .ok_or_else(|| invalid_field(field, "timestamp out of range")),
    }
}

fn consent_to_proto(c: &ConsentRecord) -> pb::Consent {
    pb::Consent {
        purpose: i32::try_from(c.purpose).unwrap_or(0),
        status: i32::try_from(c.status).unwrap_or(0),
        decided_at: Some(timestamp(c.decided_at)),
        source: c.source.clone(),
    }
}

impl ProfileServiceImpl {
    /// A service over `store`, normalising identifiers with `hasher` and caching hot profiles
    /// in `cache`.
    pub fn new(
        store: Arc<dyn ProfileStore>,
        hasher: IdentifierHasher,
        cache: Arc<dyn VersionedCache>,
    ) -> Self {
        Self {
            store,
            hasher,
            cache,
            changed: Arc::new(ChangeSignal::default()),
        }
    }

    /// Mounts the service with the scope each method needs.
    pub fn mount(self, mount: &mut Mount) {
        mount.add(
            "clientele.v1.ProfileService",
            ProfileServiceServer::new(self).max_decoding_message_size(16 * 1024 * 1024),
            METHOD_SCOPES,
        );
    }

    /// Validates and normalises one set; `field` is the set's path (`identifiers`, `sets[3]`).
    /// Returns the deduplicated keys and, for each, its first index in the request.
    fn normalise_set(
        &self,
        field: &str,
        set: Option<&pb::IdentifierSet>,
    ) -> Result<(Vec<IdentifierKey>, Vec<usize>), Status> {
        let ids = set.map(|s| s.identifiers.as_slice()).unwrap_or_default();
        if ids.is_empty() {
            return Err(invalid_field(
                &format!("{field}.identifiers"),
                "at least one identifier is required",
            ));
        }
        if ids.len() > MAX_SET_SIZE {
            return Err(invalid_field(
                &format!("{field}.identifiers"),
                format!("at most {MAX_SET_SIZE} identifiers per set"),
            ));
        }
        let mut keys = Vec::with_capacity(ids.len());
        let mut index = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            let key = self
                .hasher
                .normalise(id.r#type, &id.value, &id.namespace)
                .map_err(|e| {
                    invalid_field(&format!("{field}.identifiers[{i}].{}", e.field), e.message)
                })?;
            if !keys.contains(&key) {
                keys.push(key);
                index.push(i);
            }
        }
        Ok((keys, index))
    }

    async fn resolve_keys(
        &self,
        keys: &[IdentifierKey],
        index: &[usize],
    ) -> Result<pb::ResolveResponse, Status> {
        let started = std::time::Instant::now();
        let out = self.store.resolve(keys, now_micros()).await?;
        tracing::debug!(
            keys = keys.len(),
            created = out.created,
            merged = out.merged.len(),
            refused = out.refused.len(),
            written = out.version.is_some(),
            resolve_ms = started.elapsed().as_secs_f64() * 1e3,
            "full resolution"
        );
        if let Some(v) = out.version {
            self.cache.invalidate(&out.profile_id, v).await;
            self.changed.wrote(KindSet::ALL);
        }
        for m in &out.merged {
            self.cache.invalidate(m, i64::MAX).await;
        }
        Ok(response(out, index))
    }

    async fn load(&self, id: &str) -> Result<pb::Profile, Status> {
        if let Some(bytes) = self.cache.get(id).await
            && let Ok(p) = pb::Profile::decode(bytes.as_slice())
        {
            return Ok(p);
        }
        let record = self.store.get(id).await?;
        let proto = to_proto(&record);
        self.cache
            .put_if_newer(&record.id, record.version, &proto.encode_to_vec())
            .await;
        Ok(proto)
    }

    async fn after_write(&self, record: &ProfileRecord) {
        self.cache.invalidate(&record.id, record.version).await;
        self.changed.wrote(KindSet::ALL);
    }
}

/// The reply to one resolution; `index` maps positions in the normalised set back to the
/// request's identifiers (for refused links).
fn response(out: crate::model::ResolveOutcome, index: &[usize]) -> pb::ResolveResponse {
    pb::ResolveResponse {
        profile_id: out.profile_id,
        created: out.created,
        merged_profile_ids: out.merged,
        refused_links: out
            .refused
            .iter()
            .map(|&i| pb::RefusedLink {
                identifier_index: u32::try_from(index[i]).unwrap_or(u32::MAX),
                reason: pb::LinkRefusal::OverMergeCap as i32,
            })
            .collect(),
        erased: out.erased,
    }
}

type ChangeStream = Pin<Box<dyn Stream<Item = Result<pb::ProfileChange, Status>> + Send>>;

#[tonic::async_trait]
impl ProfileService for ProfileServiceImpl {
    async fn resolve(
        &self,
        request: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        let req = request.into_inner();
        let (keys, index) = self.normalise_set("identifiers", req.identifiers.as_ref())?;
        Ok(Response::new(self.resolve_keys(&keys, &index).await?))
    }

    async fn batch_resolve(
        &self,
        request: Request<pb::BatchResolveRequest>,
    ) -> Result<Response<pb::BatchResolveResponse>, Status> {
        let req = request.into_inner();
        if req.sets.is_empty() || req.sets.len() > MAX_BATCH_SETS {
            return Err(invalid_field(
                "sets",
                format!("1 to {MAX_BATCH_SETS} identifier sets are required"),
            ));
        }
        let normalised = req
            .sets
            .iter()
            .enumerate()
            .map(|(i, s)| self.normalise_set(&format!("sets[{i}]"), Some(s)))
            .collect::<Result<Vec<_>, _>>()?;
        // Identical sets (the same session's events) are resolved once: a repeat resolution of
        // a set changes nothing, so later copies get the first result as a repeat call would
        // (not created, nothing merged; the same refusals).
        let mut first_of: HashMap<&(Vec<IdentifierKey>, Vec<usize>), usize> = HashMap::new();
        let mut uniq: Vec<&(Vec<IdentifierKey>, Vec<usize>)> = Vec::new();
        let slot: Vec<usize> = normalised
            .iter()
            .map(|n| {
                *first_of.entry(n).or_insert_with(|| {
                    uniq.push(n);
                    uniq.len() - 1
                })
            })
            .collect();
        let key_sets: Vec<Vec<IdentifierKey>> = uniq.iter().map(|(k, _)| k.clone()).collect();
        // Returning customers (every identifier known, one profile) need no write; all other
        // sets (first-time customers, new links, merges, tombstones) resolve together in one
        // transaction, with the outcomes of one Resolve call per set in order.
        let started = std::time::Instant::now();
        let known = self.store.resolve_known(&key_sets).await?;
        let known_ms = started.elapsed().as_secs_f64() * 1e3;
        let unknown: Vec<usize> = (0..known.len()).filter(|&i| known[i].is_none()).collect();
        let unknown_sets: Vec<Vec<IdentifierKey>> =
            unknown.iter().map(|&i| key_sets[i].clone()).collect();
        let outcomes = self.store.resolve_many(&unknown_sets, now_micros()).await?;
        let store_ms = started.elapsed().as_secs_f64() * 1e3;
        // Cache entries of written and merged profiles are dropped concurrently.
        let mut stale: Vec<(String, i64)> = Vec::new();
        for out in &outcomes {
            if let Some(v) = out.version {
                stale.push((out.profile_id.clone(), v));
            }
            stale.extend(out.merged.iter().map(|m| (m.clone(), i64::MAX)));
        }
        let merges = outcomes.iter().map(|o| o.merged.len()).sum::<usize>();
        self.cache.invalidate_many(&stale).await;
        if !stale.is_empty() {
            // The feed rows this call wrote: CREATED for a new profile, MERGED for a set that
            // merged, UPDATED otherwise (the store's `plan_many`).
            let mut kinds = vec![pb::ProfileChangeKind::Updated];
            if outcomes.iter().any(|o| o.created) {
                kinds.push(pb::ProfileChangeKind::Created);
            }
            if merges > 0 {
                kinds.push(pb::ProfileChangeKind::Merged);
            }
            self.changed.wrote(KindSet::of(&kinds));
        }
        let mut resolved: Vec<pb::ResolveResponse> = known
            .into_iter()
            .map(|k| pb::ResolveResponse {
                profile_id: k.unwrap_or_default(),
                ..Default::default()
            })
            .collect();
        for (&u, out) in unknown.iter().zip(outcomes) {
            resolved[u] = response(out, &uniq[u].1);
        }
        let mut given = vec![false; resolved.len()];
        let results: Vec<pb::ResolveResponse> = slot
            .iter()
            .map(|&u| {
                let r = resolved[u].clone();
                if std::mem::replace(&mut given[u], true) {
                    pb::ResolveResponse {
                        created: false,
                        merged_profile_ids: Vec::new(),
                        ..r
                    }
                } else {
                    r
                }
            })
            .collect();
        tracing::debug!(
            sets = results.len(),
            distinct = uniq.len(),
            resolved = unknown.len(),
            merges,
            known_ms,
            store_ms,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "batch resolve"
        );
        Ok(Response::new(pb::BatchResolveResponse { results }))
    }

    async fn get_profile(
        &self,
        request: Request<pb::GetProfileRequest>,
    ) -> Result<Response<pb::GetProfileResponse>, Status> {
        let id = parse_profile_id("profile_id", &request.get_ref().profile_id)?;
        Ok(Response::new(pb::GetProfileResponse {
            profile: Some(self.load(&id).await?),
        }))
    }

    async fn batch_get_profiles(
        &self,
        request: Request<pb::BatchGetProfilesRequest>,
    ) -> Result<Response<pb::BatchGetProfilesResponse>, Status> {
        let req = request.into_inner();
        if req.profile_ids.is_empty() || req.profile_ids.len() > MAX_BATCH_GET {
            return Err(invalid_field(
                "profile_ids",
                format!("1 to {MAX_BATCH_GET} profile ids are required"),
            ));
        }
        let ids = req
            .profile_ids
            .iter()
            .enumerate()
            .map(|(i, id)| parse_profile_id(&format!("profile_ids[{i}]"), id))
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = pb::BatchGetProfilesResponse::default();
        for id in ids {
            match self.load(&id).await {
                Ok(p) => out.profiles.push(p),
                Err(s) if s.code() == tonic::Code::NotFound => out.missing_profile_ids.push(id),
                Err(s) => return Err(s),
            }
        }
        Ok(Response::new(out))
    }

    async fn update_traits(
        &self,
        request: Request<pb::UpdateTraitsRequest>,
    ) -> Result<Response<pb::UpdateTraitsResponse>, Status> {
        let req = request.into_inner();
        let id = parse_profile_id("profile_id", &req.profile_id)?;
        if req.set.is_empty() && req.remove.is_empty() {
            return Err(invalid_field("set", "nothing to set or remove"));
        }
        if req.set.len() > MAX_TRAITS_PER_CALL || req.remove.len() > MAX_TRAITS_PER_CALL {
            return Err(invalid_field(
                if req.set.len() > MAX_TRAITS_PER_CALL {
                    "set"
                } else {
                    "remove"
                },
                format!("at most {MAX_TRAITS_PER_CALL} traits per call"),
            ));
        }
        let mut set: Vec<(String, TraitValue)> = Vec::with_capacity(req.set.len());
        let mut names: Vec<&String> = req.set.keys().collect();
        names.sort();
        for name in names {
            if !valid_name(name) {
                return Err(invalid_field(
                    &format!("set[{name:?}]"),
                    "trait names are 1 to 64 bytes of [a-z0-9_.]",
                ));
            }
            let v = trait_from_proto(&format!("set[{name:?}]"), &req.set[name])?;
            set.push((name.clone(), v));
        }
        for (i, name) in req.remove.iter().enumerate() {
            if !valid_name(name) {
                return Err(invalid_field(
                    &format!("remove[{i}]"),
                    "trait names are 1 to 64 bytes of [a-z0-9_.]",
                ));
            }
        }
        let record = self
            .store
            .update_traits(&id, &set, &req.remove, now_micros())
            .await?;
        self.after_write(&record).await;
        Ok(Response::new(pb::UpdateTraitsResponse {
            profile: Some(to_proto(&record)),
        }))
    }

    async fn set_consent(
        &self,
        request: Request<pb::SetConsentRequest>,
    ) -> Result<Response<pb::SetConsentResponse>, Status> {
        let req = request.into_inner();
        let id = parse_profile_id("profile_id", &req.profile_id)?;
        let c = req
            .consent
            .ok_or_else(|| invalid_field("consent", "is required"))?;
        if pb::ConsentPurpose::try_from(c.purpose)
            .map_or(true, |p| p == pb::ConsentPurpose::Unspecified)
        {
            return Err(invalid_field("consent.purpose", "must be a known purpose"));
        }
        if pb::ConsentStatus::try_from(c.status)
            .map_or(true, |s| s == pb::ConsentStatus::Unspecified)
        {
            return Err(invalid_field(
                "consent.status",
                "must be granted, denied or revoked",
            ));
        }
        if c.source.trim().is_empty() || c.source.len() > 64 {
            return Err(invalid_field("consent.source", "must be 1 to 64 bytes"));
        }
        let now = now_micros();
        let decided_at = match &c.decided_at {
            None => now,
            Some(t) => micros(t)
                .filter(|t| *t <= now + 300_000_000)
                .ok_or_else(|| {
                    invalid_field(
                        "consent.decided_at",
                        "must be a valid time, not in the future",
                    )
                })?,
        };
        let record = self
            .store
            .record_consent(
                &id,
                &ConsentRecord {
                    purpose: i64::from(c.purpose),
                    status: i64::from(c.status),
                    decided_at,
                    source: c.source.trim().to_string(),
                },
                now,
            )
            .await?;
        self.after_write(&record).await;
        Ok(Response::new(pb::SetConsentResponse {
            profile: Some(to_proto(&record)),
        }))
    }

    async fn list_consent_history(
        &self,
        request: Request<pb::ListConsentHistoryRequest>,
    ) -> Result<Response<pb::ListConsentHistoryResponse>, Status> {
        let req = request.into_inner();
        let id = parse_profile_id("profile_id", &req.profile_id)?;
        let purpose = match pb::ConsentPurpose::try_from(req.purpose) {
            Ok(pb::ConsentPurpose::Unspecified) => None,
            Ok(p) => Some(p as i64),
            Err(_) => return Err(invalid_field("purpose", "unknown purpose")),
        };
        let history = self.store.consent_history(&id, purpose).await?;
        Ok(Response::new(pb::ListConsentHistoryResponse {
            history: history.iter().map(consent_to_proto).collect(),
        }))
    }

    async fn apply_aggregates(
        &self,
        request: Request<pb::ApplyAggregatesRequest>,
    ) -> Result<Response<pb::ApplyAggregatesResponse>, Status> {
        let req = request.into_inner();
        if req.feed.len() > 128 {
            return Err(invalid_field("feed", "must be at most 128 bytes"));
        }
        let feed = (!req.feed.is_empty()).then_some(req.feed.as_str());
        if (req.deltas.is_empty() && feed.is_none()) || req.deltas.len() > MAX_DELTAS {
            return Err(invalid_field(
                "deltas",
                format!("1 to {MAX_DELTAS} deltas are required (0 only with `feed`)"),
            ));
        }
        if let (Some(feed), true) = (feed, req.deltas.is_empty()) {
            // A position probe.
            return Ok(Response::new(pb::ApplyAggregatesResponse {
                feed_position: self.store.feed_position(feed).await?,
                ..Default::default()
            }));
        }
        let mut deltas = Vec::with_capacity(req.deltas.len());
        let mut previous = 0;
        for (i, d) in req.deltas.iter().enumerate() {
            let f = |s: &str| format!("deltas[{i}].{s}");
            if d.idempotency_key.is_empty() || d.idempotency_key.len() > 128 {
                return Err(invalid_field(
                    &f("idempotency_key"),
                    "must be 1 to 128 bytes",
                ));
            }
            // With a feed, positions are what makes a delta count once: every delta needs
            // one, in strictly increasing order (the store keeps only the highest).
            match feed {
                Some(_) if d.feed_position <= previous => {
                    return Err(invalid_field(
                        &f("feed_position"),
                        if d.feed_position <= 0 {
                            "must be positive when `feed` is set".to_string()
                        } else {
                            format!("must be greater than deltas[{}].feed_position", i - 1)
                        },
                    ));
                }
                Some(_) => previous = d.feed_position,
                None if d.feed_position != 0 => {
                    return Err(invalid_field(&f("feed_position"), "requires `feed`"));
                }
                None => {}
            }
            let profile_id = parse_profile_id(&f("profile_id"), &d.profile_id)?;
            let occurred_at = d
                .occurred_at
                .as_ref()
                .and_then(micros)
                .ok_or_else(|| invalid_field(&f("occurred_at"), "is required"))?;
            let money = |m: &Option<pb::Money>, name: &str, allow_negative: bool| {
                m.as_ref()
                    .map(|m| {
                        if !valid_currency(&m.currency) {
                            Err(invalid_field(
                                &f(&format!("{name}.currency")),
                                "must be an ISO 4217 code",
                            ))
                        } else if m.amount_minor < 0 && !allow_negative {
                            Err(invalid_field(
                                &f(&format!("{name}.amount_minor")),
                                "must not be negative",
                            ))
                        } else {
                            Ok((m.currency.clone(), m.amount_minor))
                        }
                    })
                    .transpose()
            };
            let mut engagement = Vec::with_capacity(d.engagement.len());
            for (k, n) in &d.engagement {
                if !valid_name(k) || *n < 0 {
                    return Err(invalid_field(
                        &f(&format!("engagement[{k:?}]")),
                        "names are [a-z0-9_.] and counts are not negative",
                    ));
                }
                engagement.push((k.clone(), *n));
            }
            engagement.sort();
            deltas.push(AggregateDelta {
                key: d.idempotency_key.clone(),
                profile_id,
                occurred_at,
                orders: d.orders,
                refunds: d.refunds,
                gross: money(&d.gross, "gross", true)?,
                refunded: money(&d.refunded, "refunded", false)?,
                engagement,
                position: d.feed_position,
            });
        }
        let started = std::time::Instant::now();
        let out = match feed {
            Some(feed) => {
                self.store
                    .apply_feed_aggregates(feed, &deltas, now_micros())
                    .await?
            }
            None => self.store.apply_aggregates(&deltas, now_micros()).await?,
        };
        let store_ms = started.elapsed().as_secs_f64() * 1e3;
        // Up to MAX_DELTAS profiles per call, invalidated a few hundred per Redis script call.
        self.cache.invalidate_many(&out.touched).await;
        if !out.touched.is_empty() {
            // The fold writes UPDATED rows only: streams for other kinds sleep on.
            self.changed
                .wrote(KindSet::of(&[pb::ProfileChangeKind::Updated]));
        }
        tracing::debug!(
            deltas = deltas.len(),
            applied = out.applied,
            touched = out.touched.len(),
            store_ms,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "apply aggregates"
        );
        Ok(Response::new(pb::ApplyAggregatesResponse {
            applied: out.applied,
            duplicates: out.duplicates,
            unknown_profiles: out.unknown_profiles,
            ..Default::default()
        }))
    }

    async fn erase_profile(
        &self,
        request: Request<pb::EraseProfileRequest>,
    ) -> Result<Response<pb::EraseProfileResponse>, Status> {
        let req = request.into_inner();
        let id = parse_profile_id("profile_id", &req.profile_id)?;
        if req.reason.trim().is_empty() || req.reason.len() > 256 {
            return Err(invalid_field("reason", "must be 1 to 256 bytes"));
        }
        let out = self
            .store
            .erase(&id, req.reason.trim(), now_micros())
            .await?;
        for pid in &out.profile_ids {
            self.cache.invalidate(pid, i64::MAX).await;
        }
        self.changed.wrote(KindSet::ALL);
        tracing::info!(profile_id = %id, identifiers = out.identifiers_tombstoned, "profile erased");
        Ok(Response::new(pb::EraseProfileResponse {
            identifiers_tombstoned: out.identifiers_tombstoned,
            erased_at: Some(timestamp(out.erased_at)),
        }))
    }

    async fn export_profile(
        &self,
        request: Request<pb::ExportProfileRequest>,
    ) -> Result<Response<pb::ExportProfileResponse>, Status> {
        let id = parse_profile_id("profile_id", &request.get_ref().profile_id)?;
        let doc = self.store.export(&id).await?;
        let json = serde_json::to_string_pretty(&doc)
            .map_err(|e| Status::internal(format!("export encoding: {e}")))?;
        Ok(Response::new(pb::ExportProfileResponse { json }))
    }

    async fn check_erased(
        &self,
        request: Request<pb::CheckErasedRequest>,
    ) -> Result<Response<pb::CheckErasedResponse>, Status> {
        let req = request.into_inner();
        if req.sets.is_empty() || req.sets.len() > MAX_BATCH_SETS {
            return Err(invalid_field(
                "sets",
                format!("1 to {MAX_BATCH_SETS} identifier sets are required"),
            ));
        }
        let sets = req
            .sets
            .iter()
            .enumerate()
            .map(|(i, s)| {
                self.normalise_set(&format!("sets[{i}]"), Some(s))
                    .map(|(k, _)| k)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let erased = self.store.any_erased(&sets).await?;
        Ok(Response::new(pb::CheckErasedResponse { erased }))
    }

    type WatchChangesStream = ChangeStream;

    async fn watch_changes(
        &self,
        request: Request<pb::WatchChangesRequest>,
    ) -> Result<Response<Self::WatchChangesStream>, Status> {
        let mut after = request.get_ref().after_sequence;
        if after < 0 {
            return Err(invalid_field("after_sequence", "must not be negative"));
        }
        let mut kinds: Vec<i64> = Vec::new();
        for &k in &request.get_ref().kinds {
            match pb::ProfileChangeKind::try_from(k) {
                Ok(pb::ProfileChangeKind::Unspecified) | Err(_) => {
                    return Err(invalid_field(
                        "kinds",
                        format!("{k} is not a profile change kind"),
                    ));
                }
                Ok(_) => kinds.push(i64::from(k)),
            }
        }
        let store = self.store.clone();
        let mut written = self.changed.waiter(KindSet::of_filter(&kinds));
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                // Forget earlier writes before reading, so a change committed meanwhile wakes us.
                written.mark_read();
                // Few rows of a filtered page come back: look at more per read.
                let limit = if kinds.is_empty() { 500 } else { 5000 };
                let (batch, reached) =
                    match store.changes_of_kinds_after(after, limit, &kinds).await {
                        Ok(b) => b,
                        Err(e) => {
                            let _ = tx.send(Err(Status::from(e))).await;
                            return;
                        }
                    };
                let empty = reached.is_none();
                for c in batch {
                    after = c.seq;
                    let msg = pb::ProfileChange {
                        sequence: c.seq,
                        profile_id: c.profile_id,
                        kind: i32::try_from(c.kind).unwrap_or(0),
                        merged_profile_ids: c.merged_ids,
                        changed_at: Some(timestamp(c.changed_at)),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
                if let Some(reached) = reached.filter(|r| *r > after) {
                    // A filtered page ended on another kind: a progress marker.
                    after = reached;
                    let marker = pb::ProfileChange {
                        sequence: reached,
                        ..Default::default()
                    };
                    if tx.send(Ok(marker)).await.is_err() {
                        return;
                    }
                }
                if empty {
                    // Other replicas write too: poll at least every 500 ms.
                    tokio::select! {
                        () = written.written() => {},
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
