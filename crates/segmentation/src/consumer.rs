//! The feed consumer: folds IngestService.WatchEvents (orders, refunds, engagement) and
//! ProfileService.WatchChanges (merges, erasures, trait/consent updates) into the service's own
//! tables, then re-scores the profiles that changed (real-time membership changes).
//!
//! Exactly once: each batch is read after the stored cursor and applied together with the new
//! cursor in one transaction that first checks the stored cursor is still the one read from
//! (see [`crate::store`]); a crash between reading and committing re-reads the same records,
//! and the fold itself is idempotent per order id / refund event besides.
//!
//! [`Consumer::consume_once`] and [`Consumer::consume_profile_changes_once`] each apply at most
//! one batch and return how many records they applied, so tests drive the consumer
//! deterministically; [`Consumer::spawn`] loops them in the background.

use std::collections::BTreeSet;
use std::time::Duration;

use clientele_proto::v1 as pb;
use clientele_runtime::time::micros;

use crate::engine::{Engine, EngineError, ProfileClient};
use crate::scoring::ScoringConfig;
use crate::store::{Fact, ProfileEvent, StoreError};

/// Feed name of the ingest event log in `seg_feed_cursors`.
pub const INGEST_FEED: &str = "ingest";
/// Feed name of the profile change log.
pub const PROFILES_FEED: &str = "profiles";
/// Records folded per transaction at most.
pub const BATCH: usize = 2_000;

/// IngestService client type.
pub type IngestClient = pb::ingest_service_client::IngestServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        clientele_runtime::client::ClientInterceptor,
    >,
>;

/// Consumer failures.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// An upstream stream failed.
    #[error("upstream: {0}")]
    Upstream(#[from] tonic::Status),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Re-scoring failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The consumer of both feeds.
#[derive(Debug, Clone)]
pub struct Consumer {
    engine: Engine,
    ingest: IngestClient,
    profiles: ProfileClient,
    idle: Duration,
}

fn top_category(path: &str) -> String {
    path.split('/')
        .find(|p| !p.is_empty())
        .unwrap_or("")
        .to_owned()
}

/// Maps one stored event to the fact the features need (`None` for kinds that do not matter).
#[must_use]
pub fn fact_of(stored: &pb::StoredEvent, config: &ScoringConfig) -> Option<Fact> {
    use pb::event::Payload;
    let event = stored.event.as_ref()?;
    let profile_id = stored.profile_id.clone();
    let at = event.occurred_at.as_ref().and_then(micros)?;
    let convert = |m: Option<&pb::Money>| -> Option<i64> {
        let m = m?;
        config.convert(m.amount_minor, &m.currency)
    };
    let kind = match event.payload.as_ref()? {
        Payload::OrderCompleted(o) => {
            let amount = convert(o.total.as_ref());
            let lines = o
                .line_items
                .iter()
                .filter(|l| !l.category.is_empty())
                .filter_map(|l| {
                    let unit = convert(l.unit_price.as_ref())?;
                    Some((
                        top_category(&l.category),
                        unit.saturating_mul(i64::from(l.quantity)),
                    ))
                })
                .collect();
            return Some(Fact::Order {
                profile_id,
                order_id: o.order_id.clone(),
                placed_at: at,
                amount_minor: amount.unwrap_or(0),
                discount_minor: convert(o.discount_total.as_ref()).unwrap_or(0),
                converted: amount.is_some(),
                lines,
            });
        }
        Payload::OrderRefunded(r) => {
            return Some(Fact::Refund {
                profile_id,
                refund_key: format!("{}/{}", event.source, event.event_id),
                order_id: r.order_id.clone(),
                amount_minor: convert(r.refund.as_ref()).unwrap_or(0),
                full: r.r#type == pb::RefundType::Full as i32,
            });
        }
        Payload::ProductViewed(_) => "product_viewed",
        Payload::EmailOpened(_) => "email_opened",
        Payload::EmailClicked(_) => "email_clicked",
        Payload::AppOpened(_) => "app_opened",
        Payload::CartUpdated(_) => "cart_updated",
        Payload::CartAbandoned(_) => "cart_abandoned",
        Payload::Searched(_) => "searched",
        Payload::PageViewed(_) => "page_viewed",
        Payload::ScreenViewed(_) => "screen_viewed",
        Payload::PushClicked(_) => "push_clicked",
        _ => return Some(Fact::Seen { profile_id, at }),
    };
    Some(Fact::Engagement {
        profile_id,
        at,
        kind: kind.to_owned(),
    })
}

impl Consumer {
    /// A consumer reading `ingest` and `profiles`. `idle` is how long a read waits for the
    /// next record before it ends the batch.
    #[must_use]
    pub fn new(
        engine: Engine,
        ingest: IngestClient,
        profiles: ProfileClient,
        idle: Duration,
    ) -> Self {
        Self {
            engine,
            ingest,
            profiles,
            idle,
        }
    }

    /// Reads at most [`BATCH`] events after the stored cursor, folds them and the cursor in
    /// one transaction, then re-scores the profiles they changed (when a run exists).
    /// Returns the number of event records applied (0 when caught up).
    ///
    /// # Errors
    /// Upstream, store or re-scoring failures; nothing is applied then.
    pub async fn consume_once(&self) -> Result<usize, ConsumerError> {
        use pb::watch_events_request::Start;
        let store = &self.engine.store;
        let expected = store.feed_cursor(INGEST_FEED).await?;
        let start = match &expected {
            Some(c) => Start::AfterCursor(c.clone()),
            None => Start::From(pb::WatchStart::Earliest as i32),
        };
        let mut stream = self
            .ingest
            .clone()
            .watch_events(pb::WatchEventsRequest {
                start: Some(start),
                kinds: Vec::new(),
                consumer: "segmentation".into(),
            })
            .await?
            .into_inner();
        let mut facts = Vec::new();
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
                    if let Some(f) = r
                        .event
                        .as_ref()
                        .and_then(|e| fact_of(e, &self.engine.config))
                    {
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
        let touched = store
            .apply_events(INGEST_FEED, expected.as_deref(), &cursor, &facts)
            .await?;
        self.rescore(touched).await?;
        Ok(records)
    }

    /// Reads at most [`BATCH`] profile changes after the stored sequence and applies them
    /// (merges, erasures, updates) with the new sequence in one transaction, then re-scores
    /// the touched profiles. Returns the number of changes applied.
    ///
    /// # Errors
    /// Upstream, store or re-scoring failures.
    pub async fn consume_profile_changes_once(&self) -> Result<usize, ConsumerError> {
        let store = &self.engine.store;
        let expected = store.feed_cursor(PROFILES_FEED).await?;
        let after: i64 = expected
            .as_deref()
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let mut stream = self
            .profiles
            .clone()
            .watch_changes(pb::WatchChangesRequest {
                after_sequence: after,
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut events = Vec::new();
        let mut last = after;
        while events.len() < BATCH {
            let Ok(next) = tokio::time::timeout(self.idle, stream.message()).await else {
                break;
            };
            let Some(change) = next? else { break };
            last = change.sequence;
            use pb::ProfileChangeKind as K;
            events.push(match K::try_from(change.kind).unwrap_or(K::Unspecified) {
                K::Merged => ProfileEvent::Merged {
                    survivor: change.profile_id,
                    merged: change.merged_profile_ids,
                },
                K::Erased => ProfileEvent::Erased(change.profile_id),
                _ => ProfileEvent::Touched(change.profile_id),
            });
        }
        drop(stream);
        if events.is_empty() {
            return Ok(0);
        }
        let (touched, changes) = store
            .apply_profile_events(
                PROFILES_FEED,
                expected.as_deref(),
                &last.to_string(),
                &events,
                clientele_runtime::time::now_micros(),
            )
            .await?;
        if !changes.is_empty() {
            self.engine.changed.notify_waiters();
        }
        self.rescore(touched).await?;
        Ok(events.len())
    }

    /// Applies both feeds until both are caught up; returns (events, profile changes).
    ///
    /// # Errors
    /// As the single steps.
    pub async fn catch_up(&self) -> Result<(usize, usize), ConsumerError> {
        let (mut events, mut changes) = (0, 0);
        loop {
            let p = self.consume_profile_changes_once().await?;
            let e = self.consume_once().await?;
            events += e;
            changes += p;
            if e == 0 && p == 0 {
                return Ok((events, changes));
            }
        }
    }

    async fn rescore(&self, touched: BTreeSet<String>) -> Result<(), ConsumerError> {
        if touched.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = touched.into_iter().collect();
        for chunk in ids.chunks(500) {
            match self.engine.rescore(chunk, false).await {
                Ok(_) | Err(EngineError::NoRun) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
    /// Starts the consumer in the background, in one replica at a time (the one holding the
    /// `segmentation.feeds` leader lock on `target`'s PostgreSQL; on SQLite it simply runs).
    pub fn spawn(
        self,
        target: clientele_runtime::db::DatabaseTarget,
    ) -> tokio::task::JoinHandle<()> {
        clientele_runtime::leader::spawn_polling(
            target,
            "segmentation.feeds",
            Duration::from_millis(500),
            self,
            |me| async move { me.catch_up().await },
        )
    }
}
