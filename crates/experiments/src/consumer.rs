//! The feed consumer: IngestService.WatchEvents (purchases, refunds and other events of
//! event-derived metrics, see [`crate::events`]) and ProfileService.WatchChanges (merges and
//! erasures) folded into the experiment store.
//!
//! Exactly once: each batch is read after the stored cursor and applied together with the new
//! cursor in one transaction that first checks the stored cursor is still the one read from
//! ([`ExperimentStore::apply_events`], [`ExperimentStore::apply_profile_changes`]); a crash
//! between reading and committing re-reads the same records, and each conversion is keyed by
//! its event (`event:<source>/<event_id>`) besides, so a redelivered event counts once.
//!
//! Profile changes are applied before events in each round, so an erasure is in force before
//! the erased person's events still in flight on the ingest feed arrive (they are dropped).
//!
//! Merges: events carry the profile id they were resolved to at ingestion, and exposures the
//! id the caller knew; both are attributed through the merge aliases when results are
//! computed, so a person whose ids were merged is one unit (its earliest exposure) and every
//! purchase of any of its ids after that exposure counts for it.

use std::time::Duration;

use clientele_proto::v1 as pb;
use clientele_runtime::client::{ClientInterceptor, lazy_channel};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::events::{self, EventFact};
use crate::store::{ExperimentStore, StoreError};

type Intercepted = InterceptedService<Channel, ClientInterceptor>;

/// Cursor name of the ingest feed.
pub const INGEST_FEED: &str = "ingest";
/// Cursor name of the profile change feed.
pub const PROFILES_FEED: &str = "profiles";
/// Records applied per transaction at most.
pub const BATCH: usize = 1_000;

/// Why a consumer pass failed (the pass is retried from the stored cursor).
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// An upstream call failed.
    #[error("upstream: {0}")]
    Upstream(#[from] tonic::Status),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The consumer of both feeds.
#[derive(Debug, Clone)]
pub struct Consumer {
    store: std::sync::Arc<dyn ExperimentStore>,
    ingest: pb::ingest_service_client::IngestServiceClient<Intercepted>,
    profiles: pb::profile_service_client::ProfileServiceClient<Intercepted>,
    idle: Duration,
}

impl Consumer {
    /// A consumer writing to `store`, reading the services at `ingest` and `profiles` with
    /// `token`. `idle` is how long a read waits for the next record before it ends a batch.
    ///
    /// # Errors
    /// An invalid endpoint or token.
    pub fn new(
        store: std::sync::Arc<dyn ExperimentStore>,
        ingest: &str,
        profiles: &str,
        token: Option<&str>,
        idle: Duration,
    ) -> Result<Self, tonic::Status> {
        let ch = |e: &str| {
            lazy_channel(e).map_err(|err| tonic::Status::internal(format!("endpoint `{e}`: {err}")))
        };
        let i = ClientInterceptor::new(token)?;
        Ok(Self {
            store,
            ingest: pb::ingest_service_client::IngestServiceClient::with_interceptor(
                ch(ingest)?,
                i.clone(),
            ),
            profiles: pb::profile_service_client::ProfileServiceClient::with_interceptor(
                ch(profiles)?,
                i,
            ),
            idle,
        })
    }

    /// The source keys to record: purchases plus every event metric of every experiment.
    async fn wanted(&self) -> Result<std::collections::BTreeSet<String>, ConsumerError> {
        let mut all = Vec::new();
        let mut after = String::new();
        loop {
            let page = self.store.list(&[], &after, 500).await?;
            let done = page.len() < 500;
            after = page.last().map(|r| r.key.clone()).unwrap_or_default();
            all.extend(page.into_iter().map(|r| r.definition));
            if done {
                break;
            }
        }
        Ok(events::wanted_keys(&all))
    }

    /// Reads at most [`BATCH`] events after the stored cursor and applies them with the new
    /// cursor in one transaction. Returns the number of event records read (0 when caught
    /// up).
    ///
    /// # Errors
    /// Upstream or store failures; nothing is applied then.
    pub async fn consume_events_once(&self) -> Result<usize, ConsumerError> {
        use pb::watch_events_request::Start;
        let expected = self.store.feed_cursor(INGEST_FEED).await?;
        let start = match &expected {
            Some(c) => Start::AfterCursor(c.clone()),
            None => Start::From(pb::WatchStart::Earliest as i32),
        };
        let wanted = self.wanted().await?;
        let mut stream = self
            .ingest
            .clone()
            .watch_events(pb::WatchEventsRequest {
                start: Some(start),
                kinds: Vec::new(),
                consumer: "experiments".into(),
            })
            .await?
            .into_inner();
        let mut facts: Vec<EventFact> = Vec::new();
        let mut records = 0usize;
        let mut last = expected.clone();
        while records < BATCH {
            let Ok(next) = tokio::time::timeout(self.idle, stream.message()).await else {
                break;
            };
            let Some(msg) = next? else { break };
            match msg.kind {
                Some(pb::watch_events_response::Kind::Record(r)) => {
                    records += 1;
                    if let Some(f) = r.event.as_ref().and_then(|e| events::fact_of(e, &wanted)) {
                        facts.push(f);
                    }
                    last = Some(r.cursor);
                }
                Some(pb::watch_events_response::Kind::HeartbeatCursor(c)) => {
                    last = Some(c);
                    break;
                }
                None => {}
            }
        }
        drop(stream);
        let Some(cursor) = last.filter(|c| Some(c) != expected.as_ref()) else {
            return Ok(0);
        };
        let written = self
            .store
            .apply_events(INGEST_FEED, expected.as_deref(), &cursor, &facts)
            .await?;
        tracing::debug!(
            records,
            written,
            "experiment conversions from ingested events"
        );
        Ok(records)
    }

    /// Reads at most [`BATCH`] profile changes after the stored sequence and applies merges
    /// and erasures with the new sequence in one transaction. Returns the number of changes
    /// read.
    ///
    /// # Errors
    /// Upstream or store failures.
    pub async fn consume_profile_changes_once(&self) -> Result<usize, ConsumerError> {
        let expected = self.store.feed_cursor(PROFILES_FEED).await?;
        let after: i64 = expected
            .as_deref()
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let mut stream = self
            .profiles
            .clone()
            .watch_changes(clientele_runtime::feed::identity_changes_request(after))
            .await?
            .into_inner();
        let page = clientele_runtime::feed::read_page(&mut stream, BATCH, self.idle).await?;
        drop(stream);
        let read = page.len();
        let (changes, last) = clientele_runtime::feed::identity_changes(page);
        let Some(last) = last else {
            return Ok(0);
        };
        self.store
            .apply_profile_changes(
                PROFILES_FEED,
                expected.as_deref(),
                &last.to_string(),
                &changes,
                clientele_runtime::time::now_micros(),
            )
            .await?;
        Ok(read)
    }

    /// Applies both feeds until both are caught up (profile changes first in each round);
    /// returns (events, profile changes) read.
    ///
    /// # Errors
    /// As the single passes.
    pub async fn catch_up(&self) -> Result<(usize, usize), ConsumerError> {
        let (mut events, mut changes) = (0, 0);
        loop {
            let p = self.consume_profile_changes_once().await?;
            let e = self.consume_events_once().await?;
            events += e;
            changes += p;
            if e == 0 && p == 0 {
                return Ok((events, changes));
            }
        }
    }
    /// Starts the consumer in the background, in one replica at a time (the one holding the
    /// `experiments.feeds` leader lock on `target`'s PostgreSQL; on SQLite it simply runs).
    pub fn spawn(
        self,
        target: clientele_runtime::db::DatabaseTarget,
    ) -> tokio::task::JoinHandle<()> {
        clientele_runtime::leader::spawn_polling(
            target,
            "experiments.feeds",
            Duration::from_millis(500),
            self,
            |me| async move { me.catch_up().await },
        )
    }
}
