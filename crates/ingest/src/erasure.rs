//! Erasure of stored events (GDPR art. 17): follows ProfileService.WatchChanges and, for each
//! PROFILE_CHANGE_KIND_ERASED, deletes the events stored for that profile and for every id
//! merged into it (merges are learnt from the same feed's MERGED changes).
//!
//! Exactly once in effect: each batch of changes is read after the stored cursor and applied
//! together with the new cursor in one transaction that first checks the cursor is still the
//! one read (see [`EventStore::apply_profile_changes`]). A crash between reading and committing
//! re-reads the same changes; re-applying an erasure deletes nothing more. Commits that
//! resolved a profile just before its erasure cannot leave events behind: the store marks
//! erased ids and never stores an event for them afterwards.
//!
//! The same changes keep the service's [`IdentityCache`] current: merges redirect the
//! merged-away ids to their survivor, an erasure drops the cache. They are applied to the
//! cache as soon as they are read, before the store commit (dropping or redirecting entries
//! early is always safe; a failed commit re-reads and re-applies them). The consumer runs in
//! the leading replica only; every replica also runs a [`CacheFollower`], which reads the same
//! feed into its own cache and writes nothing.

use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use crate::identity_cache::IdentityCache;
use crate::service::ProfileClient;
use crate::store::{EventStore, ProfileChange};

/// Feed name of ProfileService.WatchChanges in `feed_cursors`.
pub const PROFILES_FEED: &str = "profiles";
/// Changes applied per transaction at most.
pub const BATCH: usize = 2_000;

/// Consumes ProfileService.WatchChanges into the event store.
#[derive(Debug, Clone)]
pub struct ErasureConsumer {
    store: Arc<dyn EventStore>,
    profiles: ProfileClient,
    /// How long a quiet feed is waited on before the batch read so far is applied.
    idle: Duration,
    /// The ingest service's identity cache, kept in step with merges and erasures.
    identities: Arc<IdentityCache>,
}

impl ErasureConsumer {
    /// A consumer over `store`, reading the feed from `profiles`.
    pub fn new(store: Arc<dyn EventStore>, profiles: ProfileClient) -> Self {
        Self {
            store,
            profiles,
            idle: Duration::from_millis(200),
            identities: Arc::new(IdentityCache::disabled()),
        }
    }

    /// Also applies the merges and erasures read to `cache` (the one the service resolves
    /// with).
    #[must_use]
    pub fn with_identity_cache(mut self, cache: Arc<IdentityCache>) -> Self {
        self.identities = cache;
        self
    }

    /// Reads at most [`BATCH`] changes after the stored cursor and applies them with the new
    /// cursor in one transaction. Returns how many changes it read (0 when caught up).
    ///
    /// # Errors
    /// ProfileService unreachable, or the store failed (ABORTED, from
    /// [`crate::store::StoreError::CursorMoved`], when
    /// another replica applied the same changes first: nothing was written).
    pub async fn consume_once(&self) -> Result<usize, Status> {
        let expected = self.store.feed_position(PROFILES_FEED).await?;
        let (changes, last, read) = read_changes(&self.profiles, expected, self.idle).await?;
        let Some(last) = last.filter(|l| *l != expected) else {
            return Ok(0);
        };
        apply_to_cache(&self.identities, &changes);
        let out = self
            .store
            .apply_profile_changes(
                PROFILES_FEED,
                expected,
                last,
                &changes,
                clientele_runtime::time::now_micros(),
            )
            .await?;
        if out.erased_ids > 0 {
            tracing::info!(
                ids = out.erased_ids,
                events = out.deleted_events,
                "deleted the stored events of erased profiles"
            );
        }
        Ok(read)
    }

    /// Applies changes until the feed is caught up; returns how many were read.
    ///
    /// # Errors
    /// As [`Self::consume_once`].
    pub async fn catch_up(&self) -> Result<usize, Status> {
        let mut total = 0;
        loop {
            match self.consume_once().await? {
                0 => return Ok(total),
                n => total += n,
            }
        }
    }

    /// Runs forever in the background, backing off after errors and when idle.
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.catch_up().await {
                Ok(_) => {
                    backoff = Duration::from_millis(500);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(s) => {
                    tracing::warn!(code = ?s.code(), error = %s.message(), "profile change feed failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

/// Reads at most [`BATCH`] changes after `after` from WatchChanges (waiting up to `idle` on a
/// quiet feed): the merges and erasures among them, the last sequence read, and how many.
async fn read_changes(
    profiles: &ProfileClient,
    after: i64,
    idle: Duration,
) -> Result<(Vec<ProfileChange>, Option<i64>, usize), Status> {
    let mut stream = profiles
        .clone()
        .watch_changes(clientele_runtime::feed::identity_changes_request(after))
        .await?
        .into_inner();
    let page = clientele_runtime::feed::read_page(&mut stream, BATCH, idle).await?;
    let read = page.len();
    let (changes, last) = clientele_runtime::feed::identity_changes(page);
    Ok((changes, last, read))
}

/// Merges redirect the merged-away ids to their survivor; an erasure drops the cache.
fn apply_to_cache(cache: &IdentityCache, changes: &[ProfileChange]) {
    for change in changes {
        match change {
            ProfileChange::Merged { survivor, merged } => cache.merged(survivor, merged),
            ProfileChange::Erased(profile_id) => cache.erased(profile_id),
        }
    }
}

/// Keeps one replica's identity cache in step with ProfileService.WatchChanges, writing
/// nothing. The [`ErasureConsumer`] runs only in the replica that leads the background jobs;
/// without this follower the other replicas would learn of merges and erasures only through
/// the cache entries' time to live (`ingest.identity_cache_ttl_secs`), not within a second.
#[derive(Debug, Clone)]
pub struct CacheFollower {
    profiles: ProfileClient,
    identities: Arc<IdentityCache>,
    idle: Duration,
}

impl CacheFollower {
    /// A follower applying the feed read from `profiles` to `identities`.
    pub fn new(profiles: ProfileClient, identities: Arc<IdentityCache>) -> Self {
        Self {
            profiles,
            identities,
            idle: Duration::from_millis(200),
        }
    }

    /// Reads at most [`BATCH`] changes after `after` and applies them to the cache. Returns
    /// the position to continue from and how many changes it read (0 when caught up).
    ///
    /// # Errors
    /// ProfileService unreachable.
    pub async fn follow_once(&self, after: i64) -> Result<(i64, usize), Status> {
        let (changes, last, read) = read_changes(&self.profiles, after, self.idle).await?;
        apply_to_cache(&self.identities, &changes);
        Ok((last.unwrap_or(after), read))
    }

    /// Follows the feed forever from where the leader's consumer stands in `store` (changes
    /// before this replica started cannot concern its cache, which started empty).
    pub async fn run(self, store: Arc<dyn EventStore>) {
        let mut backoff = Duration::from_millis(500);
        let mut after = loop {
            match store.feed_position(PROFILES_FEED).await {
                Ok(p) => break p,
                Err(e) => {
                    tracing::warn!(error = %e, "identity cache follower: reading the feed position failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        };
        loop {
            match self.follow_once(after).await {
                Ok((next, read)) => {
                    backoff = Duration::from_millis(500);
                    after = next;
                    if read < BATCH {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                Err(s) => {
                    tracing::warn!(code = ?s.code(), error = %s.message(), "identity cache follower: change feed failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}
