//! Durable aggregate propagation: follows the event log by `seq` from a stored cursor
//! (`feed_cursors`, feed [`AGGREGATES_FEED`]) and delivers each event's aggregate delta
//! (written in the event's own log row, in the same transaction) to
//! ProfileService.ApplyAggregates in batches, moving the cursor only after ProfileService
//! confirmed them. The log is appended in commit order (the store's log lock), so a cursor
//! never passes a row that commits later. Log deltas are sent as a feed: the request names
//! this log ([`EventStore::log_identity`]) and each delta carries its `seq` as its position, so
//! ProfileService counts a redelivered page (a crash between its apply and the cursor's move)
//! by one stored position per log instead of one key row per delta; `seq` never goes back
//! (a sequence: pruning only forgets dedup keys, erasure deletes rows without reusing their
//! numbers). Since the positions make redelivery harmless, the cursor is cheap to keep: it is
//! read with its page in one statement and moved without waiting for the WAL flush on
//! PostgreSQL ([`EventStore::advance_redeliverable_feed`]). Refunds that waited in the outbox for their
//! order, and parked refused deltas, are delivered from there by key (ApplyAggregates ignores a
//! repeated idempotency key) and deleted once confirmed; the outbox is looked at once the log
//! is caught up, and at least every [`OUTBOX_EVERY`] while it is not. Also prunes expired
//! dedup keys and stream results.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clientele_proto::v1 as pb;
use prost::Message;
use tokio::sync::{Notify, OnceCell};
use tonic::Status;

use crate::service::ProfileClient;
use crate::store::{AGGREGATES_FEED, EventStore, StoreError};

/// Delivers the log's and the outbox's aggregate deltas to ProfileService.
#[derive(Debug, Clone)]
pub struct Forwarder {
    store: Arc<dyn EventStore>,
    profiles: ProfileClient,
    batch: i64,
    /// This log's feed identity, read once.
    feed: Arc<OnceCell<String>>,
    /// When the outbox was last looked at: while the log has pages to deliver it is looked at
    /// once per [`OUTBOX_EVERY`], not before every page.
    outbox_checked: Arc<Mutex<Option<Instant>>>,
}

/// How often the outbox (refunds whose order arrived, parked deltas) is looked at while the
/// log keeps the forwarder busy; it is always looked at once the log is caught up.
const OUTBOX_EVERY: Duration = Duration::from_secs(1);

impl Forwarder {
    /// A forwarder sending up to `batch` deltas per call.
    pub fn new(store: Arc<dyn EventStore>, profiles: ProfileClient, batch: u32) -> Self {
        Self {
            store,
            profiles,
            batch: i64::from(batch.clamp(1, 1000)),
            feed: Arc::new(OnceCell::new()),
            outbox_checked: Arc::new(Mutex::new(None)),
        }
    }

    /// This log's feed identity (read from the store on first use).
    async fn feed(&self) -> Result<&str, Status> {
        let feed = self
            .feed
            .get_or_try_init(|| self.store.log_identity())
            .await?;
        Ok(feed.as_str())
    }

    /// Delivers one page of the log after the cursor and, when the log is caught up or the
    /// outbox was not looked at for [`OUTBOX_EVERY`], one batch of deliverable outbox rows;
    /// returns how many rows it settled (0 when both are caught up). Fails, leaving the rows
    /// and the cursor in place, when ProfileService is unreachable.
    pub async fn run_once(&self) -> Result<usize, Status> {
        let logged = self.log_once().await?;
        let outbox_due = logged == 0
            || self
                .outbox_checked
                .lock()
                .map_or(true, |t| t.is_none_or(|t| t.elapsed() >= OUTBOX_EVERY));
        if !outbox_due {
            return Ok(logged);
        }
        let settled = self.outbox_once().await?;
        if let Ok(mut t) = self.outbox_checked.lock() {
            *t = Some(Instant::now());
        }
        Ok(logged + settled)
    }

    /// One page of the log after the cursor.
    async fn log_once(&self) -> Result<usize, Status> {
        let (at, page) = self
            .store
            .log_deltas_after_cursor(AGGREGATES_FEED, self.batch)
            .await?;
        let Some(last) = page.last().map(|r| r.seq) else {
            return Ok(0);
        };
        let mut deltas = Vec::with_capacity(page.len());
        let now = clientele_runtime::time::now_micros();
        for r in &page {
            let Some(bytes) = &r.delta else { continue };
            match pb::AggregateDelta::decode(bytes.as_slice()) {
                Ok(d) => deltas.push(pb::AggregateDelta {
                    feed_position: r.seq,
                    ..d
                }),
                Err(e) => {
                    tracing::error!(seq = r.seq, error = %e, "undecodable aggregate delta parked");
                    self.store.park("", bytes, now).await?;
                }
            }
        }
        if !deltas.is_empty() {
            let feed = self.feed().await?.to_string();
            // The page's deltas again, for the one-by-one path after a refusal (the
            // undecodable ones are parked above already).
            let again = || {
                page.iter()
                    .filter_map(|r| {
                        let d = pb::AggregateDelta::decode(r.delta.as_deref()?).ok()?;
                        Some(pb::AggregateDelta {
                            feed_position: r.seq,
                            ..d
                        })
                    })
                    .collect()
            };
            self.deliver(feed, deltas, again, |d| {
                let store = self.store.clone();
                async move {
                    // Parked deltas go out again from the outbox by key, without a position.
                    let d = pb::AggregateDelta {
                        feed_position: 0,
                        ..d
                    };
                    store
                        .park(&d.idempotency_key, &d.encode_to_vec(), now)
                        .await
                        .map_err(Status::from)
                }
            })
            .await?;
        }
        match self
            .store
            .advance_redeliverable_feed(AGGREGATES_FEED, at, last, now)
            .await
        {
            // Another replica delivered the same page first: nothing is lost.
            Ok(()) | Err(StoreError::CursorMoved(_)) => Ok(page.len()),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends `deltas` (positioned in feed `feed`) in one call; when ProfileService refuses the
    /// call as invalid, sends them one by one (as `again` makes them once more: the call took
    /// the page's copy, which is not cloned on the way out) and hands each refused delta to
    /// `refused`.
    async fn deliver<A, F, Fut>(
        &self,
        feed: String,
        deltas: Vec<pb::AggregateDelta>,
        again: A,
        refused: F,
    ) -> Result<(), Status>
    where
        A: FnOnce() -> Vec<pb::AggregateDelta>,
        F: Fn(pb::AggregateDelta) -> Fut,
        Fut: std::future::Future<Output = Result<(), Status>>,
    {
        let mut client = self.profiles.clone();
        let started = std::time::Instant::now();
        let n = deltas.len();
        let sent = client
            .apply_aggregates(pb::ApplyAggregatesRequest {
                deltas,
                feed: feed.clone(),
            })
            .await;
        tracing::debug!(
            deltas = n,
            apply_ms = started.elapsed().as_secs_f64() * 1e3,
            "aggregates delivered"
        );
        match sent {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                // One bad delta must not block the rest: deliver one by one, park refusals.
                for d in again() {
                    match client
                        .apply_aggregates(pb::ApplyAggregatesRequest {
                            deltas: vec![d.clone()],
                            feed: feed.clone(),
                        })
                        .await
                    {
                        Ok(_) => {}
                        Err(s) if s.code() == tonic::Code::InvalidArgument => {
                            tracing::error!(key = %d.idempotency_key, error = %s.message(), "aggregate delta refused; parked");
                            refused(d).await?;
                        }
                        Err(s) => return Err(s),
                    }
                }
                Ok(())
            }
            Err(s) => Err(s),
        }
    }

    /// One batch of deliverable outbox rows (refunds whose order arrived).
    async fn outbox_once(&self) -> Result<usize, Status> {
        let rows = self.store.outbox(self.batch).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut deltas = Vec::with_capacity(rows.len());
        for r in &rows {
            match pb::AggregateDelta::decode(r.delta.as_slice()) {
                Ok(d) => deltas.push(d),
                Err(e) => {
                    tracing::error!(id = r.id, error = %e, "undecodable outbox row parked");
                    self.store.outbox_dead(r.id).await?;
                    return Ok(1);
                }
            }
        }
        let mut client = self.profiles.clone();
        let sent = client
            .apply_aggregates(pb::ApplyAggregatesRequest {
                deltas: deltas.clone(),
                ..Default::default()
            })
            .await;
        match sent {
            Ok(_) => {
                let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
                self.store.outbox_done(&ids).await?;
                Ok(rows.len())
            }
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                for (r, d) in rows.iter().zip(deltas) {
                    match client
                        .apply_aggregates(pb::ApplyAggregatesRequest {
                            deltas: vec![d],
                            ..Default::default()
                        })
                        .await
                    {
                        Ok(_) => self.store.outbox_done(&[r.id]).await?,
                        Err(s) if s.code() == tonic::Code::InvalidArgument => {
                            tracing::error!(id = r.id, error = %s.message(), "aggregate delta refused; parked");
                            self.store.outbox_dead(r.id).await?;
                        }
                        Err(s) => return Err(s),
                    }
                }
                Ok(rows.len())
            }
            Err(s) => Err(s),
        }
    }

    /// Delivers until the log and the outbox have nothing left to deliver.
    pub async fn drain(&self) -> Result<usize, Status> {
        let mut total = 0;
        loop {
            let n = self.run_once().await?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }

    /// Runs forever: delivers whenever `wake` fires (after each commit) or every second, and
    /// backs off up to 10 s while ProfileService fails.
    pub async fn run(self, wake: Arc<Notify>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let notified = wake.notified();
            match self.run_once().await {
                Ok(0) => {
                    backoff = Duration::from_millis(100);
                    tokio::select! {
                        () = notified => {},
                        () = tokio::time::sleep(Duration::from_secs(1)) => {},
                    }
                }
                Ok(_) => backoff = Duration::from_millis(100),
                Err(s) => {
                    tracing::warn!(code = ?s.code(), error = %s.message(), "aggregate delivery failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

/// Runs forever: every hour forgets dedup keys older than `dedup_window_days` and stream
/// batch results older than 48 hours (the contract keeps them at least 24).
pub async fn prune_forever(store: Arc<dyn EventStore>, dedup_window_days: u32) {
    let window = i64::from(dedup_window_days.max(30)) * 86_400_000_000;
    loop {
        let now = chrono::Utc::now().timestamp_micros();
        match store.prune(now - window, now - 48 * 3_600_000_000).await {
            Ok(n) if n > 0 => tracing::info!(rows = n, "pruned expired dedup keys and results"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning failed"),
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
