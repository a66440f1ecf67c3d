//! Decide's in-process read models: what a decision needs about a profile, kept in bounded
//! per-profile caches so that a Decide in the common case makes no network round trip.
//!
//! Three caches, each keyed by profile id, bounded to [`ReadModelConfig::max_profiles`]
//! entries (moka: TinyLFU admission, so a scan of one-off profiles does not evict the hot
//! ones) and filled on a miss by the read Decide made before:
//!
//! * **profile facts** (ProfileService.GetProfile: GRANTED consents, traits) — invalidated by
//!   every ProfileService change of the profile (`WatchChanges`: created, updated, merged —
//!   survivor and merged ids —, erased) and by every order or refund of the profile on the ingest feed;
//! * **segment facts** (SegmentationService.GetProfileSegments: memberships, lifecycle, the
//!   rule features) — invalidated by the profile's membership changes
//!   (`WatchMembershipChanges`), all at once by the first change of a new batch run (a run
//!   rescores everyone), and by every order or refund of the profile on the ingest feed;
//! * **ledger view** (the points ledger, order activity, codes per offer and issue times) —
//!   invalidated by every write of this process to the profile (ledger, activity, issue,
//!   redeem, cancel, erasure; an archive with cancellation clears them all), through
//!   [`InvalidatingStore`], which wraps the service's store.
//!
//! The feeds are applied by the replica holding the `offers.feeds` leader lock, so their
//! invalidations are prompt (within a consumer pass, ≲ 1 s) in that replica only. The
//! staleness bound everywhere else is the time to live: `upstream_ttl` for profile and segment
//! facts (and for score changes segmentation publishes without a membership change),
//! `ledger_ttl` for another replica's ledger and code writes. Decide is advisory: IssueOffer
//! reads consent, segments and tier fresh, and the store enforces caps, frequency and budgets
//! atomically, so staleness can show a customer an offer that issuing then refuses, never
//! over-issue.
//!
//! Each entry lives a random 50–100 % of its time to live, so entries filled together do not
//! all expire (and reload from the database) together.
//!
//! A fill that raced an invalidation is not kept: each key has a generation (striped over
//! 65,536 stripes, so an invalidation almost never drops an unrelated key's fill in flight),
//! read before the load and checked after the insert; if it moved, the entry is dropped again.
//!
//! Feed changes are version-aware: each entry remembers when its load began (wall clock), and
//! a change committed well before that ([`FEED_SLACK`], [`EVENT_SLACK`]: commit delays and
//! clock skew) is already reflected, so it leaves the entry in place. A replica catching up
//! with old changes (after a start) therefore keeps the fills it made meanwhile. This
//! process's own writes still invalidate unconditionally.
//!
//! An entry read after 75 % of its life is reloaded in the background while the reader gets
//! it at once, so a profile read steadily never waits for its read model to expire (each
//! expiry cost the Decide that found it several database reads or upstream calls: 2–3 % of
//! Decides in the bench, 1–5 ms each). The loaders therefore own what they need (`'static`).
//!
//! Concurrent misses of one key share one load: at thousands of Decides a second a cold (or
//! just invalidated) profile is asked for many times while its first read is still running,
//! and without sharing every one of those requests would send its own upstream calls and
//! database reads (after a restart: one set per request for seconds, which stalled Decide
//! for up to 2.5 s in the bench). A caller only waits for a load that began at the key's
//! current generation, so it never gets a value read before an invalidation it has seen
//! (read-your-writes for this process's own ledger writes holds).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use clientele_proto::v1 as pb;

use crate::ledger::{LedgerCommand, PointsLedger};
use crate::program::EarnActivity;
use crate::store::{
    CodeOwner, EntryMeta, ErasureOutcome, LedgerOutcome, NewIssue, OfferRecord, OfferStore,
    RedeemCode, StoreResult, StoredEntry,
};
use crate::upstream::{ProfileFacts, SegmentFacts};

/// Sizes and lifetimes of the read models (`offers.decision_cache_*` settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadModelConfig {
    /// Profiles kept per cache; 0 turns the read models off (every Decide reads through).
    pub max_profiles: u64,
    /// Longest life of cached profile and segment facts.
    pub upstream_ttl: Duration,
    /// Longest life of a cached ledger view (bounds other replicas' writes).
    pub ledger_ttl: Duration,
}

impl Default for ReadModelConfig {
    fn default() -> Self {
        Self {
            max_profiles: 100_000,
            upstream_ttl: Duration::from_secs(60),
            ledger_ttl: Duration::from_secs(10),
        }
    }
}

/// A profile's ledger as decisions read it.
#[derive(Debug, Clone, Default)]
pub struct LedgerView {
    /// The points ledger.
    pub ledger: PointsLedger,
    /// Order activity (only loaded when tiers qualify by spend).
    pub activity: Vec<EarnActivity>,
    /// Non-cancelled codes per offer.
    pub per_offer: HashMap<String, u32>,
    /// Issue times of all the profile's codes (micros).
    pub issue_times: Vec<i64>,
}

const STRIPES: usize = 65_536;

/// A profile or membership change committed at least this long before a fill's load began is
/// reflected by the fill (it leaves the entry in place).
pub const FEED_SLACK: Duration = Duration::from_secs(2);
/// The same for an ingested event, which changes segment facts only once segmentation has
/// folded it in (seconds later).
pub const EVENT_SLACK: Duration = Duration::from_secs(10);

fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

fn micros_of(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Each entry lives a random 50–100 % of the time to live: entries filled together (a cold
/// start, a burst of traffic) then expire spread out instead of all at once, which would send
/// every profile's reload to the database in the same instant.
struct JitteredTtl;

impl<V> moka::Expiry<String, Stamped<V>> for JitteredTtl {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Stamped<V>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.life)
    }

    /// A refresh replaces the entry: its life starts again (moka's default keeps the old one).
    fn expire_after_update(
        &self,
        _key: &String,
        value: &Stamped<V>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.life)
    }
}

/// Share of its life after which a cached entry that is still being read is reloaded in the
/// background (the reader gets the cached value at once; the entry is never served past its
/// life, so the staleness bounds do not change).
const REFRESH_AT: f64 = 0.75;

/// A cached value with its life (jittered time to live) and when it was stored.
#[derive(Clone)]
struct Stamped<V> {
    value: V,
    life: Duration,
    stored: std::time::Instant,
    /// Wall clock (micros) when the load of this value began: it reflects every change
    /// committed (and visible) before then.
    as_of: i64,
}

/// One bounded cache with per-key (striped) generations and shared loads.
struct Guarded<V: Clone + Send + Sync + 'static> {
    cache: moka::sync::Cache<String, Stamped<V>>,
    ttl: Duration,
    generations: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
    /// The load in flight per key (see the module docs).
    flights: Arc<Mutex<HashMap<String, Flight>>>,
    next_flight: AtomicU64,
    /// Entries loaded at or before this wall clock (micros) count as missing: an old change
    /// that concerns every key (a batch run) without dropping the fills made after it.
    floor: std::sync::atomic::AtomicI64,
}

/// A load of one key in flight, begun at `generation`. Its sender is dropped when the load
/// ends (done, failed or cancelled), which wakes the callers waiting on `done`.
struct Flight {
    id: u64,
    generation: u64,
    done: tokio::sync::watch::Receiver<()>,
}

/// Held by whoever loads a key for others: removes the flight when the load ends, however it
/// ends (a cancelled request included), then wakes the waiters.
struct FlightGuard {
    flights: Arc<Mutex<HashMap<String, Flight>>>,
    key: String,
    id: u64,
    _done: tokio::sync::watch::Sender<()>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut flights = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
        if flights.get(&self.key).is_some_and(|f| f.id == self.id) {
            flights.remove(&self.key);
        }
        // `_done` drops after this body: waiters wake once the flight is gone.
    }
}

/// How a missing key is read.
enum Join {
    /// Another caller is loading it at the same generation: wait for that load.
    Wait(tokio::sync::watch::Receiver<()>),
    /// This caller loads it for everyone.
    Lead(FlightGuard),
}

impl<V: Clone + Send + Sync + 'static> Guarded<V> {
    fn new(max: u64, ttl: Duration) -> Self {
        Self {
            cache: moka::sync::Cache::builder()
                .max_capacity(max)
                .expire_after(JitteredTtl)
                .build(),
            ttl,
            generations: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            flights: Arc::default(),
            next_flight: AtomicU64::new(0),
            floor: std::sync::atomic::AtomicI64::new(i64::MIN),
        }
    }

    /// The cached entry of `key`, unless it was loaded before the floor.
    fn cached(&self, key: &str) -> Option<Stamped<V>> {
        self.cache
            .get(key)
            .filter(|s| s.as_of > self.floor.load(Ordering::Acquire))
    }

    fn generation(&self, key: &str) -> &AtomicU64 {
        #[allow(clippy::cast_possible_truncation)]
        &self.generations[(self.hasher.hash_one(key) as usize) % STRIPES]
    }

    async fn get_or_load<E, F, Fut>(self: &Arc<Self>, key: &str, load: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<V, E>> + Send + 'static,
        E: Send + 'static,
    {
        if let Some(s) = self.cached(key) {
            if s.stored.elapsed() >= s.life.mul_f64(REFRESH_AT) {
                self.refresh(key, load);
            }
            return Ok(s.value);
        }
        let before = self.generation(key).load(Ordering::Acquire);
        match self.join(key, before) {
            Join::Lead(flight) => {
                let as_of = now_micros();
                let r = self.keep(key, before, as_of, load()).await;
                drop(flight);
                r
            }
            Join::Wait(mut done) => {
                // Returns when the loader's sender drops: its load ended, however it ended.
                let _ = done.changed().await;
                if let Some(s) = self.cached(key) {
                    return Ok(s.value);
                }
                // The shared load failed, was cancelled or was not kept (an invalidation
                // landed meanwhile): read for this caller alone.
                let before = self.generation(key).load(Ordering::Acquire);
                let as_of = now_micros();
                self.keep(key, before, as_of, load()).await
            }
        }
    }

    /// Reloads `key` in the background unless a load of it is already in flight (outside a
    /// tokio runtime, does nothing: the entry then simply expires).
    fn refresh<E, F, Fut>(self: &Arc<Self>, key: &str, load: F)
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<V, E>> + Send + 'static,
        E: Send + 'static,
    {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let before = self.generation(key).load(Ordering::Acquire);
        let Join::Lead(flight) = self.join(key, before) else {
            return;
        };
        let as_of = now_micros();
        let (me, key, fut) = (self.clone(), key.to_string(), load());
        runtime.spawn(async move {
            // A failed refresh leaves the entry to expire; the next miss reads through.
            let _ = me.keep(&key, before, as_of, fut).await;
            drop(flight);
        });
    }

    /// Joins the load of `key` in flight at generation `before`, or registers this caller's.
    fn join(&self, key: &str, before: u64) -> Join {
        let mut flights = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = flights.get(key)
            && f.generation == before
        {
            return Join::Wait(f.done.clone());
        }
        // None in flight, or one that began before an invalidation this caller has seen
        // (its value will not be kept): this caller's load replaces it.
        let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::watch::channel(());
        flights.insert(
            key.to_string(),
            Flight {
                id,
                generation: before,
                done: rx,
            },
        );
        Join::Lead(FlightGuard {
            flights: self.flights.clone(),
            key: key.to_string(),
            id,
            _done: tx,
        })
    }

    /// Awaits `load` (begun at wall clock `as_of`) and caches its value unless the key's
    /// generation moved from `before` or a newer load's value is cached meanwhile.
    async fn keep<E>(
        &self,
        key: &str,
        before: u64,
        as_of: i64,
        load: impl std::future::Future<Output = Result<V, E>>,
    ) -> Result<V, E> {
        let generation = self.generation(key);
        let v = load.await?;
        let newer = self.cache.get(key).is_some_and(|s| s.as_of > as_of);
        if generation.load(Ordering::Acquire) == before && !newer {
            let life = self.ttl.mul_f64(rand::random::<f64>().mul_add(0.5, 0.5));
            self.cache.insert(
                key.to_string(),
                Stamped {
                    value: v.clone(),
                    life,
                    stored: std::time::Instant::now(),
                    as_of,
                },
            );
            if generation.load(Ordering::Acquire) != before {
                self.cache.invalidate(key);
            }
        }
        Ok(v)
    }

    fn invalidate(&self, key: &str) {
        self.generation(key).fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate(key);
    }

    /// A feed change of `key` committed at `at` (micros): leaves an entry loaded more than
    /// `slack` after it (the entry reflects it); otherwise as [`Self::invalidate`].
    fn invalidate_before(&self, key: &str, at: i64, slack: Duration) {
        let after = at.saturating_add(micros_of(slack));
        if self.cached(key).is_some_and(|s| s.as_of > after) {
            return;
        }
        self.invalidate(key);
    }

    /// A feed change of every key committed at `at` (micros): entries loaded more than
    /// `slack` after it stay; the others count as missing.
    fn invalidate_all_before(&self, at: i64, slack: Duration) {
        let after = at.saturating_add(micros_of(slack));
        if after >= now_micros() {
            self.invalidate_all();
        } else {
            self.floor.fetch_max(after, Ordering::AcqRel);
        }
    }

    fn invalidate_all(&self) {
        for g in &*self.generations {
            g.fetch_add(1, Ordering::AcqRel);
        }
        self.cache.invalidate_all();
    }
}

/// The three per-profile read models of Decide (see the module docs).
pub struct ReadModel {
    config: ReadModelConfig,
    profiles: Arc<Guarded<Arc<ProfileFacts>>>,
    segments: Arc<Guarded<Arc<SegmentFacts>>>,
    ledgers: Arc<Guarded<Arc<LedgerView>>>,
    last_run: std::sync::Mutex<String>,
}

impl std::fmt::Debug for ReadModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadModel")
            .field("config", &self.config)
            .field("profiles", &self.profiles.cache.entry_count())
            .field("segments", &self.segments.cache.entry_count())
            .field("ledgers", &self.ledgers.cache.entry_count())
            .finish()
    }
}

impl Default for ReadModel {
    fn default() -> Self {
        Self::new(ReadModelConfig::default())
    }
}

impl ReadModel {
    /// Read models sized and timed by `config`.
    pub fn new(config: ReadModelConfig) -> Self {
        Self {
            config,
            profiles: Arc::new(Guarded::new(config.max_profiles, config.upstream_ttl)),
            segments: Arc::new(Guarded::new(config.max_profiles, config.upstream_ttl)),
            ledgers: Arc::new(Guarded::new(config.max_profiles, config.ledger_ttl)),
            last_run: std::sync::Mutex::default(),
        }
    }

    /// Whether the read models are on.
    pub fn enabled(&self) -> bool {
        self.config.max_profiles > 0
    }

    /// The profile's facts, loaded by `load` on a miss. `Ok(None)` (unknown profile) is not
    /// cached: the profile may be created at any time.
    pub async fn profile<E, F, Fut>(
        &self,
        id: &str,
        load: F,
    ) -> Result<Option<Arc<ProfileFacts>>, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Option<ProfileFacts>, E>> + Send + 'static,
        E: Send + 'static,
    {
        if !self.enabled() {
            return Ok(load().await?.map(Arc::new));
        }
        #[derive(Debug)]
        enum Miss<E> {
            Unknown,
            Err(E),
        }
        let r = self
            .profiles
            .get_or_load(id, || {
                let load = load();
                async move {
                    match load.await {
                        Ok(Some(p)) => Ok(Arc::new(p)),
                        Ok(None) => Err(Miss::Unknown),
                        Err(e) => Err(Miss::Err(e)),
                    }
                }
            })
            .await;
        match r {
            Ok(p) => Ok(Some(p)),
            Err(Miss::Unknown) => Ok(None),
            Err(Miss::Err(e)) => Err(e),
        }
    }

    /// The profile's segment facts, loaded by `load` on a miss.
    pub async fn segments<E, F, Fut>(&self, id: &str, load: F) -> Result<Arc<SegmentFacts>, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<SegmentFacts, E>> + Send + 'static,
        E: Send + 'static,
    {
        if !self.enabled() {
            return Ok(Arc::new(load().await?));
        }
        self.segments
            .get_or_load(id, || {
                let load = load();
                async move { load.await.map(Arc::new) }
            })
            .await
    }

    /// The profile's ledger view, loaded by `load` on a miss.
    pub async fn ledger<E, F, Fut>(&self, id: &str, load: F) -> Result<Arc<LedgerView>, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<LedgerView, E>> + Send + 'static,
        E: Send + 'static,
    {
        if !self.enabled() {
            return Ok(Arc::new(load().await?));
        }
        self.ledgers
            .get_or_load(id, || {
                let load = load();
                async move { load.await.map(Arc::new) }
            })
            .await
    }

    /// ProfileService reported a change of `id` (or an order or refund of it was read).
    pub fn profile_changed(&self, id: &str) {
        self.profiles.invalidate(id);
        self.segments.invalidate(id);
    }

    /// ProfileService reported a change of `id` committed at `at` (micros): facts loaded
    /// well after it are kept (see [`FEED_SLACK`]).
    pub fn profile_changed_at(&self, id: &str, at: i64) {
        self.profiles.invalidate_before(id, at, FEED_SLACK);
        self.segments.invalidate_before(id, at, FEED_SLACK);
    }

    /// An order or refund of `id` was ingested at `at` (micros): scores and lifecycle
    /// follow from it once segmentation folded it in (see [`EVENT_SLACK`]).
    pub fn event_ingested(&self, id: &str, at: i64) {
        self.profiles.invalidate_before(id, at, EVENT_SLACK);
        self.segments.invalidate_before(id, at, EVENT_SLACK);
    }

    /// ProfileService merged `merged` into `survivor`: every view of all of them is dropped.
    pub fn profiles_merged(&self, survivor: &str, merged: &[String]) {
        for id in std::iter::once(survivor).chain(merged.iter().map(String::as_str)) {
            self.profile_changed(id);
            self.ledgers.invalidate(id);
        }
    }

    /// SegmentationService reported a membership change of `id`, caused by batch run `run_id`
    /// (empty for real-time changes). The first change of a new run drops every profile's
    /// segment facts: the run rescored everyone, not only those whose memberships moved.
    pub fn membership_changed(&self, id: &str, run_id: &str) {
        if !run_id.is_empty()
            && let Ok(mut last) = self.last_run.lock()
            && *last != run_id
        {
            *last = run_id.to_string();
            self.segments.invalidate_all();
        }
        self.segments.invalidate(id);
    }

    /// [`Self::membership_changed`] for a change that occurred at `at` (micros): segment
    /// facts loaded well after it (see [`FEED_SLACK`]) are kept, for the run's first change
    /// too.
    pub fn membership_changed_at(&self, id: &str, run_id: &str, at: i64) {
        if !run_id.is_empty()
            && let Ok(mut last) = self.last_run.lock()
            && *last != run_id
        {
            *last = run_id.to_string();
            self.segments.invalidate_all_before(at, FEED_SLACK);
        }
        self.segments.invalidate_before(id, at, FEED_SLACK);
    }

    /// This process wrote to the profile's ledger, activity or codes.
    pub fn ledger_changed(&self, id: &str) {
        self.ledgers.invalidate(id);
    }

    /// This process changed codes of many profiles (an archive that cancelled codes).
    pub fn all_ledgers_changed(&self) {
        self.ledgers.invalidate_all();
    }
}

/// The service's store with the ledger read model invalidated after every write of a
/// profile's ledger, activity or codes (including failed writes: an error after commit, such
/// as a lost connection, must not leave a stale view).
#[derive(Debug)]
pub struct InvalidatingStore {
    inner: Arc<dyn OfferStore>,
    model: Arc<ReadModel>,
}

impl InvalidatingStore {
    /// `inner`, invalidating `model`.
    pub fn new(inner: Arc<dyn OfferStore>, model: Arc<ReadModel>) -> Self {
        Self { inner, model }
    }
}

#[async_trait]
impl OfferStore for InvalidatingStore {
    async fn apply_ledger(
        &self,
        profile_id: &str,
        key: &str,
        command: LedgerCommand,
        now: DateTime<Utc>,
        meta: EntryMeta,
        cursor: Option<(&str, &str)>,
    ) -> StoreResult<LedgerOutcome> {
        let r = self
            .inner
            .apply_ledger(profile_id, key, command, now, meta, cursor)
            .await;
        self.model.ledger_changed(profile_id);
        r
    }
    async fn ledger(&self, profile_id: &str) -> StoreResult<(PointsLedger, Vec<StoredEntry>)> {
        self.inner.ledger(profile_id).await
    }
    async fn cursor(&self, consumer: &str) -> StoreResult<Option<String>> {
        self.inner.cursor(consumer).await
    }
    async fn set_cursor(&self, consumer: &str, cursor: &str) -> StoreResult<()> {
        self.inner.set_cursor(consumer, cursor).await
    }
    async fn create_offer(&self, record: &OfferRecord) -> StoreResult<(OfferRecord, bool)> {
        self.inner.create_offer(record).await
    }
    async fn get_offer(&self, offer_id: &str) -> StoreResult<OfferRecord> {
        self.inner.get_offer(offer_id).await
    }
    async fn list_offers(
        &self,
        statuses: &[i32],
        after: &str,
        limit: i64,
    ) -> StoreResult<Vec<OfferRecord>> {
        self.inner.list_offers(statuses, after, limit).await
    }
    async fn update_offer(
        &self,
        offer: &pb::Offer,
        status: i32,
        based_on: i64,
        now: i64,
    ) -> StoreResult<OfferRecord> {
        self.inner.update_offer(offer, status, based_on, now).await
    }
    async fn archive_offer(
        &self,
        offer_id: &str,
        cancel_outstanding: bool,
        now: i64,
    ) -> StoreResult<(OfferRecord, i64)> {
        let r = self
            .inner
            .archive_offer(offer_id, cancel_outstanding, now)
            .await;
        if cancel_outstanding {
            self.model.all_ledgers_changed();
        }
        r
    }
    async fn issue(&self, issue: &NewIssue) -> StoreResult<(pb::IssuedOffer, bool)> {
        let r = self.inner.issue(issue).await;
        self.model.ledger_changed(&issue.issued.profile_id);
        r
    }
    async fn redeem(&self, redeem: &RedeemCode) -> StoreResult<(pb::IssuedOffer, bool)> {
        let r = self.inner.redeem(redeem).await;
        match &r {
            Ok((issued, _)) => self.model.ledger_changed(&issued.profile_id),
            Err(_) => match self.inner.peek_code(&redeem.code).await {
                Ok(Some(o)) => self.model.ledger_changed(&o.profile_id),
                _ => self.model.all_ledgers_changed(),
            },
        }
        r
    }
    async fn cancel(
        &self,
        issue_id: Option<&str>,
        code: Option<&str>,
        reason: &str,
        now: i64,
    ) -> StoreResult<pb::IssuedOffer> {
        let r = self.inner.cancel(issue_id, code, reason, now).await;
        match &r {
            Ok(issued) => self.model.ledger_changed(&issued.profile_id),
            Err(_) => self.model.all_ledgers_changed(),
        }
        r
    }
    async fn peek_code(&self, code: &str) -> StoreResult<Option<CodeOwner>> {
        self.inner.peek_code(code).await
    }
    async fn find_issue(&self, idem_key: &str) -> StoreResult<Option<(pb::IssuedOffer, String)>> {
        self.inner.find_issue(idem_key).await
    }
    async fn list_issued(
        &self,
        profile_id: &str,
        offset: i64,
        limit: i64,
    ) -> StoreResult<Vec<pb::IssuedOffer>> {
        self.inner.list_issued(profile_id, offset, limit).await
    }
    async fn profile_usage(
        &self,
        profile_id: &str,
    ) -> StoreResult<(HashMap<String, u32>, Vec<i64>)> {
        self.inner.profile_usage(profile_id).await
    }
    async fn create_trigger(&self, trigger: &pb::Trigger) -> StoreResult<(pb::Trigger, bool)> {
        self.inner.create_trigger(trigger).await
    }
    async fn list_triggers(
        &self,
        offer_id: &str,
        after: &str,
        limit: i64,
    ) -> StoreResult<Vec<pb::Trigger>> {
        self.inner.list_triggers(offer_id, after, limit).await
    }
    async fn delete_trigger(&self, trigger_id: &str) -> StoreResult<()> {
        self.inner.delete_trigger(trigger_id).await
    }
    async fn claim_firing(
        &self,
        trigger_id: &str,
        source_key: &str,
        profile_id: &str,
        now: i64,
    ) -> StoreResult<bool> {
        self.inner
            .claim_firing(trigger_id, source_key, profile_id, now)
            .await
    }
    async fn finish_firing(
        &self,
        trigger_id: &str,
        source_key: &str,
        issue_id: Option<&str>,
    ) -> StoreResult<()> {
        self.inner
            .finish_firing(trigger_id, source_key, issue_id)
            .await
    }
    async fn activity(&self, profile_id: &str) -> StoreResult<Vec<EarnActivity>> {
        self.inner.activity(profile_id).await
    }
    async fn record_activity(
        &self,
        profile_id: &str,
        activity: &EarnActivity,
    ) -> StoreResult<bool> {
        let r = self.inner.record_activity(profile_id, activity).await;
        self.model.ledger_changed(profile_id);
        r
    }
    async fn erase_profile(
        &self,
        profile_id: &str,
        cursor: Option<(&str, &str)>,
    ) -> StoreResult<ErasureOutcome> {
        let r = self.inner.erase_profile(profile_id, cursor).await;
        self.model.ledger_changed(profile_id);
        self.model.profile_changed(profile_id);
        r
    }
    async fn is_erased(&self, profile_id: &str) -> StoreResult<bool> {
        self.inner.is_erased(profile_id).await
    }
    async fn merge_profiles(
        &self,
        survivor: &str,
        losers: &[String],
        cursor: Option<(&str, &str)>,
    ) -> StoreResult<crate::store::MergeOutcome> {
        let r = self.inner.merge_profiles(survivor, losers, cursor).await;
        self.model.ledger_changed(survivor);
        self.model.profile_changed(survivor);
        for l in losers {
            self.model.ledger_changed(l);
            self.model.profile_changed(l);
        }
        r
    }
    async fn survivor_of(&self, profile_id: &str) -> StoreResult<Option<String>> {
        self.inner.survivor_of(profile_id).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn facts(trait_value: i64) -> ProfileFacts {
        ProfileFacts {
            granted: std::collections::BTreeSet::new(),
            traits: [(
                "k".to_string(),
                pb::Value {
                    kind: Some(pb::value::Kind::IntValue(trait_value)),
                },
            )]
            .into(),
        }
    }

    async fn load(model: &ReadModel, id: &str, v: i64) -> Arc<ProfileFacts> {
        model
            .profile(id, || async move { Ok::<_, ()>(Some(facts(v))) })
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn a_cached_profile_is_served_until_its_change_arrives() {
        let model = ReadModel::default();
        assert_eq!(*load(&model, "p", 1).await, facts(1));
        assert_eq!(
            *load(&model, "p", 2).await,
            facts(1),
            "served from the cache"
        );
        model.profile_changed("p");
        assert_eq!(*load(&model, "p", 2).await, facts(2));
    }

    #[tokio::test]
    async fn an_unknown_profile_is_not_cached() {
        let model = ReadModel::default();
        let none = model
            .profile("p", || async { Ok::<_, ()>(None) })
            .await
            .unwrap();
        assert!(none.is_none());
        assert_eq!(*load(&model, "p", 3).await, facts(3));
    }

    #[tokio::test]
    async fn a_fill_that_raced_an_invalidation_is_not_kept() {
        let model = ReadModel::default();
        let model = Arc::new(model);
        let m = model.clone();
        let stale = model
            .profile("p", || async move {
                m.profile_changed("p"); // the change lands while the old value loads
                Ok::<_, ()>(Some(facts(1)))
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(*stale, facts(1), "the caller still gets what it read");
        assert_eq!(
            *load(&model, "p", 2).await,
            facts(2),
            "but it was not cached"
        );
    }

    #[tokio::test]
    async fn concurrent_misses_of_one_profile_share_one_load() {
        let model = ReadModel::default();
        let loads = Arc::new(AtomicU64::new(0));
        let got = futures::future::join_all((0..50).map(|_| {
            let loads = loads.clone();
            model.profile("p", || async move {
                loads.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok::<_, ()>(Some(facts(1)))
            })
        }))
        .await;
        assert_eq!(loads.load(Ordering::SeqCst), 1, "one load for 50 misses");
        for p in got {
            assert_eq!(*p.unwrap().unwrap(), facts(1));
        }
    }

    #[tokio::test]
    async fn a_caller_does_not_wait_for_a_load_begun_before_an_invalidation_it_saw() {
        let model = ReadModel::default();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let mut first = Box::pin(model.profile("p", || async move {
            let _ = released.await;
            Ok::<_, ()>(Some(facts(1)))
        }));
        assert!(
            futures::poll!(&mut first).is_pending(),
            "the first load runs"
        );
        model.profile_changed("p"); // e.g. this process wrote the profile's ledger
        let second = tokio::time::timeout(Duration::from_secs(5), load(&model, "p", 2))
            .await
            .expect("the second caller reads for itself instead of waiting");
        assert_eq!(*second, facts(2));
        release.send(()).unwrap();
        assert_eq!(*first.await.unwrap().unwrap(), facts(1));
        assert_eq!(
            *load(&model, "p", 3).await,
            facts(2),
            "the newer read is the one cached"
        );
    }

    #[tokio::test]
    async fn a_cancelled_shared_load_does_not_strand_its_waiters() {
        let model = ReadModel::default();
        let mut first = Box::pin(model.profile("p", || {
            std::future::pending::<Result<Option<ProfileFacts>, ()>>()
        }));
        assert!(futures::poll!(&mut first).is_pending());
        let mut second = Box::pin(load(&model, "p", 2));
        assert!(
            futures::poll!(&mut second).is_pending(),
            "waits for the load in flight"
        );
        drop(first); // the loading request was cancelled
        let second = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the waiter loads for itself");
        assert_eq!(*second, facts(2));
    }

    #[tokio::test]
    async fn a_new_batch_run_drops_every_profiles_segments() {
        let model = ReadModel::default();
        let seg = |n: usize| SegmentFacts {
            segments: (0..n).map(|i| format!("s{i}")).collect(),
            ..SegmentFacts::default()
        };
        for id in ["a", "b"] {
            model
                .segments(id, || async move { Ok::<_, ()>(seg(1)) })
                .await
                .unwrap();
        }
        model.membership_changed("a", "run-1");
        let b = model
            .segments("b", || async move { Ok::<_, ()>(seg(2)) })
            .await
            .unwrap();
        assert_eq!(*b, seg(2));
        model.membership_changed("a", "run-1"); // same run: only `a`
        let b = model
            .segments("b", || async move { Ok::<_, ()>(seg(3)) })
            .await
            .unwrap();
        assert_eq!(*b, seg(2));
    }

    #[tokio::test]
    async fn an_entry_read_late_in_its_life_is_reloaded_in_the_background() {
        let model = ReadModel::new(ReadModelConfig {
            upstream_ttl: Duration::from_secs(2),
            ..ReadModelConfig::default()
        });
        assert_eq!(*load(&model, "p", 1).await, facts(1));
        // Read every 10 ms until a read starts a reload. Entries live 1–2 s and are reloaded
        // from 75 % of their life, so every read finds the entry alive and none may wait for
        // the reload (its loader is held until the read has returned).
        let loads = Arc::new(AtomicU64::new(0));
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let (release, released) = tokio::sync::oneshot::channel::<()>();
            let l = loads.clone();
            let read = model.profile("p", || async move {
                l.fetch_add(1, Ordering::SeqCst);
                let _ = released.await;
                Ok::<_, ()>(Some(facts(2)))
            });
            let served = tokio::time::timeout(Duration::from_secs(1), read)
                .await
                .expect("a read never waits for a reload")
                .unwrap()
                .unwrap();
            assert_eq!(*served, facts(1), "served from the cache until reloaded");
            tokio::time::sleep(Duration::from_millis(5)).await;
            if loads.load(Ordering::SeqCst) > 0 {
                let _ = release.send(());
                break;
            }
        }
        for _ in 0..100 {
            if *load(&model, "p", 3).await == facts(2) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the reloaded value was not cached");
    }

    async fn ledger(model: &ReadModel, id: &str, points_to: u32) -> Arc<LedgerView> {
        model
            .ledger(id, || async move {
                Ok::<_, ()>(LedgerView {
                    per_offer: [("o".to_string(), points_to)].into(),
                    ..LedgerView::default()
                })
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_merge_drops_every_view_of_the_survivor_and_the_merged_ids() {
        let model = ReadModel::default();
        for id in ["survivor", "merged", "other"] {
            load(&model, id, 1).await;
            ledger(&model, id, 1).await;
        }
        model.profiles_merged("survivor", &["merged".to_string()]);
        for id in ["survivor", "merged"] {
            assert_eq!(*load(&model, id, 2).await, facts(2), "{id} reloaded");
            assert_eq!(
                ledger(&model, id, 2).await.per_offer["o"],
                2,
                "{id} reloaded"
            );
        }
        assert_eq!(*load(&model, "other", 2).await, facts(1), "others kept");
        assert_eq!(ledger(&model, "other", 2).await.per_offer["o"], 1);
    }

    #[tokio::test]
    async fn own_writes_drop_one_ledger_view_and_an_archive_all() {
        let model = ReadModel::default();
        for id in ["a", "b"] {
            ledger(&model, id, 1).await;
        }
        model.ledger_changed("a");
        assert_eq!(ledger(&model, "a", 2).await.per_offer["o"], 2);
        assert_eq!(ledger(&model, "b", 2).await.per_offer["o"], 1);
        model.all_ledgers_changed();
        assert_eq!(ledger(&model, "b", 3).await.per_offer["o"], 3);
    }

    #[tokio::test]
    async fn an_old_change_leaves_a_fill_made_after_it_and_a_new_one_drops_it() {
        let model = ReadModel::default();
        assert_eq!(*load(&model, "p", 1).await, facts(1));
        let now = now_micros();
        model.profile_changed_at("p", now - 60_000_000); // read while catching up
        model.event_ingested("p", now - 60_000_000);
        assert_eq!(
            *load(&model, "p", 2).await,
            facts(1),
            "the fill reflects it"
        );
        model.profile_changed_at("p", now);
        assert_eq!(
            *load(&model, "p", 3).await,
            facts(3),
            "a new change drops it"
        );
    }

    #[tokio::test]
    async fn a_current_change_during_a_fill_still_drops_it() {
        let model = Arc::new(ReadModel::default());
        let m = model.clone();
        let stale = model
            .profile("p", || async move {
                m.profile_changed_at("p", now_micros());
                Ok::<_, ()>(Some(facts(1)))
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(*stale, facts(1));
        assert_eq!(*load(&model, "p", 2).await, facts(2), "not cached");
    }

    #[tokio::test]
    async fn a_change_of_another_key_does_not_drop_a_fill_in_flight() {
        let model = Arc::new(ReadModel::default());
        let mine = model.profiles.generation("q") as *const AtomicU64;
        let others: Vec<String> = (0..1000)
            .map(|i| format!("other-{i}"))
            .filter(|k| !std::ptr::eq(model.profiles.generation(k), mine))
            .collect();
        let m = model.clone();
        model
            .profile("q", || async move {
                for k in &others {
                    m.profile_changed_at(k, now_micros()); // a catch-up's changes
                }
                Ok::<_, ()>(Some(facts(1)))
            })
            .await
            .unwrap();
        assert_eq!(*load(&model, "q", 2).await, facts(1), "the fill was kept");
    }

    #[tokio::test]
    async fn an_old_batch_run_keeps_segments_loaded_after_it() {
        let model = ReadModel::default();
        let seg = |n: usize| SegmentFacts {
            segments: (0..n).map(|i| format!("s{i}")).collect(),
            ..SegmentFacts::default()
        };
        model
            .segments("a", || async move { Ok::<_, ()>(seg(1)) })
            .await
            .unwrap();
        let now = now_micros();
        model.membership_changed_at("b", "run-1", now - 60_000_000);
        let a = model
            .segments("a", || async move { Ok::<_, ()>(seg(2)) })
            .await
            .unwrap();
        assert_eq!(*a, seg(1), "loaded after the old run: kept");
        model.membership_changed_at("b", "run-2", now);
        let a = model
            .segments("a", || async move { Ok::<_, ()>(seg(3)) })
            .await
            .unwrap();
        assert_eq!(*a, seg(3), "a current run drops everyone's");
    }

    #[tokio::test]
    async fn turned_off_every_read_goes_through() {
        let model = ReadModel::new(ReadModelConfig {
            max_profiles: 0,
            ..ReadModelConfig::default()
        });
        assert_eq!(*load(&model, "p", 1).await, facts(1));
        assert_eq!(*load(&model, "p", 2).await, facts(2));
    }
}
