//! Feed consumers: points accrual and reversal from IngestService.WatchEvents, triggers
//! from both feeds (segment entries from SegmentationService.WatchMembershipChanges, events
//! such as CART_ABANDONED from IngestService.WatchEvents), and merges and erasure from
//! ProfileService.WatchChanges (PROFILE_CHANGE_KIND_MERGED / _ERASED).
//!
//! Exactly once per order: an ORDER_COMPLETED is accrued under the ledger key
//! `order:<order_id>` and the feed cursor is stored **in the same transaction** as the ledger
//! entry ([`crate::store::OfferStore::apply_ledger`]), so a crash between the two cannot double-accrue, and a
//! redelivered event (at-least-once feed) replays the key and writes nothing. Refunds reverse
//! under `refund:<source>/<event_id>`. Events naming a profile merged into another are applied
//! to the survivor ([`crate::store::OfferStore::survivor_of`]), which holds the merged profile's orders; an
//! order already in the survivor's ledger (moved by the merge) is not accrued again.
//!
//! Every change read from the three feeds also invalidates Decide's read models of the
//! profile ([`crate::read_model`]): profile changes and the orders, refunds and triggering
//! events read here its profile and segment facts, membership changes its segment facts.
//!
//! At most once per trigger firing: each firing is claimed by `(trigger_id, source_key)`
//! (the membership change_id or the event's `source/event_id`) before issuing, with an
//! idempotency key derived from both; an ineligible firing is counted as skipped.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use clientele_proto::v1 as pb;
use clientele_runtime::client::{ClientInterceptor, lazy_channel};
use clientele_runtime::time::micros;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::catalogue::SegmentId;
use crate::convert::utc;
use crate::earning::{EarningCustomer, Order};
use crate::ledger::{LedgerCommand, LedgerError};
use crate::money::{CurrencyCode, Money};
use crate::program::{EarnActivity, period_to_date};
use crate::service::OfferServiceImpl;
use crate::store::{EntryMeta, StoreError};

type Intercepted = InterceptedService<Channel, ClientInterceptor>;

/// Cursor name of the ingest feed.
pub const INGEST_FEED: &str = "ingest";
/// Cursor name of the membership feed.
pub const MEMBERSHIP_FEED: &str = "segmentation";
/// Cursor name of the profile change feed (erasures): the last applied sequence number.
pub const PROFILES_FEED: &str = "profiles";
/// Records read per pass.
const BATCH: usize = 500;

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

/// Both feed consumers of one service.
#[derive(Debug, Clone)]
pub struct Consumers {
    service: OfferServiceImpl,
    ingest: pb::ingest_service_client::IngestServiceClient<Intercepted>,
    segments: pb::segmentation_service_client::SegmentationServiceClient<Intercepted>,
    profiles: pb::profile_service_client::ProfileServiceClient<Intercepted>,
    idle: Duration,
    /// The open membership stream, kept across passes: before any cursor is stored it was
    /// opened `from_now`, and closing it would lose the changes until the next open.
    memberships:
        Arc<tokio::sync::Mutex<Option<tonic::Streaming<pb::WatchMembershipChangesResponse>>>>,
}

impl Consumers {
    /// Consumers feeding `service` from the services at `ingest`, `segmentation` and
    /// `profiles`.
    ///
    /// # Errors
    /// An invalid endpoint or token.
    pub fn new(
        service: OfferServiceImpl,
        ingest: &str,
        segmentation: &str,
        profiles: &str,
        token: Option<&str>,
        idle: Duration,
    ) -> Result<Self, tonic::Status> {
        let ch = |e: &str| {
            lazy_channel(e).map_err(|err| tonic::Status::internal(format!("endpoint `{e}`: {err}")))
        };
        let i = ClientInterceptor::new(token)?;
        Ok(Self {
            service,
            ingest: pb::ingest_service_client::IngestServiceClient::with_interceptor(
                ch(ingest)?,
                i.clone(),
            ),
            segments: pb::segmentation_service_client::SegmentationServiceClient::with_interceptor(
                ch(segmentation)?,
                i.clone(),
            ),
            profiles: pb::profile_service_client::ProfileServiceClient::with_interceptor(
                ch(profiles)?,
                i,
            ),
            idle,
            memberships: Arc::default(),
        })
    }

    /// Reads up to a batch of ingest records after the stored cursor and applies them.
    /// Returns the number of records read.
    ///
    /// # Errors
    /// Upstream or store failures; the cursor then stays at the last applied record.
    pub async fn consume_events_once(&self) -> Result<usize, ConsumerError> {
        use pb::watch_events_request::Start;
        let store = self.service.store();
        let expected = store.cursor(INGEST_FEED).await?;
        let start = match &expected {
            Some(c) => Start::AfterCursor(c.clone()),
            None => Start::From(pb::WatchStart::Earliest as i32),
        };
        // Triggers are read once per pass; one created meanwhile applies from the next pass.
        let triggers = store.list_triggers("", "", i64::MAX).await?;
        // Only the kinds this pass acts on: orders, refunds and the kinds an event trigger
        // listens to. IngestService skips the rest (most of the log: page views, carts…) and
        // its heartbeats still move the cursor past them, so accrual is not paced by them.
        let mut kinds = vec![
            pb::EventKind::OrderCompleted as i32,
            pb::EventKind::OrderRefunded as i32,
        ];
        for t in &triggers {
            if let Some(pb::trigger::On::Event(e)) = &t.on
                && !kinds.contains(&e.kind)
            {
                kinds.push(e.kind);
            }
        }
        let mut stream = self
            .ingest
            .clone()
            .watch_events(pb::WatchEventsRequest {
                start: Some(start),
                kinds,
                consumer: "offers".into(),
            })
            .await?
            .into_inner();
        let mut records = 0;
        // The cursor of the last record that wrote nothing: stored once at the end of the pass
        // instead of one transaction per event. A crash replays those records, which is safe:
        // ledger and activity keys and trigger firings are idempotent.
        let mut pending: Option<String> = None;
        while records < BATCH {
            let Ok(next) = tokio::time::timeout(self.idle, stream.message()).await else {
                break;
            };
            let Some(msg) = next? else { break };
            match msg.kind {
                Some(pb::watch_events_response::Kind::Record(r)) => {
                    records += 1;
                    if self.apply_record(&r, &triggers).await? {
                        pending = None;
                    } else {
                        pending = Some(r.cursor);
                    }
                }
                Some(pb::watch_events_response::Kind::HeartbeatCursor(c)) => {
                    if expected.as_deref() != Some(c.as_str()) {
                        pending = Some(c);
                    }
                    break;
                }
                None => {}
            }
        }
        if let Some(c) = pending {
            store.set_cursor(INGEST_FEED, &c).await?;
        }
        Ok(records)
    }

    /// Applies one event record: accrual / reversal with the cursor, then event triggers.
    /// Returns whether the record's cursor was stored (with a ledger write); otherwise the
    /// caller stores it later.
    async fn apply_record(
        &self,
        r: &pb::EventRecord,
        triggers: &[pb::Trigger],
    ) -> Result<bool, ConsumerError> {
        let store = self.service.store();
        let Some(stored) = r.event.as_ref() else {
            return Ok(false);
        };
        let Some(event) = stored.event.as_ref() else {
            return Ok(false);
        };
        if !stored.profile_id.is_empty() {
            // Scores and lifecycle follow from orders: Decide re-reads them (unless it read
            // them well after the event, e.g. while this replica catches up).
            match stored.ingested_at.as_ref().and_then(micros) {
                Some(at) => self
                    .service
                    .read_model()
                    .event_ingested(&stored.profile_id, at),
                None => self
                    .service
                    .read_model()
                    .profile_changed(&stored.profile_id),
            }
        }
        let relevant = matches!(
            event.payload,
            Some(pb::event::Payload::OrderCompleted(_) | pb::event::Payload::OrderRefunded(_))
        ) || triggers
            .iter()
            .any(|t| matches!(&t.on, Some(pb::trigger::On::Event(e)) if e.kind == stored.kind));
        if stored.profile_id.is_empty() || !relevant {
            return Ok(false);
        }
        // An event still naming a merged-away profile belongs to the survivor, which now
        // holds that profile's ledger, orders and activity.
        let survivor = store.survivor_of(&stored.profile_id).await?;
        let profile = survivor.as_deref().unwrap_or(stored.profile_id.as_str());
        if survivor.is_some() {
            self.service.read_model().profile_changed(profile);
        }
        if store.is_erased(profile).await? {
            return Ok(false); // erased: nothing is recreated for the person
        }
        let at = event
            .occurred_at
            .as_ref()
            .and_then(micros)
            .map_or_else(Utc::now, utc);
        let cursor = Some((INGEST_FEED, r.cursor.as_str()));
        let mut wrote = false;
        match &event.payload {
            Some(pb::event::Payload::OrderCompleted(o)) if !profile.is_empty() => {
                let key = format!("order:{}", o.order_id);
                if let Some(cmd) = self.accrual(profile, &key, o, at).await? {
                    let res = store
                        .apply_ledger(profile, &key, cmd, Utc::now(), EntryMeta::default(), cursor)
                        .await;
                    wrote = ledger_outcome(res)?;
                }
                for code in &o.offer_codes {
                    self.redeem_listed_code(profile, code, o).await;
                }
            }
            Some(pb::event::Payload::OrderRefunded(rf)) if !profile.is_empty() => {
                if let Some(m) = rf.refund.as_ref()
                    && m.amount_minor > 0
                    && let Ok(currency) = CurrencyCode::new(&m.currency)
                {
                    let key = format!("refund:{}/{}", event.source, event.event_id);
                    let spend = self
                        .service
                        .program()
                        .qualifying_spend(&m.currency, -m.amount_minor);
                    if spend != 0 {
                        store
                            .record_activity(
                                profile,
                                &EarnActivity {
                                    key: key.clone(),
                                    at,
                                    spend_minor: spend,
                                    points: 0,
                                },
                            )
                            .await?;
                    }
                    let res = store
                        .apply_ledger(
                            profile,
                            &key,
                            LedgerCommand::ReverseOrder {
                                order_id: rf.order_id.clone(),
                                refund: Money::new(m.amount_minor, currency),
                            },
                            Utc::now(),
                            EntryMeta::default(),
                            cursor,
                        )
                        .await;
                    wrote = ledger_outcome(res)?;
                }
            }
            _ => {}
        }
        self.fire_event_triggers(triggers, profile, stored, event)
            .await?;
        Ok(wrote)
    }

    /// The accrual command for an order, if it earns anything, after recording the order's
    /// activity (spend for spend-qualified tiers, points for the period caps).
    ///
    /// Earning applies the programme's rules: the tier held before this order (excluding the
    /// order's own activity, so a redelivery computes the same tier), the highest multiplier
    /// of the profile's current segments (SegmentationService.GetProfileSegments, asked only
    /// when the programme has segment multipliers), and the day / month caps against the
    /// points earned by the profile's other orders in the order's UTC day and month. An order
    /// already in the ledger is not recomputed: the ledger replays its key.
    async fn accrual(
        &self,
        profile: &str,
        key: &str,
        o: &pb::OrderCompleted,
        at: chrono::DateTime<Utc>,
    ) -> Result<Option<LedgerCommand>, ConsumerError> {
        let Some(total) = o.total.as_ref() else {
            return Ok(None);
        };
        let Ok(currency) = CurrencyCode::new(&total.currency) else {
            return Ok(None);
        };
        let program = self.service.program();
        let store = self.service.store();
        let (ledger, _) = store.ledger(profile).await?;
        if ledger.entries().iter().any(|e| e.key.0 == key) || ledger.has_order(&o.order_id) {
            return Ok(None); // accrued before; the cursor still advances
        }
        let activity = store.activity(profile).await?;
        let tier = program
            .tier_standing_with(&ledger, &activity, at, Some(key))
            .ok()
            .map(|d| d.tier);
        let segments = if program.earning.segment_multipliers.is_empty() {
            BTreeSet::new()
        } else {
            self.service
                .upstreams()
                .segments
                .segments(profile)
                .await?
                .segments
                .into_iter()
                .map(SegmentId::new)
                .collect()
        };
        let order = Order {
            id: o.order_id.clone(),
            placed_at: at,
            amount: Money::new(total.amount_minor, currency),
            lines: Vec::new(),
        };
        let customer = EarningCustomer { tier, segments };
        let to_date = period_to_date(&activity, at, Some(key));
        let (earned, command) = match program.earning.earn_for_order(&order, &customer, to_date) {
            Ok(e) => {
                let command = program.earning.accrual_for_order(&order, &e);
                (e.points, command)
            }
            Err(e) => {
                tracing::debug!(order = %o.order_id, error = %e, "order earns no points");
                (0, None)
            }
        };
        let spend = program.qualifying_spend(&total.currency, total.amount_minor);
        if spend != 0 || earned != 0 {
            store
                .record_activity(
                    profile,
                    &EarnActivity {
                        key: key.to_string(),
                        at,
                        spend_minor: spend,
                        points: earned,
                    },
                )
                .await?;
        }
        Ok(command)
    }

    /// Redeems a code listed on an order (keyed by the order, so the RPC and the event
    /// coincide). Failures are logged: the order already happened.
    async fn redeem_listed_code(&self, profile: &str, code: &str, o: &pb::OrderCompleted) {
        use clientele_proto::v1::offer_service_server::OfferService;
        let req = pb::RedeemOfferRequest {
            code: code.to_string(),
            idempotency_key: format!("order:{}", o.order_id),
            profile_id: profile.to_string(),
            order_id: o.order_id.clone(),
            channel: if o.channel == 0 {
                pb::Channel::Web as i32
            } else {
                o.channel
            },
            store_id: o.store_id.clone(),
            ..Default::default()
        };
        if let Err(s) = self.service.redeem_offer(tonic::Request::new(req)).await {
            tracing::info!(code, order = %o.order_id, error = %s.message(), "order's offer code not redeemed");
        }
    }

    async fn fire_event_triggers(
        &self,
        triggers: &[pb::Trigger],
        profile: &str,
        stored: &pb::StoredEvent,
        event: &pb::Event,
    ) -> Result<(), ConsumerError> {
        for t in triggers {
            let Some(pb::trigger::On::Event(e)) = &t.on else {
                continue;
            };
            if e.kind != stored.kind {
                continue;
            }
            if let (Some(min), Some(value)) = (&e.min_value, event_value(event)) {
                if value.currency != min.currency || value.amount_minor < min.amount_minor {
                    continue;
                }
            } else if e.min_value.is_some() {
                continue;
            }
            if let Some(pb::event::Payload::Custom(c)) = &event.payload
                && c.name != e.custom_event_name
            {
                continue;
            }
            let source_key = format!("{}/{}", event.source, event.event_id);
            self.fire(t, profile, &source_key).await?;
        }
        Ok(())
    }

    /// Fires `t` for `profile` once per `source_key`.
    async fn fire(
        &self,
        t: &pb::Trigger,
        profile: &str,
        source_key: &str,
    ) -> Result<(), ConsumerError> {
        let store = self.service.store();
        let now = clientele_runtime::time::now_micros();
        if !store
            .claim_firing(&t.trigger_id, source_key, profile, now)
            .await?
        {
            return Ok(());
        }
        let req = pb::IssueOfferRequest {
            profile_id: profile.to_string(),
            offer_id: t.offer_id.clone(),
            idempotency_key: format!("trigger:{}:{source_key}", t.trigger_id),
            channel: t.channel,
            ..Default::default()
        };
        let issued = match self
            .service
            .issue(req, pb::IssueSource::Trigger, &t.trigger_id)
            .await
        {
            Ok(i) => Some(i.issue_id),
            // Ineligible, or the profile was erased (or merged away) meanwhile.
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::NotFound
                ) =>
            {
                tracing::info!(trigger = %t.trigger_id, profile, reason = %s.message(), "trigger firing skipped");
                None
            }
            Err(s) => return Err(s.into()),
        };
        store
            .finish_firing(&t.trigger_id, source_key, issued.as_deref())
            .await?;
        Ok(())
    }

    /// Reads up to a batch of membership changes after the stored cursor and fires segment
    /// entry triggers. Returns the number of changes read.
    ///
    /// # Errors
    /// Upstream or store failures.
    pub async fn consume_memberships_once(&self) -> Result<usize, ConsumerError> {
        use pb::watch_membership_changes_request::Start;
        let store = self.service.store();
        let mut open = self.memberships.lock().await;
        if open.is_none() {
            let start = match store.cursor(MEMBERSHIP_FEED).await? {
                Some(c) => Start::AfterCursor(c),
                None => Start::FromNow(true),
            };
            let stream = self
                .segments
                .clone()
                .watch_membership_changes(pb::WatchMembershipChangesRequest {
                    start: Some(start),
                    segments: Vec::new(),
                    types: Vec::new(),
                })
                .await?
                .into_inner();
            *open = Some(stream);
        }
        let mut n = 0;
        let result = async {
            let Some(stream) = open.as_mut() else {
                return Ok(());
            };
            while n < BATCH {
                let Ok(next) = tokio::time::timeout(self.idle, stream.message()).await else {
                    break;
                };
                let Some(msg) = next? else { break };
                match msg.kind {
                    Some(pb::watch_membership_changes_response::Kind::Change(c)) => {
                        n += 1;
                        match c.occurred_at.as_ref().and_then(micros) {
                            Some(at) => self.service.read_model().membership_changed_at(
                                &c.profile_id,
                                &c.run_id,
                                at,
                            ),
                            None => self
                                .service
                                .read_model()
                                .membership_changed(&c.profile_id, &c.run_id),
                        }
                        if c.r#type == pb::MembershipChangeType::Entered as i32 {
                            self.fire_segment_triggers(&c).await?;
                        }
                        if !c.cursor.is_empty() {
                            store.set_cursor(MEMBERSHIP_FEED, &c.cursor).await?;
                        }
                    }
                    Some(pb::watch_membership_changes_response::Kind::HeartbeatCursor(c)) => {
                        store.set_cursor(MEMBERSHIP_FEED, &c).await?;
                    }
                    None => {}
                }
            }
            Ok::<(), ConsumerError>(())
        }
        .await;
        if result.is_err() {
            *open = None; // reopen from the stored cursor next time
        }
        result.map(|()| n)
    }

    async fn fire_segment_triggers(&self, c: &pb::MembershipChange) -> Result<(), ConsumerError> {
        let Some(seg) = c.segment.as_ref() else {
            return Ok(());
        };
        let triggers = self.service.store().list_triggers("", "", i64::MAX).await?;
        for t in triggers {
            let Some(pb::trigger::On::SegmentEntry(s)) = &t.on else {
                continue;
            };
            let Some(want) = s.segment.as_ref() else {
                continue;
            };
            let created = t.create_time.as_ref().and_then(micros).unwrap_or(0);
            let occurred = c.occurred_at.as_ref().and_then(micros).unwrap_or(i64::MAX);
            if want.segment_id == seg.segment_id
                && (want.cluster_index.is_none() || want.cluster_index == seg.cluster_index)
                && occurred >= created
            {
                self.fire(&t, &c.profile_id, &c.change_id).await?;
            }
        }
        Ok(())
    }

    /// Reads up to a batch of ProfileService changes after the stored sequence and erases
    /// every profile whose change is PROFILE_CHANGE_KIND_ERASED
    /// ([`crate::OfferStore::erase_profile`], with the sequence stored in the same
    /// transaction, so an erasure is applied once and a redelivery finds nothing left), and
    /// moves the points, orders, activity and codes of the `merged_profile_ids` of a
    /// PROFILE_CHANGE_KIND_MERGED change to its profile ([`crate::OfferStore::merge_profiles`],
    /// likewise with the sequence, keyed `merge:<loser>` so a redelivery moves nothing). Other
    /// kinds only advance the cursor. Returns the number of changes read.
    ///
    /// # Errors
    /// Upstream or store failures; the cursor then stays at the last applied change.
    pub async fn consume_profile_changes_once(&self) -> Result<usize, ConsumerError> {
        let store = self.service.store();
        let expected = store.cursor(PROFILES_FEED).await?;
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
        let mut n = 0;
        let mut last = after;
        while n < BATCH {
            let Ok(next) = tokio::time::timeout(self.idle, stream.message()).await else {
                break;
            };
            let Some(change) = next? else { break };
            n += 1;
            last = change.sequence;
            // Decide's cached facts of the profile (and of the ids merged into it) are stale,
            // unless they were read well after the change (a replica catching up): merges and
            // erasures drop every view at once, other changes only facts read before them.
            let structural = change.kind == pb::ProfileChangeKind::Merged as i32
                || change.kind == pb::ProfileChangeKind::Erased as i32;
            match change.changed_at.as_ref().and_then(micros) {
                Some(at) if !structural => self
                    .service
                    .read_model()
                    .profile_changed_at(&change.profile_id, at),
                _ => self
                    .service
                    .read_model()
                    .profiles_merged(&change.profile_id, &change.merged_profile_ids),
            }
            if change.kind == pb::ProfileChangeKind::Erased as i32 && !change.profile_id.is_empty()
            {
                let seq = change.sequence.to_string();
                let out = store
                    .erase_profile(&change.profile_id, Some((PROFILES_FEED, &seq)))
                    .await?;
                tracing::info!(
                    issued_offers = out.issued_offers,
                    ledger_entries = out.ledger_entries,
                    "erased profile's offers, points and tier activity"
                );
            } else if change.kind == pb::ProfileChangeKind::Merged as i32
                && !change.profile_id.is_empty()
                && !change.merged_profile_ids.is_empty()
            {
                let seq = change.sequence.to_string();
                let out = store
                    .merge_profiles(
                        &change.profile_id,
                        &change.merged_profile_ids,
                        Some((PROFILES_FEED, &seq)),
                    )
                    .await?;
                // Most merges join a profile that never earned or was issued anything; only
                // the ones that moved something are worth an INFO line.
                if out.batches > 0 || out.issued_offers > 0 {
                    tracing::info!(
                        merged = out.merged,
                        batches = out.batches,
                        points = out.points,
                        issued_offers = out.issued_offers,
                        "moved merged profiles' points, activity and offers to the survivor"
                    );
                } else {
                    tracing::debug!(
                        merged = out.merged,
                        "merged profiles held no points or offers"
                    );
                }
            }
        }
        drop(stream);
        if last != after {
            store.set_cursor(PROFILES_FEED, &last.to_string()).await?;
        }
        Ok(n)
    }

    /// Applies all three feeds until all are caught up; returns (events, membership changes);
    /// profile changes (erasures) are applied first.
    ///
    /// # Errors
    /// As the single passes.
    pub async fn catch_up(&self) -> Result<(usize, usize), ConsumerError> {
        let (mut events, mut changes) = (0, 0);
        loop {
            // An unreachable ProfileService must not hold up accrual: erasures are retried
            // from the stored sequence on the next pass. Full pages are drained at once: one
            // page per pass (each pass also waits on the quieter feeds) caught up at about
            // 800 changes/s, and until it has caught up every old change it reads
            // invalidates Decide's read models (after a restart behind 35k changes, Decide's
            // p99 stayed at 0.1–0.6 s for about a minute in the bench).
            let mut p = 0;
            let mut profiles_ok = true;
            loop {
                match self.consume_profile_changes_once().await {
                    Ok(n) => {
                        p += n;
                        if n < BATCH {
                            break;
                        }
                    }
                    Err(e) => {
                        profiles_ok = false;
                        tracing::warn!(error = %e, "profile change feed unavailable; erasures wait");
                        break;
                    }
                }
            }
            // Drain the event feed page by page before looking at the quieter feeds: each of
            // those waits up to `idle` for a message, which would otherwise be paid once per
            // 500 events and cap accrual at a few hundred events a second.
            let mut e = 0;
            loop {
                let page = self.consume_events_once().await?;
                e += page;
                if page < BATCH {
                    break;
                }
            }
            // The membership feed too, so readiness below means every feed was read to a
            // partial page, not just its first page.
            let mut m = 0;
            loop {
                let page = self.consume_memberships_once().await?;
                m += page;
                if page < BATCH {
                    break;
                }
            }
            // Every feed was read to its head (a partial page) at least once since the pass
            // began: the replica has caught up with the feeds as of its start. Later passes
            // only follow new changes, so Decide's read models now stay warm.
            if profiles_ok && !*self.service.readiness().borrow() {
                tracing::info!("feed consumers caught up: ready");
                self.service.set_ready(true);
            }
            events += e;
            changes += m;
            if e == 0 && m == 0 && p == 0 {
                return Ok((events, changes));
            }
        }
    }
    /// Starts the consumer in the background, in one replica at a time (the one holding the
    /// `offers.feeds` leader lock on `target`'s PostgreSQL; on SQLite it simply runs).
    ///
    /// The service reports ready (health SERVING) once [`Self::catch_up`] has drained every
    /// feed to its head, or at once when another replica holds the lock (a
    /// follower applies no feed, so there is nothing to catch up with).
    pub fn spawn(
        self,
        target: clientele_runtime::db::DatabaseTarget,
    ) -> tokio::task::JoinHandle<()> {
        let follower = self.service.clone();
        tokio::spawn(async move {
            clientele_runtime::leader::lead_or_follow(
                target,
                "offers.feeds",
                move || {
                    if !*follower.readiness().borrow() {
                        tracing::info!("another replica applies the feeds: ready");
                        follower.set_ready(true);
                    }
                },
                move || {
                    let me = self.clone();
                    async move {
                        clientele_runtime::leader::poll_forever(
                            "offers.feeds",
                            Duration::from_millis(500),
                            || {
                                let me = me.clone();
                                async move { me.catch_up().await }
                            },
                        )
                        .await;
                    }
                },
            )
            .await;
        })
    }
}

/// Whether a ledger write happened; refusals that mean "nothing to do" (refund of an order
/// that earned nothing, a refund beyond the order) are logged and skipped.
fn ledger_outcome(
    res: Result<crate::store::LedgerOutcome, StoreError>,
) -> Result<bool, ConsumerError> {
    match res {
        Ok(_) => Ok(true),
        // Expected every day: an old order whose points would already have expired, a refund
        // of an order that earned nothing. Logged per event only at debug level (a backfill of
        // a year's history skips thousands).
        Err(StoreError::Ledger(
            e @ (LedgerError::UnknownOrder { .. } | LedgerError::ExpiryNotAfterEarning { .. }),
        )) => {
            tracing::debug!(error = %e, "order event earns or reverses nothing");
            Ok(false)
        }
        Err(StoreError::Ledger(
            e @ (LedgerError::RefundExceedsOrder { .. }
            | LedgerError::CurrencyMismatch { .. }
            | LedgerError::OrderAmountMismatch { .. }
            | LedgerError::InvalidPoints { .. }
            | LedgerError::NonPositiveAmount { .. }),
        )) => {
            tracing::info!(error = %e, "order event skipped by the ledger");
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// The value an event trigger's threshold compares with.
fn event_value(event: &pb::Event) -> Option<&pb::Money> {
    match &event.payload {
        Some(pb::event::Payload::OrderCompleted(o)) => o.total.as_ref(),
        Some(pb::event::Payload::OrderRefunded(r)) => r.refund.as_ref(),
        Some(pb::event::Payload::CartAbandoned(c)) => c.cart_value.as_ref(),
        Some(pb::event::Payload::CartUpdated(c)) => c.cart_value.as_ref(),
        _ => None,
    }
}
