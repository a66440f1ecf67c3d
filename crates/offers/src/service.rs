//! The tonic `clientele.v1.OfferService`: validation, the decision path and mapping of store
//! results to statuses. Atomicity (ledger serialisation, budget booking) lives in the store.
//!
//! The decision path for a profile, channel and time:
//! 1. ProfileService ([`ConsentSource`]): the profile must exist; its GRANTED consents.
//! 2. SegmentationService ([`SegmentSource`]): segments and lifecycle state.
//! 3. The ledger: the tier standing ([`Program::tier_standing`]).
//! 4. The store: the profile's codes per offer and issue times (caps, frequency cap).
//! 5. The global holdout, computed locally with the shared [`HoldoutConfig`].
//! 6. ExperimentService ([`ExperimentSource`]): the arm for each experiment-gated offer.
//! 7. The pure [`decide`], then the checks it does not know (extra consents, store ids).
//!
//! Decide reads 1–3 from the per-profile [`ReadModel`] (filled on a miss by the same reads,
//! kept current by the feeds and this process's writes; see its staleness contract), so a
//! Decide of a recently seen profile makes no network round trip unless an offer is under an
//! experiment. IssueOffer reads them fresh.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use clientele_experiments::holdout::HoldoutConfig;
use clientele_proto::v1 as pb;
use clientele_proto::v1::offer_service_server::{OfferService, OfferServiceServer};
use clientele_runtime::server::Mount;
use clientele_runtime::status::{invalid_field, not_found};
use clientele_runtime::time::{micros, now_micros, timestamp};
use rand::Rng;
use tonic::{Request, Response, Status};

use crate::catalogue::{self, BudgetUsage, Catalogue, FrequencyCap};
use crate::convert::{self, pb_entry, pb_offer, utc, utc_ts};
use crate::decision::{CustomerContext, Decision, RequestContext, decide};
use crate::eligibility_rule::{self, CompiledRules, RuleCache, RuleFacts};
use crate::ledger::{LedgerCommand, LedgerError};
use crate::program::Program;
use crate::read_model::{LedgerView, ReadModel, ReadModelConfig};
use crate::store::{
    EntryMeta, IssueRefusal, NewIssue, OfferRecord, OfferStore, RedeemCode, StoreError,
};
use crate::tiers::TierId;
use crate::upstream::{ConsentSource, ExperimentSource, SegmentSource};

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(kind, ref id) => not_found(kind, id),
            StoreError::AlreadyExists(..) | StoreError::IdempotencyConflict(_) => {
                Status::already_exists(e.to_string())
            }
            StoreError::VersionConflict { .. } => Status::aborted(e.to_string()),
            StoreError::Ledger(ref l) => match l {
                LedgerError::IdempotencyConflict { .. } => Status::already_exists(e.to_string()),
                LedgerError::Corrupt { .. } => {
                    tracing::error!(error = %e, "corrupt ledger");
                    Status::internal("internal error")
                }
                _ => Status::failed_precondition(e.to_string()),
            },
            StoreError::Refused(r) => {
                let code = match r {
                    IssueRefusal::ProfileCap => pb::RejectionCode::ProfileCapReached,
                    IssueRefusal::FrequencyCap => pb::RejectionCode::FrequencyCapped,
                    IssueRefusal::Budget => pb::RejectionCode::BudgetExhausted,
                    IssueRefusal::NotActive => pb::RejectionCode::OfferPaused,
                };
                Status::failed_precondition(format!("{}: {e}", code.as_str_name()))
            }
            StoreError::Precondition(m) => Status::failed_precondition(m),
            StoreError::Db(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) => {
                tracing::error!(error = %e, "database unavailable");
                Status::unavailable("database unavailable; retry")
            }
            other => {
                tracing::error!(error = %other, "offer store failure");
                Status::internal("internal error")
            }
        }
    }
}

/// The upstream services the decision path reads.
#[derive(Debug, Clone)]
pub struct Upstreams {
    /// ProfileService.
    pub profiles: Arc<dyn ConsentSource>,
    /// SegmentationService.
    pub segments: Arc<dyn SegmentSource>,
    /// ExperimentService.
    pub experiments: Arc<dyn ExperimentSource>,
}

/// The OfferService.
#[derive(Debug, Clone)]
pub struct OfferServiceImpl {
    store: Arc<dyn OfferStore>,
    program: Arc<Program>,
    up: Upstreams,
    holdout: HoldoutConfig,
    frequency_cap: Option<FrequencyCap>,
    rules: Arc<RuleCache>,
    active: Arc<ActiveOffers>,
    model: Arc<ReadModel>,
    /// Whether the feed consumers have caught up since the start (health SERVING); true
    /// unless [`crate::setup::build`] starts the consumers.
    ready: Arc<tokio::sync::watch::Sender<bool>>,
}

/// The ACTIVE catalogue as Decide reads it, kept for [`ActiveOffers::TTL`] so a decision does
/// not read and decode every offer from the database. Every catalogue or usage write of this
/// process clears it at once; another replica's writes show within the TTL (plus one reload,
/// which one background task does while requests keep using the expired snapshot, so that
/// expiry does not stall every request in flight). After a clear, one request reloads it and
/// the others that find it missing meanwhile wait for that load instead of each reading the
/// whole catalogue (every issuance clears it). Decide is advisory: IssueOffer re-checks
/// status, caps and budget atomically in the store.
#[derive(Debug, Default)]
struct ActiveOffers {
    cached: std::sync::Mutex<Option<(std::time::Instant, Arc<OfferSnapshot>)>>,
    /// Bumped by every clear: a load that started before a clear is not kept.
    generation: std::sync::atomic::AtomicU64,
    /// A background reload is running.
    reloading: std::sync::atomic::AtomicBool,
    /// Held by the one request that loads a missing catalogue.
    loading: tokio::sync::Mutex<()>,
}

/// What [`ActiveOffers::lookup`] found.
enum Lookup {
    /// A snapshot younger than the TTL.
    Fresh(Arc<OfferSnapshot>),
    /// An expired snapshot; the caller should start the (single) reload.
    Expired(Arc<OfferSnapshot>),
    /// An expired snapshot, already being reloaded.
    Reloading(Arc<OfferSnapshot>),
    /// Nothing (cleared or never loaded): the caller loads.
    Missing,
}

/// Offers as a decision reads them, with what can be derived once rather than per request.
#[derive(Debug)]
struct OfferSnapshot {
    offers: Vec<OfferRecord>,
    /// All the offers as the pure decision's catalogue, used as is when no offer needs a
    /// per-request rejection or arm rewrite (the common case); `None` if it does not validate
    /// (each request then builds and reports its own).
    catalogue: Option<Catalogue>,
    /// Budget usage per offer at the snapshot.
    usage: HashMap<catalogue::OfferId, BudgetUsage>,
}

impl OfferSnapshot {
    fn new(offers: Vec<OfferRecord>, frequency_cap: Option<FrequencyCap>) -> Self {
        let catalogue = Catalogue::new(
            offers.iter().map(convert::domain_offer).collect(),
            frequency_cap,
        )
        .ok();
        let usage = offers
            .iter()
            .map(|r| {
                (
                    catalogue::OfferId::new(&r.offer.offer_id),
                    BudgetUsage {
                        issued: u64::try_from(r.issued).unwrap_or(0),
                        spent_minor: r.cost_booked,
                    },
                )
            })
            .collect();
        Self {
            offers,
            catalogue,
            usage,
        }
    }
}

impl ActiveOffers {
    const TTL: std::time::Duration = std::time::Duration::from_secs(1);

    fn lookup(&self) -> Lookup {
        use std::sync::atomic::Ordering;
        let Ok(guard) = self.cached.lock() else {
            return Lookup::Missing;
        };
        match guard.as_ref() {
            None => Lookup::Missing,
            Some((at, s)) if at.elapsed() < Self::TTL => Lookup::Fresh(s.clone()),
            Some((_, s)) => {
                if self.reloading.swap(true, Ordering::AcqRel) {
                    Lookup::Reloading(s.clone())
                } else {
                    Lookup::Expired(s.clone())
                }
            }
        }
    }

    /// The snapshot held, whatever its age. Any snapshot held was loaded after the last
    /// clear: a clear empties the slot and [`Self::put`] refuses loads begun before it.
    fn current(&self) -> Option<Arc<OfferSnapshot>> {
        let guard = self.cached.lock().ok()?;
        guard.as_ref().map(|(_, s)| s.clone())
    }

    /// The generation to pass to [`Self::put`] for a load starting now.
    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Keeps `offers` unless a clear happened since `generation` was read.
    fn put(&self, offers: Arc<OfferSnapshot>, generation: u64) {
        if let Ok(mut g) = self.cached.lock()
            && self.generation() == generation
        {
            *g = Some((std::time::Instant::now(), offers));
        }
    }

    fn reload_done(&self) {
        self.reloading
            .store(false, std::sync::atomic::Ordering::Release);
    }

    fn clear(&self) {
        if let Ok(mut g) = self.cached.lock() {
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            *g = None;
        }
    }
}

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A new random 12-character Crockford base32 code.
pub fn new_code() -> String {
    let mut rng = rand::thread_rng();
    (0..12)
        .map(|_| char::from(CROCKFORD[rng.gen_range(0..32)]))
        .collect()
}

/// A code as typed by a customer, normalised: upper case, hyphens and spaces removed.
pub fn normalise_code(code: &str) -> String {
    code.chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

fn uuid_field(field: &str, v: &str) -> Result<(), Status> {
    uuid::Uuid::parse_str(v)
        .map(|_| ())
        .map_err(|_| invalid_field(field, "must be a UUID"))
}

fn slug_field(field: &str, v: &str) -> Result<(), Status> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && (b == b'_' || b == b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(invalid_field(field, "must match [a-z0-9][a-z0-9_-]{0,63}"))
    }
}

fn key_field(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() || v.len() > 128 || !v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(invalid_field(
            field,
            "must be 1..=128 bytes of printable ASCII",
        ));
    }
    Ok(())
}

fn len_field(field: &str, v: &str, min: usize, max: usize) -> Result<(), Status> {
    if v.len() < min || v.len() > max {
        return Err(invalid_field(field, format!("must be {min}..={max} bytes")));
    }
    Ok(())
}

fn channel_field(field: &str, c: i32) -> Result<catalogue::Channel, Status> {
    convert::channel(c).ok_or_else(|| invalid_field(field, "required: a known channel"))
}

fn page_size(n: i32) -> i64 {
    match n {
        n if n <= 0 => 50,
        n => i64::from(n.min(500)),
    }
}

fn offset_token(field: &str, token: &str) -> Result<i64, Status> {
    if token.is_empty() {
        return Ok(0);
    }
    token
        .parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| invalid_field(field, "invalid page token"))
}

fn money_field(field: &str, m: &pb::Money, positive: bool) -> Result<(), Status> {
    if crate::money::CurrencyCode::new(&m.currency).is_err() {
        return Err(invalid_field(
            &format!("{field}.currency"),
            "must be an ISO 4217 code",
        ));
    }
    if m.amount_minor < 0 || (positive && m.amount_minor == 0) {
        return Err(invalid_field(
            &format!("{field}.amount_minor"),
            if positive {
                "must be > 0"
            } else {
                "must be >= 0"
            },
        ));
    }
    Ok(())
}

/// Validates a catalogue offer (output-only fields already stripped).
fn validate_offer(o: &pb::Offer) -> Result<(), Status> {
    use pb::offer::Benefit as B;
    slug_field("offer.offer_id", &o.offer_id)?;
    len_field("offer.display_name", &o.display_name, 1, 128)?;
    len_field("offer.description", &o.description, 0, 2048)?;
    match &o.benefit {
        None => {
            return Err(invalid_field(
                "offer.benefit",
                "exactly one benefit is required",
            ));
        }
        Some(B::PercentageDiscount(p)) => {
            if !(1..=10_000).contains(&p.percent_bps) {
                return Err(invalid_field(
                    "offer.percentage_discount.percent_bps",
                    "must be 1..=10000",
                ));
            }
        }
        Some(B::FixedDiscount(f)) => match &f.amount {
            Some(m) => money_field("offer.fixed_discount.amount", m, true)?,
            None => return Err(invalid_field("offer.fixed_discount.amount", "required")),
        },
        Some(B::BonusPoints(b)) => {
            if !(1..=10_000_000).contains(&b.points) {
                return Err(invalid_field(
                    "offer.bonus_points.points",
                    "must be 1..=10000000",
                ));
            }
        }
        Some(B::PointsMultiplier(m)) => {
            if !(10_001..=100_000).contains(&m.multiplier_bps) {
                return Err(invalid_field(
                    "offer.points_multiplier.multiplier_bps",
                    "must be 10001..=100000",
                ));
            }
        }
        Some(B::Perk(p)) => len_field("offer.perk.title", &p.title, 1, 128)?,
        Some(B::Coupon(c)) => len_field("offer.coupon.code", &c.code, 1, 64)?,
        Some(B::FreeShipping(_)) => {}
    }
    let starts = o
        .starts_at
        .as_ref()
        .and_then(micros)
        .ok_or_else(|| invalid_field("offer.starts_at", "required"))?;
    if let Some(end) = o.ends_at.as_ref() {
        let end = micros(end).ok_or_else(|| invalid_field("offer.ends_at", "invalid timestamp"))?;
        if end <= starts {
            return Err(invalid_field("offer.ends_at", "must be after starts_at"));
        }
    }
    let validity = o.code_validity.as_ref().map_or(0, |d| d.seconds);
    if validity < 0 {
        return Err(invalid_field("offer.code_validity", "must be >= 0"));
    }
    if validity == 0 && o.ends_at.is_none() {
        return Err(invalid_field(
            "offer.code_validity",
            "required when the offer has no ends_at",
        ));
    }
    if !(0..=1000).contains(&o.priority) {
        return Err(invalid_field("offer.priority", "must be 0..=1000"));
    }
    match &o.expected_value {
        Some(m) => money_field("offer.expected_value", m, false)?,
        None => return Err(invalid_field("offer.expected_value", "required")),
    }
    if let Some(cap) = o.per_profile_cap
        && !(1..=1000).contains(&cap)
    {
        return Err(invalid_field("offer.per_profile_cap", "must be 1..=1000"));
    }
    if let Some(b) = &o.budget {
        match &b.limit {
            Some(pb::budget::Limit::MaxIssued(n)) if *n <= 0 => {
                return Err(invalid_field("offer.budget.max_issued", "must be > 0"));
            }
            Some(pb::budget::Limit::MaxCost(m)) => {
                let limit = m
                    .limit
                    .as_ref()
                    .ok_or_else(|| invalid_field("offer.budget.max_cost.limit", "required"))?;
                money_field("offer.budget.max_cost.limit", limit, true)?;
                if let Some(c) = &m.cost_per_issue {
                    money_field("offer.budget.max_cost.cost_per_issue", c, false)?;
                    if c.currency != limit.currency {
                        return Err(invalid_field(
                            "offer.budget.max_cost.cost_per_issue.currency",
                            "must be the limit's currency",
                        ));
                    }
                }
            }
            None => {
                return Err(invalid_field(
                    "offer.budget.limit",
                    "required when budget is set",
                ));
            }
            _ => {}
        }
    }
    if let Some(x) = &o.experiment {
        if x.experiment_key.is_empty() {
            return Err(invalid_field("offer.experiment.experiment_key", "required"));
        }
        if x.variant_keys.is_empty() || x.variant_keys.len() > 20 {
            return Err(invalid_field(
                "offer.experiment.variant_keys",
                "1..=20 keys",
            ));
        }
    }
    if let Some(e) = &o.eligibility {
        if !e.rule_expression.trim().is_empty() {
            if e.rule_expression.len() > clientele_rules::MAX_SOURCE_BYTES {
                return Err(invalid_field(
                    eligibility_rule::RULE_FIELD,
                    format!("at most {} bytes", clientele_rules::MAX_SOURCE_BYTES),
                ));
            }
            eligibility_rule::compile_offer_rule(&e.rule_expression).map_err(|err| {
                invalid_field(
                    eligibility_rule::RULE_FIELD,
                    eligibility_rule::describe_error(&err),
                )
            })?;
        }
        for (i, r) in e.include_segments.iter().enumerate() {
            slug_field(
                &format!("offer.eligibility.include_segments[{i}].segment_id"),
                &r.segment_id,
            )?;
        }
        for (i, r) in e.exclude_segments.iter().enumerate() {
            slug_field(
                &format!("offer.eligibility.exclude_segments[{i}].segment_id"),
                &r.segment_id,
            )?;
        }
        for (i, c) in e.channels.iter().enumerate() {
            channel_field(&format!("offer.eligibility.channels[{i}]"), *c)?;
        }
        if e.store_ids.len() > 1000 {
            return Err(invalid_field("offer.eligibility.store_ids", "at most 1000"));
        }
    }
    match pb::OfferStatus::try_from(o.status) {
        Ok(pb::OfferStatus::Unspecified | pb::OfferStatus::Active | pb::OfferStatus::Paused) => {}
        _ => return Err(invalid_field("offer.status", "must be ACTIVE or PAUSED")),
    }
    Ok(())
}

/// What a decision knows about the profile.
struct Facts {
    granted: std::collections::BTreeSet<i32>,
    customer: CustomerContext,
    rule_facts: RuleFacts,
    variant_keys: HashMap<String, String>,
    not_in_experiment: HashMap<String, String>,
    /// In the global holdout (the customer context says false: exemptions apply per offer).
    in_holdout: bool,
}

impl OfferServiceImpl {
    /// A service over `store` running `program`, reading `up`, with Decide's read models
    /// sized by `read_model` (the store is wrapped so that its writes invalidate them).
    pub fn new(
        store: Arc<dyn OfferStore>,
        program: Program,
        up: Upstreams,
        holdout: HoldoutConfig,
        frequency_cap: Option<FrequencyCap>,
        read_model: ReadModelConfig,
    ) -> Self {
        let model = Arc::new(ReadModel::new(read_model));
        Self {
            store: Arc::new(crate::read_model::InvalidatingStore::new(
                store,
                model.clone(),
            )),
            model,
            program: Arc::new(program),
            up,
            holdout,
            frequency_cap,
            rules: Arc::default(),
            active: Arc::default(),
            ready: Arc::new(tokio::sync::watch::channel(true).0),
        }
    }

    /// Whether the service reports SERVING on the health service: false from the start of the
    /// feed consumers until they first caught up with the feeds (or the timeout passed).
    pub fn readiness(&self) -> tokio::sync::watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Sets the readiness reported on the health service.
    pub fn set_ready(&self, ready: bool) {
        self.ready.send_replace(ready);
    }

    /// Decide's read models (the consumers invalidate them from the feeds).
    pub fn read_model(&self) -> &Arc<ReadModel> {
        &self.model
    }

    /// The store (for consumers and tests).
    pub fn store(&self) -> &Arc<dyn OfferStore> {
        &self.store
    }

    /// The programme.
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Adds the service to `mount` with its scopes.
    pub fn mount(self, mount: &mut Mount) {
        mount.add_readiness("clientele.v1.OfferService", self.readiness());
        mount.add(
            "clientele.v1.OfferService",
            OfferServiceServer::new(self),
            &[
                ("GetTier", "offers:read"),
                ("ListTiers", "offers:read"),
                ("GetBalance", "offers:read"),
                ("ListLedgerEntries", "offers:read"),
                ("AdjustPoints", "offers:admin"),
                ("RedeemPoints", "offers:write"),
                ("CreateOffer", "offers:admin"),
                ("UpdateOffer", "offers:admin"),
                ("GetOffer", "offers:read"),
                ("ListOffers", "offers:read"),
                ("ArchiveOffer", "offers:admin"),
                ("Decide", "offers:read"),
                ("IssueOffer", "offers:write"),
                ("RedeemOffer", "offers:write"),
                ("CancelOffer", "offers:write"),
                ("ListIssuedOffers", "offers:read"),
                ("CreateTrigger", "offers:admin"),
                ("ListTriggers", "offers:read"),
                ("DeleteTrigger", "offers:admin"),
            ],
        );
    }

    fn pb_tier(&self, id: &TierId) -> Option<pb::Tier> {
        let tiers = &self.program.tiers.tiers;
        let (rank, t) = tiers.iter().enumerate().find(|(_, t)| &t.id == id)?;
        Some(pb::Tier {
            tier_id: t.id.0.clone(),
            display_name: t.name.clone(),
            rank: i32::try_from(rank).unwrap_or(i32::MAX),
            threshold: t.threshold,
            points_multiplier_bps: i32::try_from(t.benefits.points_multiplier_bp)
                .unwrap_or(i32::MAX),
            perks: t.benefits.perks.clone(),
        })
    }

    async fn require_profile(
        &self,
        profile_id: &str,
    ) -> Result<crate::upstream::ProfileFacts, Status> {
        self.up
            .profiles
            .profile(profile_id)
            .await?
            .ok_or_else(|| not_found("profile", profile_id))
    }

    /// The upstream sources (for the consumers: segment memberships at accrual).
    pub fn upstreams(&self) -> &Upstreams {
        &self.up
    }

    /// The profile's tier standing at `now`: from the ledger when tiers qualify by points
    /// earned, from the stored order activity when they qualify by spend. `exclude` leaves out
    /// the order being accrued.
    pub async fn tier_of(
        &self,
        profile_id: &str,
        ledger: &crate::ledger::PointsLedger,
        now: DateTime<Utc>,
        exclude: Option<&str>,
    ) -> Result<crate::tiers::TierDecision, Status> {
        let activity = if self.program.tiers_need_activity() {
            self.store.activity(profile_id).await?
        } else {
            Vec::new()
        };
        self.program
            .tier_standing_with(ledger, &activity, now, exclude)
            .map_err(|e| Status::internal(format!("tier configuration: {e}")))
    }

    /// Applies a ledger command and maps the outcome.
    async fn ledger_write(
        &self,
        profile_id: &str,
        key: String,
        command: LedgerCommand,
        meta: EntryMeta,
    ) -> Result<(pb::LedgerEntry, i64), Status> {
        let out = self
            .store
            .apply_ledger(profile_id, &key, command, Utc::now(), meta, None)
            .await?;
        let entry = out
            .entries
            .first()
            .map(pb_entry)
            .ok_or_else(|| Status::internal("ledger wrote no entry"))?;
        Ok((entry, out.available))
    }

    /// Loads the ACTIVE offers into [`ActiveOffers`].
    async fn load_active(&self) -> Result<Arc<OfferSnapshot>, Status> {
        let generation = self.active.generation();
        let o = Arc::new(OfferSnapshot::new(
            self.store
                .list_offers(&[pb::OfferStatus::Active as i32], "", i64::MAX)
                .await?,
            self.frequency_cap,
        ));
        self.active.put(o.clone(), generation);
        Ok(o)
    }

    /// Loads the missing catalogue once for every request that finds it missing: the first
    /// loads while the others wait, then take its snapshot (loaded after the clear they saw).
    async fn load_missing_active(&self) -> Result<Arc<OfferSnapshot>, Status> {
        let _loading = self.active.loading.lock().await;
        if let Some(o) = self.active.current() {
            return Ok(o);
        }
        self.load_active().await
    }

    /// The profile's ledger view, read from the store.
    async fn load_ledger_view(&self, profile_id: &str) -> Result<LedgerView, Status> {
        let (ledger, usage, activity) = tokio::join!(
            self.store.ledger(profile_id),
            self.store.profile_usage(profile_id),
            async {
                if self.program.tiers_need_activity() {
                    self.store.activity(profile_id).await
                } else {
                    Ok(Vec::new())
                }
            },
        );
        let (ledger, _) = ledger?;
        let (per_offer, issue_times) = usage?;
        Ok(LedgerView {
            ledger,
            activity: activity?,
            per_offer,
            issue_times,
        })
    }

    /// Everything the decision needs about the profile, for `offers`: from the read models
    /// when `cached` (Decide), else read fresh (IssueOffer and triggers).
    async fn facts(
        &self,
        profile_id: &str,
        offers: &[OfferRecord],
        now: DateTime<Utc>,
        log_exposure: bool,
        attributes: &HashMap<String, pb::Value>,
        cached: bool,
    ) -> Result<Facts, Status> {
        // Independent reads, concurrently; the profile's existence is reported first.
        let (profile, segments, view) = if cached {
            // The loaders own what they read with: a hot entry is reloaded in the background.
            let m = &self.model;
            let id = || profile_id.to_string();
            tokio::join!(
                m.profile(profile_id, || {
                    let (up, id) = (self.up.profiles.clone(), id());
                    async move { up.profile(&id).await }
                }),
                m.segments(profile_id, || {
                    let (up, id) = (self.up.segments.clone(), id());
                    async move { up.segments(&id).await }
                }),
                m.ledger(profile_id, || {
                    let (me, id) = (self.clone(), id());
                    async move { me.load_ledger_view(&id).await }
                }),
            )
        } else {
            let (p, s, v) = tokio::join!(
                self.up.profiles.profile(profile_id),
                self.up.segments.segments(profile_id),
                self.load_ledger_view(profile_id),
            );
            (p.map(|p| p.map(Arc::new)), s.map(Arc::new), v.map(Arc::new))
        };
        let profile = profile?.ok_or_else(|| not_found("profile", profile_id))?;
        let segments = segments?;
        let view = view?;
        let ledger = &view.ledger;
        let tier = self
            .program
            .tier_standing_with(ledger, &view.activity, now, None)
            .map_err(|e| Status::internal(format!("tier configuration: {e}")))?;
        let rule_facts = rule_facts(&profile, &segments, ledger, &tier, now, attributes);
        let mut arms = BTreeMap::new();
        let mut variant_keys = HashMap::new();
        let mut not_in = HashMap::new();
        for rec in offers {
            let Some(x) = &rec.offer.experiment else {
                continue;
            };
            if arms.contains_key(&catalogue::ExperimentId::new(&x.experiment_key))
                || not_in.contains_key(&x.experiment_key)
            {
                continue;
            }
            match self
                .up
                .experiments
                .assign(&x.experiment_key, profile_id, log_exposure)
                .await?
            {
                Ok(arm) => {
                    let a = if arm.variant_index == 0 {
                        catalogue::ExperimentArm::Control
                    } else {
                        catalogue::ExperimentArm::Variant(arm.variant_key.clone())
                    };
                    variant_keys.insert(x.experiment_key.clone(), arm.variant_key);
                    arms.insert(catalogue::ExperimentId::new(&x.experiment_key), a);
                }
                Err(reason) => {
                    not_in.insert(x.experiment_key.clone(), reason);
                }
            }
        }
        let consents = profile
            .granted
            .iter()
            .filter_map(|p| convert::purpose(*p))
            .collect();
        Ok(Facts {
            granted: profile.granted.clone(),
            customer: CustomerContext {
                segments: segments
                    .segments
                    .iter()
                    .map(catalogue::SegmentId::new)
                    .collect(),
                tier: Some(tier.tier),
                lifecycle: segments.lifecycle.map(convert::lifecycle),
                consents,
                // The holdout is applied by `run_decision`, with exemptions.
                in_global_holdout: false,
                issued_per_offer: view
                    .per_offer
                    .iter()
                    .map(|(k, v)| (catalogue::OfferId::new(k), *v))
                    .collect(),
                recent_issuances: view.issue_times.iter().copied().map(utc).collect(),
                experiment_arms: arms,
            },
            rule_facts,
            variant_keys,
            not_in_experiment: not_in,
            in_holdout: self.holdout.enabled && self.holdout.contains(profile_id),
        })
    }

    /// Runs the decision over `offers` for `facts`, honouring holdout exemptions, extra
    /// consents and store ids. Returns the domain decision plus extra rejections. `budget`
    /// (Decide): the offers' prebuilt catalogue, used when no offer is rejected here or has its
    /// arms rewritten, and their budget usage; `None` (issuing) leaves budgets to the store.
    #[allow(clippy::too_many_arguments)]
    fn run_decision(
        &self,
        offers: &[OfferRecord],
        facts: &Facts,
        now: DateTime<Utc>,
        channel: i32,
        store_id: &str,
        max_offers: usize,
        explain: bool,
        budget: Option<(
            Option<&Catalogue>,
            &HashMap<catalogue::OfferId, BudgetUsage>,
        )>,
    ) -> Result<(Decision, BTreeMap<String, Vec<pb::OfferRejection>>), Status> {
        let mut extra: BTreeMap<String, Vec<pb::OfferRejection>> = BTreeMap::new();
        let domain_channel = channel_field("channel", channel)?;
        let no_eligibility = pb::Eligibility::default();
        // Offers the pure decision sees: `None` while every offer passes unchanged.
        let mut candidates: Option<Vec<catalogue::Offer>> = None;
        for (i, rec) in offers.iter().enumerate() {
            let mut rejections = Vec::new();
            let id = &rec.offer.offer_id;
            if rec.status == pb::OfferStatus::Paused as i32 {
                rejections.push(rej(pb::RejectionCode::OfferPaused, "the offer is paused"));
            } else if rec.status == pb::OfferStatus::Archived as i32 {
                rejections.push(rej(
                    pb::RejectionCode::OfferArchived,
                    "the offer is archived",
                ));
            }
            let e = rec.offer.eligibility.as_ref().unwrap_or(&no_eligibility);
            for req in e.consents.iter().filter(|r| r.channel == channel) {
                if !facts.granted.contains(&req.purpose) {
                    rejections.push(pb::OfferRejection {
                        code: pb::RejectionCode::ConsentMissing as i32,
                        subject: Some(pb::ReasonSubject {
                            subject: Some(pb::reason_subject::Subject::ConsentPurpose(req.purpose)),
                        }),
                        detail: "a required consent is not granted".into(),
                    });
                }
            }
            if channel == pb::Channel::Pos as i32
                && !e.store_ids.is_empty()
                && !e.store_ids.iter().any(|s| s == store_id)
            {
                rejections.push(pb::OfferRejection {
                    code: pb::RejectionCode::StoreNotAllowed as i32,
                    subject: Some(pb::ReasonSubject {
                        subject: Some(pb::reason_subject::Subject::StoreId(store_id.into())),
                    }),
                    detail: "the store is not eligible".into(),
                });
            }
            if facts.in_holdout && !rec.offer.holdout_exempt {
                rejections.push(rej(
                    pb::RejectionCode::GlobalHoldout,
                    "in the global holdout",
                ));
            }
            if let Some(x) = &rec.offer.experiment
                && let Some(reason) = facts.not_in_experiment.get(&x.experiment_key)
            {
                rejections.push(rej(pb::RejectionCode::NotInExperiment, reason));
            }
            let control_key = rec.offer.experiment.as_ref().and_then(|x| {
                let arm = facts
                    .customer
                    .experiment_arms
                    .get(&catalogue::ExperimentId::new(&x.experiment_key))?;
                let k = facts.variant_keys.get(&x.experiment_key)?;
                (matches!(arm, catalogue::ExperimentArm::Control) && x.variant_keys.contains(k))
                    .then_some(k)
            });
            if rejections.is_empty() && control_key.is_none() {
                if let Some(c) = candidates.as_mut() {
                    c.push(convert::domain_offer(rec));
                }
                continue;
            }
            // From here on the catalogue differs from the prebuilt one: build it.
            let c = candidates
                .get_or_insert_with(|| offers[..i].iter().map(convert::domain_offer).collect());
            if rejections.is_empty() {
                let mut d = convert::domain_offer(rec);
                if let (Some(k), Some(dx)) = (control_key, d.experiment.as_mut()) {
                    // The control's own key names the control arm.
                    dx.arms
                        .remove(&catalogue::ExperimentArm::Variant(k.clone()));
                    dx.arms.insert(catalogue::ExperimentArm::Control);
                }
                c.push(d);
            } else {
                extra.insert(id.clone(), rejections);
            }
        }
        let no_usage = HashMap::new();
        let (prebuilt, usage) = match budget {
            Some((prebuilt, usage)) => (prebuilt, usage),
            None => (None, &no_usage),
        };
        let built;
        let catalogue = match (candidates, prebuilt) {
            (None, Some(c)) => c,
            (candidates, _) => {
                let candidates = candidates
                    .unwrap_or_else(|| offers.iter().map(convert::domain_offer).collect());
                built = Catalogue::new(candidates, self.frequency_cap)
                    .map_err(|e| Status::internal(format!("catalogue: {e}")))?;
                &built
            }
        };
        let rules = CompiledRules {
            cache: &self.rules,
            facts: &facts.rule_facts,
        };
        let decision = decide(
            catalogue,
            &facts.customer,
            &RequestContext {
                now,
                channel: domain_channel,
                max_offers,
                explain_rejections: explain,
                budget_usage: usage,
                rules: &rules,
            },
        );
        Ok((decision, extra))
    }
}

/// Copies one field of `Eligibility` (a FieldMask sub-path such as `tier_ids`) from `new`
/// into `e`; false if `field` is not a (leaf) field of Eligibility.
fn update_eligibility_field(e: &mut pb::Eligibility, new: &pb::Eligibility, field: &str) -> bool {
    match field {
        "include_segments" => e.include_segments.clone_from(&new.include_segments),
        "exclude_segments" => e.exclude_segments.clone_from(&new.exclude_segments),
        "tier_ids" => e.tier_ids.clone_from(&new.tier_ids),
        "lifecycle_states" => e.lifecycle_states.clone_from(&new.lifecycle_states),
        "rule_expression" => e.rule_expression.clone_from(&new.rule_expression),
        "consents" => e.consents.clone_from(&new.consents),
        "store_ids" => e.store_ids.clone_from(&new.store_ids),
        "channels" => e.channels.clone_from(&new.channels),
        _ => return false,
    }
    true
}

/// Checks DecideRequest.attributes: at most 32, keys in the trait-name format, values set.
fn validate_attributes(attributes: &HashMap<String, pb::Value>) -> Result<(), Status> {
    if attributes.len() > 32 {
        return Err(invalid_field("attributes", "at most 32 entries"));
    }
    for (k, v) in attributes {
        let ok = (1..=64).contains(&k.len())
            && k.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.');
        if !ok {
            return Err(invalid_field(
                &format!("attributes[{k}]"),
                "keys are 1..=64 bytes of [a-z0-9_.]",
            ));
        }
        match &v.kind {
            None => return Err(invalid_field(&format!("attributes[{k}]"), "value required")),
            Some(pb::value::Kind::DoubleValue(d)) if !d.is_finite() => {
                return Err(invalid_field(&format!("attributes[{k}]"), "must be finite"));
            }
            Some(pb::value::Kind::StringValue(s)) if s.len() > 1024 => {
                return Err(invalid_field(
                    &format!("attributes[{k}]"),
                    "at most 1024 bytes",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// What rules read about the profile: segmentation's features plus tier and points from the
/// ledger, traits overlaid by the request's attributes, granted consents and memberships.
fn rule_facts(
    profile: &crate::upstream::ProfileFacts,
    segments: &crate::upstream::SegmentFacts,
    ledger: &crate::ledger::PointsLedger,
    tier: &crate::tiers::TierDecision,
    now: DateTime<Utc>,
    attributes: &HashMap<String, pb::Value>,
) -> RuleFacts {
    use clientele_rules::Value;
    let mut features = segments.features.clone();
    features.insert("tier".into(), Value::String(tier.tier.0.clone()));
    #[allow(clippy::cast_precision_loss)]
    {
        features.insert(
            "points_available".into(),
            Value::Number(ledger.balance(now) as f64),
        );
        features.insert(
            "tier_qualifying_value".into(),
            Value::Number(tier.qualifying_value as f64),
        );
    }
    let mut traits: BTreeMap<String, Value> = profile
        .traits
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), crate::upstream::rule_value(v)?)))
        .collect();
    for (k, v) in attributes {
        if let Some(v) = crate::upstream::rule_value(v) {
            traits.insert(k.clone(), v);
        }
    }
    let consents = profile
        .granted
        .iter()
        .filter_map(|p| {
            Some(match pb::ConsentPurpose::try_from(*p).ok()? {
                pb::ConsentPurpose::Email => "email",
                pb::ConsentPurpose::Sms => "sms",
                pb::ConsentPurpose::Push => "push",
                pb::ConsentPurpose::Personalisation => "personalisation",
                pb::ConsentPurpose::Analytics => "analytics",
                pb::ConsentPurpose::Unspecified => return None,
            })
        })
        .map(str::to_string)
        .collect();
    RuleFacts {
        features,
        traits,
        consents,
        segments: segments.segments.clone(),
    }
}

fn rej(code: pb::RejectionCode, detail: &str) -> pb::OfferRejection {
    pb::OfferRejection {
        code: code as i32,
        subject: None,
        detail: detail.to_string(),
    }
}

fn first_rejection_message(rs: &[pb::OfferRejection]) -> String {
    rs.first().map_or_else(
        || "REJECTION_CODE_UNSPECIFIED: not eligible".to_string(),
        |r| {
            let name = pb::RejectionCode::try_from(r.code)
                .map_or("REJECTION_CODE_UNSPECIFIED", |c| c.as_str_name());
            format!("{name}: {}", r.detail)
        },
    )
}

#[tonic::async_trait]
impl OfferService for OfferServiceImpl {
    async fn get_tier(
        &self,
        request: Request<pb::GetTierRequest>,
    ) -> Result<Response<pb::GetTierResponse>, Status> {
        let req = request.into_inner();
        if req.tier_id.is_empty() {
            return Err(invalid_field("tier_id", "required"));
        }
        let tier = self
            .pb_tier(&TierId::new(&req.tier_id))
            .ok_or_else(|| not_found("tier", &req.tier_id))?;
        Ok(Response::new(pb::GetTierResponse { tier: Some(tier) }))
    }

    async fn list_tiers(
        &self,
        _request: Request<pb::ListTiersRequest>,
    ) -> Result<Response<pb::ListTiersResponse>, Status> {
        let p = &self.program;
        let days = |d: u32| prost_types::Duration {
            seconds: i64::from(d) * 86_400,
            nanos: 0,
        };
        let (metric, currency) = match p.tiers.metric {
            crate::tiers::QualifyingMetric::PointsEarned => {
                (pb::QualifyingMetric::PointsEarned, String::new())
            }
            crate::tiers::QualifyingMetric::Spend { currency } => {
                (pb::QualifyingMetric::Spend, currency.as_str().to_string())
            }
        };
        Ok(Response::new(pb::ListTiersResponse {
            tiers: p
                .tiers
                .tiers
                .iter()
                .filter_map(|t| self.pb_tier(&t.id))
                .collect(),
            rules: Some(pb::ProgramRules {
                qualifying_metric: metric as i32,
                spend_currency: currency,
                qualifying_period: Some(days(p.tiers.qualifying_period_days)),
                downgrade_grace: Some(days(p.tiers.downgrade_grace_days)),
                earn_rates: p
                    .earning
                    .base_rates
                    .iter()
                    .map(|r| pb::EarnRate {
                        currency: r.currency.as_str().to_string(),
                        points: r.points,
                        per_minor: r.per_minor,
                        min_order_minor: r.min_order_minor,
                    })
                    .collect(),
                points_lifetime: p.earning.points_valid_days.map(days),
            }),
        }))
    }

    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceResponse>, Status> {
        let req = request.into_inner();
        uuid_field("profile_id", &req.profile_id)?;
        self.require_profile(&req.profile_id).await?;
        let now = Utc::now();
        let (ledger, stored) = self.store.ledger(&req.profile_id).await?;
        let tier = self.tier_of(&req.profile_id, &ledger, now, None).await?;
        let ids: HashMap<u64, &str> = stored
            .iter()
            .map(|s| (s.entry.seq.0, s.entry_id.as_str()))
            .collect();
        let batches: Vec<_> = ledger
            .batches(now)
            .into_iter()
            .filter(|b| !b.expired && b.remaining > 0)
            .collect();
        let horizon = now + Duration::days(30);
        let mut earned = 0;
        let mut redeemed = 0;
        for s in &stored {
            use crate::ledger::EntryChange as C;
            match &s.entry.change {
                C::Accrued { points, .. } => earned += points,
                C::Reversed {
                    draws, unrecovered, ..
                } => {
                    earned -= draws
                        .iter()
                        .chain(unrecovered)
                        .map(|d| d.points)
                        .sum::<i64>();
                }
                C::Redeemed { points, .. } => redeemed += points,
                C::RedemptionCancelled {
                    restored,
                    settled_clawback,
                    ..
                } => {
                    redeemed -= restored
                        .iter()
                        .chain(settled_clawback)
                        .map(|d| d.points)
                        .sum::<i64>();
                }
                _ => {}
            }
        }
        let next_tier = tier.next_tier.clone();
        Ok(Response::new(pb::GetBalanceResponse {
            profile_id: req.profile_id.clone(),
            available_points: ledger.balance(now),
            lifetime_earned_points: earned,
            lifetime_redeemed_points: redeemed,
            points_expiring_30d: batches
                .iter()
                .filter(|b| b.expires_at.is_some_and(|e| e <= horizon))
                .map(|b| b.remaining)
                .sum(),
            next_expiry_at: batches
                .iter()
                .filter_map(|b| b.expires_at)
                .min()
                .map(utc_ts),
            batches: batches
                .iter()
                .map(|b| pb::PointsBatch {
                    batch_id: ids.get(&b.batch.0).copied().unwrap_or_default().to_string(),
                    points_earned: b.earned,
                    points_remaining: b.remaining,
                    earned_at: Some(utc_ts(b.earned_at)),
                    expires_at: b.expires_at.map(utc_ts),
                    ledger_entry_id: ids.get(&b.batch.0).copied().unwrap_or_default().to_string(),
                })
                .collect(),
            tier: Some(pb::TierStatus {
                tier_id: tier.tier.0.clone(),
                since: None,
                qualifying_value: tier.qualifying_value,
                next_tier_id: next_tier
                    .as_ref()
                    .map(|n| n.tier.0.clone())
                    .unwrap_or_default(),
                value_to_next_tier: next_tier.map_or(0, |n| n.value_needed),
                downgrade_at: None,
            }),
        }))
    }

    async fn list_ledger_entries(
        &self,
        request: Request<pb::ListLedgerEntriesRequest>,
    ) -> Result<Response<pb::ListLedgerEntriesResponse>, Status> {
        let req = request.into_inner();
        uuid_field("profile_id", &req.profile_id)?;
        let offset = offset_token("page_token", &req.page_token)?;
        let size = page_size(req.page_size);
        let start = req.start_time.as_ref().and_then(micros);
        let end = req.end_time.as_ref().and_then(micros);
        let (_, stored) = self.store.ledger(&req.profile_id).await?;
        let matching: Vec<_> = stored
            .iter()
            .rev()
            .filter(|s| req.kinds.is_empty() || req.kinds.contains(&s.kind))
            .filter(|s| start.is_none_or(|t| s.created_at >= t))
            .filter(|s| end.is_none_or(|t| s.created_at < t))
            .collect();
        let from = usize::try_from(offset).unwrap_or(usize::MAX);
        let take = usize::try_from(size).unwrap_or(50);
        let entries: Vec<_> = matching
            .iter()
            .skip(from)
            .take(take)
            .map(|s| pb_entry(s))
            .collect();
        let next = if from.saturating_add(take) < matching.len() {
            (offset + size).to_string()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListLedgerEntriesResponse {
            entries,
            next_page_token: next,
        }))
    }

    async fn adjust_points(
        &self,
        request: Request<pb::AdjustPointsRequest>,
    ) -> Result<Response<pb::AdjustPointsResponse>, Status> {
        let req = request.into_inner();
        uuid_field("profile_id", &req.profile_id)?;
        if req.points == 0 || !(-1_000_000_000..=1_000_000_000).contains(&req.points) {
            return Err(invalid_field(
                "points",
                "must be non-zero, -1000000000..=1000000000",
            ));
        }
        if !pb::AdjustmentReason::try_from(req.reason)
            .is_ok_and(|r| r != pb::AdjustmentReason::Unspecified)
        {
            return Err(invalid_field("reason", "required"));
        }
        len_field("note", &req.note, 1, 512)?;
        len_field("actor", &req.actor, 1, 128)?;
        key_field("idempotency_key", &req.idempotency_key)?;
        let now = Utc::now();
        let expires_at = match &req.expires_at {
            Some(_) if req.points < 0 => {
                return Err(invalid_field("expires_at", "only for credits"));
            }
            Some(t) => {
                let t = convert::ts_utc(t).ok_or_else(|| invalid_field("expires_at", "invalid"))?;
                if t <= now {
                    return Err(invalid_field("expires_at", "must be in the future"));
                }
                Some(t)
            }
            None if req.points > 0 => self
                .program
                .earning
                .points_valid_days
                .map(|d| now + Duration::days(i64::from(d))),
            None => None,
        };
        self.require_profile(&req.profile_id).await?;
        let reason_name =
            pb::AdjustmentReason::try_from(req.reason).map_or("OTHER", |r| r.as_str_name());
        let (entry, available) = self
            .ledger_write(
                &req.profile_id,
                format!("adjust:{}", req.idempotency_key),
                LedgerCommand::Adjust {
                    points: req.points,
                    reason: format!("{reason_name}: {}", req.note),
                    expires_at,
                },
                EntryMeta {
                    adjustment_reason: req.reason,
                    note: req.note.clone(),
                    actor: req.actor.clone(),
                    ..EntryMeta::default()
                },
            )
            .await?;
        Ok(Response::new(pb::AdjustPointsResponse {
            entry: Some(entry),
            available_points: available,
        }))
    }

    async fn redeem_points(
        &self,
        request: Request<pb::RedeemPointsRequest>,
    ) -> Result<Response<pb::RedeemPointsResponse>, Status> {
        let req = request.into_inner();
        uuid_field("profile_id", &req.profile_id)?;
        if !(1..=1_000_000_000).contains(&req.points) {
            return Err(invalid_field("points", "must be 1..=1000000000"));
        }
        key_field("idempotency_key", &req.idempotency_key)?;
        len_field("reference", &req.reference, 1, 128)?;
        len_field("description", &req.description, 0, 512)?;
        channel_field("channel", req.channel)?;
        len_field("store_id", &req.store_id, 0, 64)?;
        len_field("actor", &req.actor, 0, 128)?;
        let (entry, available) = self
            .ledger_write(
                &req.profile_id,
                format!("redeem:{}", req.idempotency_key),
                LedgerCommand::Redeem {
                    points: req.points,
                    reference: req.reference.clone(),
                },
                EntryMeta {
                    note: req.description.clone(),
                    actor: req.actor.clone(),
                    reference: req.reference.clone(),
                    ..EntryMeta::default()
                },
            )
            .await?;
        Ok(Response::new(pb::RedeemPointsResponse {
            entry: Some(entry),
            available_points: available,
        }))
    }

    async fn create_offer(
        &self,
        request: Request<pb::CreateOfferRequest>,
    ) -> Result<Response<pb::CreateOfferResponse>, Status> {
        let mut offer = request
            .into_inner()
            .offer
            .ok_or_else(|| invalid_field("offer", "required"))?;
        let status = if offer.status == pb::OfferStatus::Paused as i32 {
            pb::OfferStatus::Paused as i32
        } else {
            pb::OfferStatus::Active as i32
        };
        validate_offer(&offer)?;
        convert::strip_output(&mut offer);
        let now = now_micros();
        self.active.clear();
        let (rec, _) = self
            .store
            .create_offer(&OfferRecord {
                offer,
                status,
                version: 1,
                issued: 0,
                redeemed: 0,
                cost_booked: 0,
                created_at: now,
                updated_at: now,
            })
            .await?;
        self.active.clear();
        Ok(Response::new(pb::CreateOfferResponse {
            offer: Some(pb_offer(&rec)),
        }))
    }

    async fn update_offer(
        &self,
        request: Request<pb::UpdateOfferRequest>,
    ) -> Result<Response<pb::UpdateOfferResponse>, Status> {
        let req = request.into_inner();
        let new = req
            .offer
            .ok_or_else(|| invalid_field("offer", "required"))?;
        slug_field("offer.offer_id", &new.offer_id)?;
        let mask = req
            .update_mask
            .filter(|m| !m.paths.is_empty())
            .ok_or_else(|| invalid_field("update_mask", "required"))?;
        let current = self.store.get_offer(&new.offer_id).await?;
        if current.status == pb::OfferStatus::Archived as i32 {
            return Err(Status::failed_precondition(
                "archived offers cannot be updated",
            ));
        }
        if req.expected_version > 0 && req.expected_version != current.version {
            return Err(Status::aborted(format!(
                "offer `{}` is at version {}",
                new.offer_id, current.version
            )));
        }
        let mut o = current.offer.clone();
        let mut status = current.status;
        for (i, path) in mask.paths.iter().enumerate() {
            let (top, rest) = path.split_once('.').unwrap_or((path.as_str(), ""));
            if !rest.is_empty() {
                if top != "eligibility" {
                    return Err(invalid_field(
                        &format!("update_mask.paths[{i}]"),
                        format!(
                            "`{path}`: nested paths are supported only under `eligibility`; \
                             update `{top}` as a whole"
                        ),
                    ));
                }
                let new_e = new.eligibility.clone().unwrap_or_default();
                let e = o.eligibility.get_or_insert_with(Default::default);
                if !update_eligibility_field(e, &new_e, rest) {
                    return Err(invalid_field(
                        &format!("update_mask.paths[{i}]"),
                        format!("`{path}` is not a field of Eligibility"),
                    ));
                }
                continue;
            }
            match top {
                "display_name" => o.display_name.clone_from(&new.display_name),
                "description" => o.description.clone_from(&new.description),
                "eligibility" => o.eligibility.clone_from(&new.eligibility),
                "starts_at" => o.starts_at = new.starts_at,
                "ends_at" => o.ends_at = new.ends_at,
                "code_validity" => o.code_validity = new.code_validity,
                "priority" => o.priority = new.priority,
                "expected_value" => o.expected_value.clone_from(&new.expected_value),
                "per_profile_cap" => o.per_profile_cap = new.per_profile_cap,
                "budget" => o.budget.clone_from(&new.budget),
                "holdout_exempt" => o.holdout_exempt = new.holdout_exempt,
                "transactional" => o.transactional = new.transactional,
                "status" => {
                    if new.status != pb::OfferStatus::Active as i32
                        && new.status != pb::OfferStatus::Paused as i32
                    {
                        return Err(invalid_field("offer.status", "must be ACTIVE or PAUSED"));
                    }
                    status = new.status;
                }
                "percentage_discount"
                | "fixed_discount"
                | "bonus_points"
                | "points_multiplier"
                | "free_shipping"
                | "perk"
                | "coupon"
                | "benefit"
                | "experiment" => {
                    if current.issued > 0 || current.redeemed > 0 {
                        return Err(Status::failed_precondition(
                            "benefit and experiment are immutable once a code has been issued",
                        ));
                    }
                    if top == "experiment" {
                        o.experiment.clone_from(&new.experiment);
                    } else {
                        o.benefit.clone_from(&new.benefit);
                    }
                }
                _ => {
                    return Err(invalid_field(
                        &format!("update_mask.paths[{i}]"),
                        format!("`{path}` cannot be updated"),
                    ));
                }
            }
        }
        validate_offer(&o)?;
        self.active.clear();
        let rec = self
            .store
            .update_offer(&o, status, current.version, now_micros())
            .await?;
        self.active.clear();
        Ok(Response::new(pb::UpdateOfferResponse {
            offer: Some(pb_offer(&rec)),
        }))
    }

    async fn get_offer(
        &self,
        request: Request<pb::GetOfferRequest>,
    ) -> Result<Response<pb::GetOfferResponse>, Status> {
        let req = request.into_inner();
        if req.offer_id.is_empty() {
            return Err(invalid_field("offer_id", "required"));
        }
        let rec = self.store.get_offer(&req.offer_id).await?;
        Ok(Response::new(pb::GetOfferResponse {
            offer: Some(pb_offer(&rec)),
        }))
    }

    async fn list_offers(
        &self,
        request: Request<pb::ListOffersRequest>,
    ) -> Result<Response<pb::ListOffersResponse>, Status> {
        let req = request.into_inner();
        let statuses = if req.statuses.is_empty() {
            vec![
                pb::OfferStatus::Active as i32,
                pb::OfferStatus::Paused as i32,
            ]
        } else {
            req.statuses.clone()
        };
        let size = page_size(req.page_size);
        let valid_at = req.valid_at.as_ref().and_then(micros);
        let mut out = Vec::new();
        let mut after = req.page_token.clone();
        let mut next = String::new();
        'pages: loop {
            let page = self.store.list_offers(&statuses, &after, size).await?;
            if page.is_empty() {
                break;
            }
            for rec in &page {
                after.clone_from(&rec.offer.offer_id);
                let kind_ok = req.kinds.is_empty()
                    || req
                        .kinds
                        .contains(&(convert::offer_kind(rec.offer.benefit.as_ref()) as i32));
                let time_ok = valid_at.is_none_or(|t| {
                    let d = convert::domain_offer(rec);
                    d.is_valid_at(utc(t))
                });
                if kind_ok && time_ok {
                    out.push(pb_offer(rec));
                    if i64::try_from(out.len()).unwrap_or(i64::MAX) >= size {
                        next.clone_from(&rec.offer.offer_id);
                        break 'pages;
                    }
                }
            }
        }
        Ok(Response::new(pb::ListOffersResponse {
            offers: out,
            next_page_token: next,
        }))
    }

    async fn archive_offer(
        &self,
        request: Request<pb::ArchiveOfferRequest>,
    ) -> Result<Response<pb::ArchiveOfferResponse>, Status> {
        let req = request.into_inner();
        if req.offer_id.is_empty() {
            return Err(invalid_field("offer_id", "required"));
        }
        self.active.clear();
        let (rec, cancelled) = self
            .store
            .archive_offer(&req.offer_id, req.cancel_outstanding, now_micros())
            .await?;
        self.active.clear();
        Ok(Response::new(pb::ArchiveOfferResponse {
            offer: Some(pb_offer(&rec)),
            cancelled_codes: cancelled,
        }))
    }

    async fn decide(
        &self,
        request: Request<pb::DecideRequest>,
    ) -> Result<Response<pb::DecideResponse>, Status> {
        let req = request.into_inner();
        uuid_field("profile_id", &req.profile_id)?;
        channel_field("channel", req.channel)?;
        len_field("store_id", &req.store_id, 0, 64)?;
        if req.channel == pb::Channel::Pos as i32 && req.store_id.is_empty() {
            return Err(invalid_field("store_id", "required for CHANNEL_POS"));
        }
        if !(0..=50).contains(&req.max_offers) {
            return Err(invalid_field("max_offers", "must be 1..=50 (0 means 10)"));
        }
        if req.offer_ids.len() > 100 {
            return Err(invalid_field("offer_ids", "at most 100"));
        }
        validate_attributes(&req.attributes)?;
        let real_now = Utc::now();
        let now = match &req.at {
            Some(t) => {
                let t = convert::ts_utc(t).ok_or_else(|| invalid_field("at", "invalid"))?;
                if !req.dry_run && (t - real_now).num_seconds().abs() > 300 {
                    return Err(invalid_field(
                        "at",
                        "other than now is only allowed with dry_run",
                    ));
                }
                t
            }
            None => real_now,
        };
        let max_offers = if req.max_offers == 0 {
            10
        } else {
            req.max_offers
        };
        let snapshot: Arc<OfferSnapshot> = if req.offer_ids.is_empty() {
            match self.active.lookup() {
                Lookup::Fresh(o) | Lookup::Reloading(o) => o,
                Lookup::Expired(o) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = me.load_active().await {
                            tracing::warn!(error = %e.message(), "reloading the catalogue failed");
                        }
                        me.active.reload_done();
                    });
                    o
                }
                Lookup::Missing => self.load_missing_active().await?,
            }
        } else {
            let mut v = Vec::new();
            for (i, id) in req.offer_ids.iter().enumerate() {
                match self.store.get_offer(id).await {
                    Ok(r) => v.push(r),
                    Err(StoreError::NotFound(..)) => {
                        return Err(invalid_field(&format!("offer_ids[{i}]"), "unknown offer"));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Arc::new(OfferSnapshot::new(v, self.frequency_cap))
        };
        let offers = &snapshot.offers;
        let facts = self
            .facts(
                &req.profile_id,
                offers,
                now,
                !req.dry_run,
                &req.attributes,
                true,
            )
            .await?;
        let (decision, extra) = self.run_decision(
            offers,
            &facts,
            now,
            req.channel,
            &req.store_id,
            usize::try_from(max_offers).unwrap_or(10),
            req.explain,
            Some((snapshot.catalogue.as_ref(), &snapshot.usage)),
        )?;
        let ranked = decision
            .offers
            .iter()
            .filter_map(|e| {
                let rec = offers.iter().find(|r| r.offer.offer_id == e.offer_id.0)?;
                let arm = rec.offer.experiment.as_ref().and_then(|x| {
                    let key = facts.variant_keys.get(&x.experiment_key)?;
                    let arm = facts
                        .customer
                        .experiment_arms
                        .get(&catalogue::ExperimentId::new(&x.experiment_key))?;
                    Some(pb::ExperimentArm {
                        experiment_key: x.experiment_key.clone(),
                        variant_index: i32::from(!matches!(arm, catalogue::ExperimentArm::Control)),
                        variant_key: key.clone(),
                    })
                });
                let vk = arm
                    .as_ref()
                    .map(|a| a.variant_key.clone())
                    .unwrap_or_default();
                let held = facts
                    .customer
                    .issued_per_offer
                    .get(&e.offer_id)
                    .copied()
                    .unwrap_or(0);
                let mut reasons: Vec<_> = e
                    .reasons
                    .iter()
                    .map(|q| convert::pb_qualification(q, &vk))
                    .collect();
                if facts.in_holdout {
                    reasons.push(pb::EligibilityReason {
                        code: pb::EligibilityReasonCode::HoldoutExempt as i32,
                        subject: None,
                        detail: String::new(),
                    });
                }
                Some(pb::RankedOffer {
                    rank: i32::try_from(e.rank + 1).unwrap_or(i32::MAX),
                    offer: Some(pb_offer(rec)),
                    reasons,
                    remaining_for_profile: rec
                        .offer
                        .per_profile_cap
                        .map(|c| c - i32::try_from(held).unwrap_or(i32::MAX)),
                    experiment: arm,
                })
            })
            .collect();
        let mut rejected: BTreeMap<String, Vec<pb::OfferRejection>> = BTreeMap::new();
        if req.explain {
            for r in &decision.rejected {
                rejected.insert(
                    r.offer_id.0.clone(),
                    r.reasons
                        .iter()
                        .map(|x| convert::pb_rejection(x, req.channel, now))
                        .collect(),
                );
            }
            for (id, rs) in extra {
                rejected.entry(id).or_default().extend(rs);
            }
        }
        Ok(Response::new(pb::DecideResponse {
            decision_id: uuid::Uuid::now_v7().to_string(),
            evaluated_at: Some(utc_ts(now)),
            in_holdout: facts.in_holdout,
            offers: ranked,
            rejected: rejected
                .into_iter()
                .map(|(offer_id, rejections)| pb::RejectedOffer {
                    offer_id,
                    rejections,
                })
                .collect(),
        }))
    }

    async fn issue_offer(
        &self,
        request: Request<pb::IssueOfferRequest>,
    ) -> Result<Response<pb::IssueOfferResponse>, Status> {
        let req = request.into_inner();
        let issued = self.issue(req, pb::IssueSource::Direct, "").await?;
        Ok(Response::new(pb::IssueOfferResponse {
            issued: Some(issued),
        }))
    }

    async fn redeem_offer(
        &self,
        request: Request<pb::RedeemOfferRequest>,
    ) -> Result<Response<pb::RedeemOfferResponse>, Status> {
        let req = request.into_inner();
        if req.code.is_empty() {
            return Err(invalid_field("code", "required"));
        }
        key_field("idempotency_key", &req.idempotency_key)?;
        if !req.profile_id.is_empty() {
            uuid_field("profile_id", &req.profile_id)?;
        }
        len_field("order_id", &req.order_id, 0, 128)?;
        channel_field("channel", req.channel)?;
        let code = normalise_code(&req.code);
        let now = now_micros();
        // Checks that need the offer, before the atomic redemption.
        let peek = self
            .store
            .peek_code(&code)
            .await?
            .ok_or_else(|| not_found("code", &req.code))?;
        if !req.profile_id.is_empty() && peek.profile_id != req.profile_id {
            return Err(Status::failed_precondition(
                "the code belongs to another profile",
            ));
        }
        let offer = self.store.get_offer(&peek.offer_id).await?;
        let min_basket = match &offer.offer.benefit {
            Some(pb::offer::Benefit::PercentageDiscount(p)) => p.min_basket.clone(),
            Some(pb::offer::Benefit::FixedDiscount(f)) => f.min_basket.clone(),
            Some(pb::offer::Benefit::FreeShipping(f)) => f.min_basket.clone(),
            _ => None,
        };
        if let (Some(min), Some(basket)) = (&min_basket, &req.basket_value)
            && (basket.currency != min.currency || basket.amount_minor < min.amount_minor)
        {
            return Err(Status::failed_precondition(format!(
                "basket is below the minimum of {} {}",
                min.amount_minor, min.currency
            )));
        }
        if matches!(
            offer.offer.benefit,
            Some(pb::offer::Benefit::PointsMultiplier(_))
        ) && req.order_id.is_empty()
        {
            return Err(invalid_field(
                "order_id",
                "required for points multiplier offers",
            ));
        }
        self.active.clear();
        let (mut issued, replayed) = self
            .store
            .redeem(&RedeemCode {
                code,
                idem_key: format!("redeem-offer:{}", req.idempotency_key),
                order_id: req.order_id.clone(),
                redemption: pb::Redemption {
                    redeemed_at: Some(timestamp(now)),
                    order_id: req.order_id.clone(),
                    channel: req.channel,
                    store_id: req.store_id.clone(),
                    discount_applied: req.discount_applied.clone(),
                    ledger_entry_id: String::new(),
                },
                now,
            })
            .await?;
        self.active.clear();
        if let Some(pb::offer::Benefit::BonusPoints(b)) = &offer.offer.benefit {
            // Idempotent by the issue id: a replay or a retry after a crash credits once. The
            // expiry derives from the stored redemption time so a replay is the same command.
            let redeemed_at = issued
                .redemption
                .as_ref()
                .and_then(|r| r.redeemed_at.as_ref())
                .and_then(convert::ts_utc)
                .unwrap_or_else(|| utc(now));
            let out = self
                .store
                .apply_ledger(
                    &issued.profile_id,
                    &format!("bonus:{}", issued.issue_id),
                    LedgerCommand::Accrue {
                        points: b.points,
                        expires_at: self
                            .program
                            .earning
                            .points_valid_days
                            .map(|d| redeemed_at + Duration::days(i64::from(d))),
                        order: None,
                    },
                    Utc::now(),
                    EntryMeta {
                        kind: pb::LedgerEntryKind::Bonus as i32,
                        issue_id: issued.issue_id.clone(),
                        ..EntryMeta::default()
                    },
                    None,
                )
                .await?;
            if let (Some(r), Some(e)) = (issued.redemption.as_mut(), out.entries.first()) {
                r.ledger_entry_id.clone_from(&e.entry_id);
            }
        }
        Ok(Response::new(pb::RedeemOfferResponse {
            issued: Some(issued),
            replayed,
        }))
    }

    async fn cancel_offer(
        &self,
        request: Request<pb::CancelOfferRequest>,
    ) -> Result<Response<pb::CancelOfferResponse>, Status> {
        let req = request.into_inner();
        let (issue_id, code) = match &req.target {
            Some(pb::cancel_offer_request::Target::IssueId(id)) => {
                uuid_field("issue_id", id)?;
                (Some(id.clone()), None)
            }
            Some(pb::cancel_offer_request::Target::Code(c)) if !c.is_empty() => {
                (None, Some(normalise_code(c)))
            }
            _ => return Err(invalid_field("target", "issue_id or code is required")),
        };
        len_field("reason", &req.reason, 1, 512)?;
        len_field("actor", &req.actor, 1, 128)?;
        self.active.clear();
        let issued = self
            .store
            .cancel(
                issue_id.as_deref(),
                code.as_deref(),
                &format!("{} ({})", req.reason, req.actor),
                now_micros(),
            )
            .await?;
        self.active.clear();
        Ok(Response::new(pb::CancelOfferResponse {
            issued: Some(issued),
        }))
    }

    async fn list_issued_offers(
        &self,
        request: Request<pb::ListIssuedOffersRequest>,
    ) -> Result<Response<pb::ListIssuedOffersResponse>, Status> {
        let req = request.into_inner();
        uuid_field("profile_id", &req.profile_id)?;
        let offset = offset_token("page_token", &req.page_token)?;
        let size = page_size(req.page_size);
        let now = now_micros();
        let all = self.store.list_issued(&req.profile_id, 0, i64::MAX).await?;
        let matching: Vec<pb::IssuedOffer> = all
            .into_iter()
            .map(|mut i| {
                let expired = i
                    .valid_until
                    .as_ref()
                    .and_then(micros)
                    .is_some_and(|v| v <= now);
                if expired && i.status == pb::IssuedOfferStatus::Issued as i32 {
                    i.status = pb::IssuedOfferStatus::Expired as i32;
                }
                i
            })
            .filter(|i| req.statuses.is_empty() || req.statuses.contains(&i.status))
            .filter(|i| req.offer_id.is_empty() || i.offer_id == req.offer_id)
            .collect();
        let from = usize::try_from(offset).unwrap_or(usize::MAX);
        let take = usize::try_from(size).unwrap_or(50);
        let next = if from.saturating_add(take) < matching.len() {
            (offset + size).to_string()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListIssuedOffersResponse {
            issued: matching.into_iter().skip(from).take(take).collect(),
            next_page_token: next,
        }))
    }

    async fn create_trigger(
        &self,
        request: Request<pb::CreateTriggerRequest>,
    ) -> Result<Response<pb::CreateTriggerResponse>, Status> {
        let mut t = request
            .into_inner()
            .trigger
            .ok_or_else(|| invalid_field("trigger", "required"))?;
        slug_field("trigger.trigger_id", &t.trigger_id)?;
        slug_field("trigger.offer_id", &t.offer_id)?;
        channel_field("trigger.channel", t.channel)?;
        match &t.on {
            Some(pb::trigger::On::SegmentEntry(s)) => {
                let seg = s
                    .segment
                    .as_ref()
                    .ok_or_else(|| invalid_field("trigger.segment_entry.segment", "required"))?;
                slug_field("trigger.segment_entry.segment.segment_id", &seg.segment_id)?;
            }
            Some(pb::trigger::On::Event(e)) => {
                if e.kind == 0 || pb::EventKind::try_from(e.kind).is_err() {
                    return Err(invalid_field("trigger.event.kind", "required"));
                }
                if (e.kind == pb::EventKind::Custom as i32) == e.custom_event_name.is_empty() {
                    return Err(invalid_field(
                        "trigger.event.custom_event_name",
                        "required for EVENT_KIND_CUSTOM and only there",
                    ));
                }
                if let Some(m) = &e.min_value {
                    money_field("trigger.event.min_value", m, false)?;
                }
            }
            None => {
                return Err(invalid_field(
                    "trigger.on",
                    "segment_entry or event is required",
                ));
            }
        }
        let offer = match self.store.get_offer(&t.offer_id).await {
            Ok(o) => o,
            Err(StoreError::NotFound(..)) => {
                return Err(invalid_field("trigger.offer_id", "unknown offer"));
            }
            Err(e) => return Err(e.into()),
        };
        if offer.status == pb::OfferStatus::Archived as i32 {
            return Err(invalid_field("trigger.offer_id", "the offer is archived"));
        }
        t.create_time = None;
        t.issued_count = 0;
        t.skipped_count = 0;
        let (stored, _) = self.store.create_trigger(&t).await?;
        Ok(Response::new(pb::CreateTriggerResponse {
            trigger: Some(stored),
        }))
    }

    async fn list_triggers(
        &self,
        request: Request<pb::ListTriggersRequest>,
    ) -> Result<Response<pb::ListTriggersResponse>, Status> {
        let req = request.into_inner();
        let size = page_size(req.page_size);
        let triggers = self
            .store
            .list_triggers(&req.offer_id, &req.page_token, size)
            .await?;
        let next = if i64::try_from(triggers.len()).unwrap_or(0) == size {
            triggers
                .last()
                .map(|t| t.trigger_id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListTriggersResponse {
            triggers,
            next_page_token: next,
        }))
    }

    async fn delete_trigger(
        &self,
        request: Request<pb::DeleteTriggerRequest>,
    ) -> Result<Response<pb::DeleteTriggerResponse>, Status> {
        let req = request.into_inner();
        if req.trigger_id.is_empty() {
            return Err(invalid_field("trigger_id", "required"));
        }
        self.store.delete_trigger(&req.trigger_id).await?;
        Ok(Response::new(pb::DeleteTriggerResponse {}))
    }
}

impl OfferServiceImpl {
    /// IssueOffer's body, shared with triggers: validation, eligibility re-check (everything
    /// but budget, caps and frequency, which the store books atomically) and the atomic issue.
    pub async fn issue(
        &self,
        req: pb::IssueOfferRequest,
        source: pb::IssueSource,
        trigger_id: &str,
    ) -> Result<pb::IssuedOffer, Status> {
        uuid_field("profile_id", &req.profile_id)?;
        slug_field("offer_id", &req.offer_id)?;
        key_field("idempotency_key", &req.idempotency_key)?;
        channel_field("channel", req.channel)?;
        len_field("store_id", &req.store_id, 0, 64)?;
        let now = Utc::now();
        let now_us = now.timestamp_micros();
        if let Some(v) = &req.valid_until
            && micros(v).is_none_or(|v| v <= now_us)
        {
            return Err(invalid_field("valid_until", "must be in the future"));
        }
        let idem_key = format!("issue:{}", req.idempotency_key);
        let fingerprint = format!(
            "{}|{}|{}|{}|{}|{:?}",
            req.profile_id,
            req.offer_id,
            req.channel,
            req.store_id,
            req.decision_id,
            req.valid_until.as_ref().and_then(micros)
        );
        // A retry returns the original even if eligibility changed since.
        if let Some((original, fp)) = self.store.find_issue(&idem_key).await? {
            if fp != fingerprint {
                return Err(StoreError::IdempotencyConflict(req.idempotency_key).into());
            }
            return Ok(original);
        }
        let offer = match self.store.get_offer(&req.offer_id).await {
            Ok(o) => o,
            Err(StoreError::NotFound(..)) => return Err(not_found("offer", &req.offer_id)),
            Err(e) => return Err(e.into()),
        };
        let offers = vec![offer.clone()];
        let facts = self
            .facts(&req.profile_id, &offers, now, true, &HashMap::new(), false)
            .await?;
        // Budget, caps and frequency are re-checked atomically by the store; the pure
        // decision checks everything else.
        let mut no_caps = facts;
        no_caps.customer.issued_per_offer.clear();
        no_caps.customer.recent_issuances.clear();
        let saved_cap = self.frequency_cap;
        let decision_svc = Self {
            frequency_cap: None,
            ..self.clone()
        };
        let (decision, extra) = decision_svc.run_decision(
            &offers,
            &no_caps,
            now,
            req.channel,
            &req.store_id,
            1,
            true,
            None,
        )?;
        if decision.offers.is_empty() {
            let mut rs: Vec<pb::OfferRejection> = extra.into_values().flatten().collect();
            rs.extend(
                decision
                    .rejected
                    .iter()
                    .flat_map(|r| r.reasons.iter())
                    .map(|x| convert::pb_rejection(x, req.channel, now)),
            );
            return Err(Status::failed_precondition(first_rejection_message(&rs)));
        }
        let default_until = {
            let validity = offer.offer.code_validity.as_ref().map_or(0, |d| d.seconds);
            let ends = offer.offer.ends_at.as_ref().and_then(micros);
            let by_validity = (validity > 0).then(|| now_us.saturating_add(validity * 1_000_000));
            match (by_validity, ends) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) => a,
                (None, Some(b)) => b,
                (None, None) => i64::MAX,
            }
        };
        let valid_until = match req.valid_until.as_ref().and_then(micros) {
            Some(v) if v > default_until => {
                return Err(invalid_field(
                    "valid_until",
                    "must not be later than the default",
                ));
            }
            Some(v) => v,
            None => default_until,
        };
        let arm = offer.offer.experiment.as_ref().and_then(|x| {
            let key = no_caps.variant_keys.get(&x.experiment_key)?;
            let a = no_caps
                .customer
                .experiment_arms
                .get(&catalogue::ExperimentId::new(&x.experiment_key))?;
            Some(pb::ExperimentArm {
                experiment_key: x.experiment_key.clone(),
                variant_index: i32::from(!matches!(a, catalogue::ExperimentArm::Control)),
                variant_key: key.clone(),
            })
        });
        let issued = pb::IssuedOffer {
            issue_id: uuid::Uuid::now_v7().to_string(),
            code: new_code(),
            offer_id: req.offer_id.clone(),
            offer_version: offer.version,
            profile_id: req.profile_id.clone(),
            status: pb::IssuedOfferStatus::Issued as i32,
            source: source as i32,
            trigger_id: trigger_id.to_string(),
            decision_id: req.decision_id.clone(),
            channel: req.channel,
            issued_at: Some(timestamp(now_us)),
            valid_until: Some(timestamp(valid_until)),
            experiment: arm,
            redemption: None,
            cancelled_at: None,
            cancel_reason: String::new(),
        };
        self.active.clear();
        let (stored, _) = self
            .store
            .issue(&NewIssue {
                issued,
                idem_key,
                fingerprint,
                per_profile_cap: offer.offer.per_profile_cap.map(i64::from),
                frequency_cap: saved_cap.map(|c| {
                    (
                        i64::from(c.max_offers),
                        now_us - i64::from(c.window_hours) * 3_600_000_000,
                    )
                }),
            })
            .await?;
        self.active.clear();
        Ok(stored)
    }
}
