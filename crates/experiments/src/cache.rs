//! The in-process cache of experiment definitions that Assign and BatchAssign read instead
//! of the database.
//!
//! Contract (see README, "Experiments"): a definition served from the cache was read from the
//! database at or after the moment its lookup started, and is served for at most `ttl` after
//! that moment. So a change committed by any process at time T is seen by every Assign that
//! starts after T + `ttl`, and a change made through this process (create, update, start,
//! stop) is seen by the next Assign at once: the write drops the entry, and a read that was
//! already in flight when the write happened cannot put the older record back (the
//! invalidation epoch it captured no longer matches). Lookups of unknown keys are not cached.
//! Lifecycle changes and every other read go to the database: only assignment reads here.
//!
//! Pure: callers pass the clock, so the rules are tested without sleeping.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::model::ExperimentRecord;

/// Entries kept before expired ones are swept on insert.
const SWEEP_ABOVE: usize = 4096;

/// Experiment definitions by key, each valid for `ttl` from when its read started.
#[derive(Debug)]
pub struct DefinitionCache {
    ttl: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Bumped by every invalidation; a read that started under an older epoch is not kept.
    epoch: u64,
    entries: HashMap<String, (Instant, Arc<ExperimentRecord>)>,
}

impl DefinitionCache {
    /// A cache whose entries are served for `ttl` after their read started.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The staleness bound.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The cached record of `key` if it is still within the bound at `now`.
    pub fn lookup(&self, key: &str, now: Instant) -> Option<Arc<ExperimentRecord>> {
        let inner = self.lock();
        let (read_at, record) = inner.entries.get(key)?;
        (now.saturating_duration_since(*read_at) < self.ttl).then(|| record.clone())
    }

    /// The current invalidation epoch; capture it before reading the database.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Keeps `record`, read from the database starting at `read_at` under `epoch`, unless an
    /// invalidation happened since (then the read may predate a write of this process).
    pub fn insert(&self, record: Arc<ExperimentRecord>, read_at: Instant, epoch: u64) {
        let mut inner = self.lock();
        if inner.epoch != epoch {
            return;
        }
        if inner.entries.len() >= SWEEP_ABOVE {
            let ttl = self.ttl;
            inner
                .entries
                .retain(|_, (at, _)| read_at.saturating_duration_since(*at) < ttl);
        }
        inner.entries.insert(record.key.clone(), (read_at, record));
    }

    /// Drops `key` after a write of this process, and keeps reads in flight from putting an
    /// older record back.
    pub fn invalidate(&self, key: &str) {
        let mut inner = self.lock();
        inner.epoch += 1;
        inner.entries.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Lifecycle;

    fn record(key: &str, version: i64) -> Arc<ExperimentRecord> {
        Arc::new(ExperimentRecord {
            key: key.into(),
            definition: clientele_proto::v1::Experiment::default(),
            status: Lifecycle::Running,
            version,
            created_at: 0,
            updated_at: 0,
            start_time: None,
            stop_time: None,
            released_variant: None,
            stop_reason: String::new(),
        })
    }

    #[test]
    fn an_entry_is_served_until_the_bound_from_when_its_read_started() {
        let cache = DefinitionCache::new(Duration::from_secs(1));
        let t0 = Instant::now();
        cache.insert(record("a", 1), t0, cache.epoch());
        assert_eq!(
            cache
                .lookup("a", t0 + Duration::from_millis(999))
                .map(|r| r.version),
            Some(1)
        );
        assert!(cache.lookup("a", t0 + Duration::from_secs(1)).is_none());
        assert!(cache.lookup("b", t0).is_none());
    }

    #[test]
    fn invalidation_drops_the_entry_and_refuses_reads_that_were_in_flight() {
        let cache = DefinitionCache::new(Duration::from_secs(1));
        let t0 = Instant::now();
        cache.insert(record("a", 1), t0, cache.epoch());
        let in_flight = cache.epoch();
        cache.invalidate("a");
        assert!(cache.lookup("a", t0).is_none());
        cache.insert(record("a", 1), t0, in_flight);
        assert!(
            cache.lookup("a", t0).is_none(),
            "a read older than the write was kept"
        );
        cache.insert(record("a", 2), t0, cache.epoch());
        assert_eq!(cache.lookup("a", t0).map(|r| r.version), Some(2));
    }

    #[test]
    fn a_zero_bound_caches_nothing() {
        let cache = DefinitionCache::new(Duration::ZERO);
        let t0 = Instant::now();
        cache.insert(record("a", 1), t0, cache.epoch());
        assert!(cache.lookup("a", t0).is_none());
    }
}
