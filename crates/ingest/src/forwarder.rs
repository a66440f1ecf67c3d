//! Durable aggregate propagation: delivers outbox rows (written in the same transaction as
//! their events) to ProfileService.ApplyAggregates in batches and deletes them only after
//! ProfileService confirmed them. A crash anywhere in between redelivers, which is safe because
//! ApplyAggregates ignores a repeated idempotency key. Also prunes expired dedup keys and
//! stream results.

use std::sync::Arc;
use std::time::Duration;

use clientele_proto::v1 as pb;
use prost::Message;
use tokio::sync::Notify;
use tonic::Status;

use crate::service::ProfileClient;
use crate::store::EventStore;

/// Delivers the outbox to ProfileService.
#[derive(Debug, Clone)]
pub struct Forwarder {
    store: Arc<dyn EventStore>,
    profiles: ProfileClient,
    batch: i64,
}

impl Forwarder {
    /// A forwarder sending up to `batch` deltas per call.
    pub fn new(store: Arc<dyn EventStore>, profiles: ProfileClient, batch: u32) -> Self {
        Self {
            store,
            profiles,
            batch: i64::from(batch.clamp(1, 1000)),
        }
    }

    /// Delivers one batch of deliverable rows; returns how many rows it settled (0 when the
    /// outbox is empty). Fails, leaving the rows in place, when ProfileService is unreachable.
    pub async fn run_once(&self) -> Result<usize, Status> {
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
        let started = std::time::Instant::now();
        let sent = client
            .apply_aggregates(pb::ApplyAggregatesRequest {
                deltas: deltas.clone(),
            })
            .await;
        tracing::debug!(
            deltas = rows.len(),
            apply_ms = started.elapsed().as_secs_f64() * 1e3,
            "aggregates delivered"
        );
        match sent {
            Ok(_) => {
                let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
                self.store.outbox_done(&ids).await?;
                Ok(rows.len())
            }
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                // One bad delta must not block the rest: deliver one by one, park refusals.
                for (r, d) in rows.iter().zip(deltas) {
                    match client
                        .apply_aggregates(pb::ApplyAggregatesRequest { deltas: vec![d] })
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

    /// Delivers until the outbox has no deliverable rows.
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
