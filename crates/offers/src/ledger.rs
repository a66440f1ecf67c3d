//! The points ledger: append-only entries and the pure rules that produce them.
//!
//! # Model
//!
//! A customer's ledger is a sequence of [`LedgerEntry`] values numbered by a
//! contiguous [`EntrySeq`] starting at 0. Entries are never updated or deleted.
//! Points are held in **batches**: every accrual (and every positive manual
//! adjustment) creates one batch, identified by the sequence number of the
//! entry that created it, with its own optional expiry time.
//!
//! * **Redemption** spends batches oldest first (by the time they were earned,
//!   then batch sequence number), skipping batches that have expired at the time of
//!   the redemption, and records the exact draws so a cancellation can put the
//!   points back where they came from.
//! * **Expiry** is per batch: a batch is unavailable from its `expires_at`
//!   instant on (`expires_at <= t` means expired at `t`). [`LedgerCommand::ExpireDue`]
//!   writes the remaining points of expired batches off with explicit entries;
//!   the available balance ignores expired batches whether or not that entry
//!   has been written yet.
//! * **The balance never goes negative**: a redemption or negative adjustment
//!   larger than the available balance is refused with
//!   [`LedgerError::InsufficientBalance`]; no batch's remaining points drop below 0.
//! * **Refunds** reverse the order's points in proportion to the refunded
//!   amount; see [`LedgerCommand::ReverseOrder`] for the rounding and the
//!   shortfall policy.
//! * **Profile merges** ([`PointsLedger::merge_out`] / [`PointsLedger::merge_in`]):
//!   the loser's ledger ends with a `MergedOut` entry (every batch emptied, no
//!   further commands); the survivor's gets one `MergedIn` entry per batch,
//!   re-creating it with its original earned time, expiry, refund state and
//!   order, so FIFO, expiry and refunds treat it as if earned there.
//!
//! # Idempotency
//!
//! Every command carries an [`IdempotencyKey`], unique within one customer's
//! ledger. Each entry stores its command's key and a stable
//! [fingerprint](LedgerCommand::fingerprint) of the command payload (the
//! timestamp is excluded, since a retried request may be stamped again).
//! Re-applying a key with the same payload returns the original entries and
//! writes nothing; with a different payload it is
//! [`LedgerError::IdempotencyConflict`].
//!
//! # Use by a store
//!
//! [`PointsLedger::apply`] is pure: it returns the entries to append with
//! their sequence numbers already assigned, without changing the ledger. The
//! store inserts them in one transaction; a `UNIQUE (customer_id, seq)`
//! constraint (or a row lock on the customer's ledger head) makes concurrent
//! writers conflict, and the loser reloads and re-applies. Because the rules
//! only ever read the state they were given, re-applying after reload
//! re-checks the balance, so two concurrent redemptions can never both spend
//! the same points.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::money::{CurrencyCode, Money};

/// A number of loyalty points. Signed so deltas can be expressed; quantities
/// in commands must be positive unless documented otherwise.
pub type Points = i64;

/// Caller-chosen key that makes a command safe to retry. Unique per customer ledger.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IdempotencyKey(pub String);

impl IdempotencyKey {
    /// Builds a key from anything string-like.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }
}

/// Position of an entry in a customer's ledger: 0, 1, 2, … without gaps.
///
/// A batch of points is identified by the `EntrySeq` of the entry that created it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EntrySeq(pub u64);

/// Points taken from (or returned to) one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchDraw {
    /// The batch, named by the sequence number of the entry that created it.
    pub batch: EntrySeq,
    /// Points moved, always `> 0`.
    pub points: Points,
}

/// The order an accrual was earned on; needed to reverse points on refund.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRef {
    /// The commerce system's order id.
    pub order_id: String,
    /// The order amount the points were earned on; refunds are a fraction of it.
    /// Must be `> 0`.
    pub amount: Money,
}

/// A request to change the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerRequest {
    /// Retry key; see the [module docs](self#idempotency).
    pub key: IdempotencyKey,
    /// When the change takes effect. Must not be earlier than the last entry's time.
    pub at: DateTime<Utc>,
    /// What to do.
    pub command: LedgerCommand,
}

/// The ledger operations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerCommand {
    /// Credit `points` (`> 0`) as a new batch, optionally tied to an order.
    Accrue {
        /// Points earned, `> 0`.
        points: Points,
        /// When the batch expires; `None` never expires. Must be after `at`.
        expires_at: Option<DateTime<Utc>>,
        /// The order the points were earned on, if any.
        order: Option<OrderRef>,
    },
    /// Spend `points` (`> 0`), oldest unexpired batch first.
    Redeem {
        /// Points to spend, `> 0`.
        points: Points,
        /// What the points were spent on (reward id, order id…), for statements.
        reference: String,
    },
    /// Undo a redemption, returning its points to the batches they came from.
    ///
    /// The batches keep their original expiry (cancelling cannot extend a
    /// batch's life); points returned to a batch that has meanwhile expired
    /// are unavailable and written off by the next `ExpireDue`. If a refund
    /// left a clawback outstanding on a batch, returned points settle it first.
    CancelRedemption {
        /// The idempotency key of the redemption to cancel.
        redemption_key: IdempotencyKey,
    },
    /// Reverse the points an order earned in proportion to a refund.
    ///
    /// Refunds are cumulative: after refunds totalling `R` of an order of
    /// amount `T`, each of the order's batches has had
    /// `floor(earned × R / T)` points reversed in total. Rounding is down, in
    /// the customer's favour, and computed on the running total so that
    /// partial refunds never drift (two 50 % refunds reverse exactly 100 %).
    ///
    /// Shortfall policy: points are taken only from the order's own batches'
    /// remaining points, so the balance never goes negative. Points already
    /// spent or expired cannot be taken back; that shortfall is recorded on the
    /// entry (`unrecovered`) and as an outstanding clawback on the batch, which
    /// is settled first if points later flow back into that batch (a cancelled
    /// redemption). Otherwise it is written off — it never becomes negative
    /// balance or debt against other batches.
    ReverseOrder {
        /// The order being refunded; must have accrued points in this ledger.
        order_id: String,
        /// This refund's amount, `> 0`, in the order's currency. Refunds in
        /// total may not exceed the order amount.
        refund: Money,
    },
    /// A manual correction with a mandatory human-readable reason.
    ///
    /// Positive points create a new batch (with `expires_at`); negative points
    /// are debited like a redemption (FIFO) and refused if larger than the
    /// available balance.
    Adjust {
        /// Non-zero signed points.
        points: Points,
        /// Why; must not be blank.
        reason: String,
        /// Expiry of the batch created by a positive adjustment; ignored for negative ones.
        expires_at: Option<DateTime<Utc>>,
    },
    /// Write off the remaining points of every batch expired at the request time.
    ///
    /// Produces one entry per batch, oldest first, or none when nothing is due.
    /// A key that produced no entries leaves no trace, which is harmless:
    /// expiry is naturally idempotent.
    ExpireDue,
}

/// A recorded change. Persist every field; [`PointsLedger::from_entries`]
/// rebuilds the state from them alone (the recorded draws are replayed, never
/// recomputed, so later policy changes cannot rewrite history).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Position in the ledger; contiguous from 0.
    pub seq: EntrySeq,
    /// Idempotency key of the command that produced this entry.
    pub key: IdempotencyKey,
    /// [`LedgerCommand::fingerprint`] of that command.
    pub fingerprint: u64,
    /// Effective time.
    pub at: DateTime<Utc>,
    /// What changed.
    pub change: EntryChange,
}

/// The change an entry records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryChange {
    /// A new batch of `points`.
    Accrued {
        /// Points in the batch, `> 0`.
        points: Points,
        /// Batch expiry.
        expires_at: Option<DateTime<Utc>>,
        /// Order the points were earned on.
        order: Option<OrderRef>,
    },
    /// Points spent.
    Redeemed {
        /// Total spent; equals the sum of `draws`.
        points: Points,
        /// Caller's reference.
        reference: String,
        /// Batches drawn from, oldest first.
        draws: Vec<BatchDraw>,
    },
    /// A redemption undone.
    RedemptionCancelled {
        /// The `Redeemed` entry being cancelled.
        redemption: EntrySeq,
        /// Points made available again, per batch.
        restored: Vec<BatchDraw>,
        /// Points that settled an outstanding refund clawback instead.
        settled_clawback: Vec<BatchDraw>,
    },
    /// A batch's remaining points written off at expiry.
    Expired {
        /// The batch.
        batch: EntrySeq,
        /// Points written off, `> 0`.
        points: Points,
    },
    /// Points reversed because of a refund.
    Reversed {
        /// The refunded order.
        order_id: String,
        /// This refund's amount.
        refund: Money,
        /// Points actually taken back, per batch.
        draws: Vec<BatchDraw>,
        /// Points that should have been reversed but were already spent or expired.
        unrecovered: Vec<BatchDraw>,
    },
    /// A manual correction.
    Adjusted {
        /// Signed points requested.
        points: Points,
        /// Why.
        reason: String,
        /// Expiry of the new batch (positive adjustments only).
        expires_at: Option<DateTime<Utc>>,
        /// Batches debited (negative adjustments only).
        draws: Vec<BatchDraw>,
    },
    /// This profile was merged into `into`: every batch's remaining points left with its
    /// batch (see [`MergedIn`](Self::MergedIn)). The ledger accepts no new commands after it.
    MergedOut {
        /// The survivor's profile id.
        into: String,
        /// Remaining points taken from each batch (batches with points only).
        draws: Vec<BatchDraw>,
    },
    /// A batch of a profile merged into this one, moved with its history (earned time,
    /// expiry, refund state, order), so FIFO spending, expiry and refunds treat it as if it
    /// had been earned here.
    MergedIn {
        /// The loser's profile id.
        from: String,
        /// The batch as it stood in the loser's ledger.
        batch: MovedBatch,
    },
}

/// A batch as moved by a profile merge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedBatch {
    /// The batch id in the loser's ledger.
    pub from_batch: EntrySeq,
    /// When it was originally earned (orders FIFO spending in the survivor's ledger).
    pub earned_at: DateTime<Utc>,
    /// Its original expiry.
    pub expires_at: Option<DateTime<Utc>>,
    /// Points originally credited.
    pub earned: Points,
    /// Points still in it, now credited to the survivor.
    pub remaining: Points,
    /// Points already reversed by refunds.
    pub reversed: Points,
    /// Refund clawback still outstanding.
    pub owed: Points,
    /// The order it was earned on, with the order's amount.
    pub order: Option<OrderRef>,
    /// The order's refunds so far (minor units), so later refunds stay proportional.
    pub order_refunded_minor: i64,
    /// Whether it was earned (an accrual) rather than a manual adjustment: tiers that qualify
    /// by points earned count it.
    pub accrued: bool,
}

impl EntryChange {
    /// The change to the book balance (sum of remaining points over all
    /// batches, expired or not). Summing `book_delta` over all entries gives
    /// [`PointsLedger::book_balance`].
    pub fn book_delta(&self) -> Points {
        let sum = |draws: &[BatchDraw]| draws.iter().map(|d| d.points).sum::<Points>();
        match self {
            EntryChange::Accrued { points, .. } => *points,
            EntryChange::Redeemed { points, .. } => -*points,
            EntryChange::RedemptionCancelled { restored, .. } => sum(restored),
            EntryChange::Expired { points, .. } => -*points,
            EntryChange::Reversed { draws, .. } => -sum(draws),
            EntryChange::Adjusted { points, draws, .. } => {
                if *points > 0 {
                    *points
                } else {
                    -sum(draws)
                }
            }
            EntryChange::MergedOut { draws, .. } => -sum(draws),
            EntryChange::MergedIn { batch, .. } => batch.remaining,
        }
    }
}

/// Why a command was refused, or why stored entries are inconsistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// A points quantity was zero or had the wrong sign.
    #[error("invalid points quantity {points}: {expected}")]
    InvalidPoints {
        /// The value given.
        points: Points,
        /// What was expected.
        expected: &'static str,
    },
    /// Spending more than is available.
    #[error("insufficient balance: requested {requested} points, {available} available")]
    InsufficientBalance {
        /// Points asked for.
        requested: Points,
        /// Points available at the request time.
        available: Points,
    },
    /// The key was used before with a different payload.
    #[error("idempotency key {key:?} was already used for a different command")]
    IdempotencyConflict {
        /// The reused key.
        key: IdempotencyKey,
    },
    /// The profile was merged into another; its points and history moved there, so commands
    /// must name the survivor.
    #[error("the profile was merged into {into}")]
    MergedAway {
        /// The survivor.
        into: String,
    },
    /// No redemption with that key.
    #[error("no redemption with idempotency key {key:?}")]
    UnknownRedemption {
        /// The key given.
        key: IdempotencyKey,
    },
    /// The redemption was already cancelled.
    #[error("redemption {key:?} is already cancelled")]
    RedemptionAlreadyCancelled {
        /// The redemption's key.
        key: IdempotencyKey,
    },
    /// No accrual for that order.
    #[error("no points were accrued for order {order_id:?}")]
    UnknownOrder {
        /// The order id given.
        order_id: String,
    },
    /// Refunds would exceed the order amount.
    #[error(
        "refund of {refund_minor} would bring order {order_id:?} refunds to more than its amount {order_minor} (already refunded {refunded_minor})"
    )]
    RefundExceedsOrder {
        /// The order.
        order_id: String,
        /// This refund.
        refund_minor: i64,
        /// Refunded before.
        refunded_minor: i64,
        /// Order amount.
        order_minor: i64,
    },
    /// A money amount was in the wrong currency.
    #[error("currency mismatch: expected {expected}, got {actual}")]
    CurrencyMismatch {
        /// Currency required.
        expected: CurrencyCode,
        /// Currency given.
        actual: CurrencyCode,
    },
    /// A money amount must be positive.
    #[error("amount must be positive, got {amount_minor}")]
    NonPositiveAmount {
        /// The amount given.
        amount_minor: i64,
    },
    /// A second accrual for an order states a different order amount.
    #[error("order {order_id:?} was accrued with amount {recorded}, now {given}")]
    OrderAmountMismatch {
        /// The order.
        order_id: String,
        /// Amount on record.
        recorded: Money,
        /// Amount given now.
        given: Money,
    },
    /// An adjustment without a reason.
    #[error("a manual adjustment needs a non-blank reason")]
    MissingReason,
    /// A batch's expiry is not after its earning time.
    #[error("expiry {expires_at} is not after {at}")]
    ExpiryNotAfterEarning {
        /// The command time.
        at: DateTime<Utc>,
        /// The expiry given.
        expires_at: DateTime<Utc>,
    },
    /// The ledger is append-only in time order.
    #[error("command at {at} is earlier than the last entry at {last}")]
    OutOfOrder {
        /// Time of the last entry.
        last: DateTime<Utc>,
        /// Time given.
        at: DateTime<Utc>,
    },
    /// Stored entries cannot be replayed (gaps, unknown batches, negative remainders).
    #[error("ledger entry {seq:?} is inconsistent: {detail}")]
    Corrupt {
        /// The offending entry.
        seq: EntrySeq,
        /// What is wrong.
        detail: String,
    },
}

impl LedgerCommand {
    /// A stable 64-bit FNV-1a fingerprint of the command payload, used to tell
    /// a retry (same key, same payload) from a conflict (same key, different
    /// payload). Stable across builds and platforms, so it can be persisted.
    pub fn fingerprint(&self) -> u64 {
        let mut f = Fnv::new();
        match self {
            LedgerCommand::Accrue {
                points,
                expires_at,
                order,
            } => {
                f.u8(1);
                f.i64(*points);
                f.time(expires_at.as_ref());
                match order {
                    None => f.u8(0),
                    Some(o) => {
                        f.u8(1);
                        f.str(&o.order_id);
                        f.money(&o.amount);
                    }
                }
            }
            LedgerCommand::Redeem { points, reference } => {
                f.u8(2);
                f.i64(*points);
                f.str(reference);
            }
            LedgerCommand::CancelRedemption { redemption_key } => {
                f.u8(3);
                f.str(&redemption_key.0);
            }
            LedgerCommand::ReverseOrder { order_id, refund } => {
                f.u8(4);
                f.str(order_id);
                f.money(refund);
            }
            LedgerCommand::Adjust {
                points,
                reason,
                expires_at,
            } => {
                f.u8(5);
                f.i64(*points);
                f.str(reason);
                f.time(expires_at.as_ref());
            }
            LedgerCommand::ExpireDue => f.u8(6),
        }
        f.0
    }
}

struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    fn i64(&mut self, v: i64) {
        self.bytes(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.bytes(&(s.len() as u64).to_le_bytes());
        self.bytes(s.as_bytes());
    }
    fn money(&mut self, m: &Money) {
        self.i64(m.amount_minor);
        self.str(m.currency.as_str());
    }
    fn time(&mut self, t: Option<&DateTime<Utc>>) {
        match t {
            None => self.u8(0),
            Some(t) => {
                self.u8(1);
                self.i64(t.timestamp());
                self.i64(i64::from(t.timestamp_subsec_nanos()));
            }
        }
    }
}

/// A batch of points as seen at some instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchView {
    /// The batch id (the creating entry's sequence number).
    pub batch: EntrySeq,
    /// When it was earned.
    pub earned_at: DateTime<Utc>,
    /// When it expires, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// Points originally credited.
    pub earned: Points,
    /// Points still in the batch (0 if expired and written off).
    pub remaining: Points,
    /// Whether the batch is expired at the instant asked about.
    pub expired: bool,
    /// Refund clawback still outstanding on this batch.
    pub clawback_owed: Points,
    /// The order it was earned on, if any.
    pub order_id: Option<String>,
}

#[derive(Debug, Clone)]
struct Batch {
    earned_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    earned: Points,
    remaining: Points,
    /// Points reversed by refunds, recovered or not.
    reversed: Points,
    /// Reversal shortfall still outstanding.
    owed: Points,
    order_id: Option<String>,
    /// Created by an accrual (directly or moved by a merge), not a manual adjustment.
    accrued: bool,
}

impl Batch {
    fn expired_at(&self, t: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|e| e <= t)
    }
}

#[derive(Debug, Clone)]
struct KeyRecord {
    fingerprint: u64,
    first: usize,
    count: usize,
}

#[derive(Debug, Clone)]
struct RedemptionRecord {
    draws: Vec<BatchDraw>,
    cancelled: bool,
}

#[derive(Debug, Clone)]
struct OrderRecord {
    amount: Money,
    batches: Vec<EntrySeq>,
    refunded_minor: i64,
}

/// One customer's points ledger: the entries plus state derived from them.
///
/// Build it with [`PointsLedger::new`] or [`PointsLedger::from_entries`];
/// compute changes with [`apply`](Self::apply) (pure) and append them with
/// [`record`](Self::record) once persisted.
#[derive(Debug, Clone, Default)]
pub struct PointsLedger {
    entries: Vec<LedgerEntry>,
    batches: BTreeMap<EntrySeq, Batch>,
    keys: HashMap<IdempotencyKey, KeyRecord>,
    redemptions: BTreeMap<EntrySeq, RedemptionRecord>,
    orders: HashMap<String, OrderRecord>,
    /// Set by a `MergedOut` entry: the survivor this ledger was merged into.
    merged_into: Option<String>,
}

impl PointsLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds a ledger from stored entries (in `seq` order).
    ///
    /// Fails with [`LedgerError::Corrupt`] if the entries are not contiguous
    /// or would drive any batch negative.
    pub fn from_entries(
        entries: impl IntoIterator<Item = LedgerEntry>,
    ) -> Result<Self, LedgerError> {
        let mut ledger = Self::new();
        ledger.record(entries)?;
        Ok(ledger)
    }

    /// All entries, oldest first.
    pub fn entries(&self) -> &[LedgerEntry] {
        &self.entries
    }

    /// The sequence number the next entry will get.
    pub fn next_seq(&self) -> EntrySeq {
        EntrySeq(self.entries.len() as u64)
    }

    /// Points available to spend at `at`: remaining points in batches not
    /// expired at `at`, given the entries recorded so far. Never negative.
    pub fn balance(&self, at: DateTime<Utc>) -> Points {
        self.batches
            .values()
            .filter(|b| !b.expired_at(at))
            .map(|b| b.remaining)
            .sum()
    }

    /// Remaining points over all batches, including expired batches not yet
    /// written off by an `Expired` entry. Equals the sum of
    /// [`EntryChange::book_delta`] over all entries.
    pub fn book_balance(&self) -> Points {
        self.batches.values().map(|b| b.remaining).sum()
    }

    /// The batches with their state, oldest first, marking which are expired at `at`.
    pub fn batches(&self, at: DateTime<Utc>) -> Vec<BatchView> {
        self.oldest_first()
            .into_iter()
            .map(|(seq, b)| BatchView {
                batch: *seq,
                earned_at: b.earned_at,
                expires_at: b.expires_at,
                earned: b.earned,
                remaining: b.remaining,
                expired: b.expired_at(at),
                clawback_owed: b.owed,
                order_id: b.order_id.clone(),
            })
            .collect()
    }

    /// The ledger as it stood at `at`: only entries with `entry.at <= at`.
    ///
    /// Combine with [`balance`](Self::balance) / [`batches`](Self::batches)
    /// at the same instant for historical statements.
    pub fn as_of(&self, at: DateTime<Utc>) -> PointsLedger {
        let mut ledger = Self::new();
        let prefix = self.entries.partition_point(|e| e.at <= at);
        // The prefix of a consistent ledger is consistent.
        if ledger
            .record(self.entries[..prefix].iter().cloned())
            .is_err()
        {
            return Self::new();
        }
        ledger
    }

    /// Computes the entries `request` would append, without changing the ledger.
    ///
    /// * Same key and same payload as an earlier command: returns that
    ///   command's original entries (nothing new to persist — the caller can
    ///   tell because their `seq` is below [`next_seq`](Self::next_seq)).
    /// * Same key, different payload: [`LedgerError::IdempotencyConflict`].
    /// * Otherwise the new entries, numbered from `next_seq()`.
    pub fn apply(&self, request: &LedgerRequest) -> Result<Vec<LedgerEntry>, LedgerError> {
        let fingerprint = request.command.fingerprint();
        if let Some(rec) = self.keys.get(&request.key) {
            if rec.fingerprint != fingerprint {
                return Err(LedgerError::IdempotencyConflict {
                    key: request.key.clone(),
                });
            }
            return Ok(self.entries[rec.first..rec.first + rec.count].to_vec());
        }
        if let Some(into) = &self.merged_into {
            return Err(LedgerError::MergedAway { into: into.clone() });
        }
        if let Some(last) = self.entries.last()
            && request.at < last.at
        {
            return Err(LedgerError::OutOfOrder {
                last: last.at,
                at: request.at,
            });
        }
        let at = request.at;
        let changes = match &request.command {
            LedgerCommand::Accrue {
                points,
                expires_at,
                order,
            } => vec![self.accrue(at, *points, *expires_at, order.as_ref())?],
            LedgerCommand::Redeem { points, reference } => {
                require_positive(*points)?;
                let draws = self.draw_fifo(at, *points)?;
                vec![EntryChange::Redeemed {
                    points: *points,
                    reference: reference.clone(),
                    draws,
                }]
            }
            LedgerCommand::CancelRedemption { redemption_key } => {
                vec![self.cancel_redemption(redemption_key)?]
            }
            LedgerCommand::ReverseOrder { order_id, refund } => {
                vec![self.reverse_order(order_id, refund)?]
            }
            LedgerCommand::Adjust {
                points,
                reason,
                expires_at,
            } => vec![self.adjust(at, *points, reason, *expires_at)?],
            LedgerCommand::ExpireDue => self
                .oldest_first()
                .into_iter()
                .filter(|(_, b)| b.expired_at(at) && b.remaining > 0)
                .map(|(seq, b)| EntryChange::Expired {
                    batch: *seq,
                    points: b.remaining,
                })
                .collect(),
        };
        let first = self.entries.len() as u64;
        Ok(changes
            .into_iter()
            .enumerate()
            .map(|(i, change)| LedgerEntry {
                seq: EntrySeq(first + i as u64),
                key: request.key.clone(),
                fingerprint,
                at,
                change,
            })
            .collect())
    }

    /// Applies `request` and records the result; returns the entries
    /// (the original ones for an idempotent replay). Convenience for tests and
    /// in-memory use; a store calls [`apply`](Self::apply), persists, then
    /// [`record`](Self::record)s.
    pub fn execute(&mut self, request: &LedgerRequest) -> Result<Vec<LedgerEntry>, LedgerError> {
        let entries = self.apply(request)?;
        let fresh: Vec<LedgerEntry> = entries
            .iter()
            .filter(|e| e.seq >= self.next_seq())
            .cloned()
            .collect();
        self.record(fresh)?;
        Ok(entries)
    }

    /// Appends already-computed entries (e.g. after persisting them), updating
    /// derived state. Entries must continue the sequence without gaps.
    ///
    /// On error the ledger may contain the entries before the offending one.
    pub fn record(
        &mut self,
        entries: impl IntoIterator<Item = LedgerEntry>,
    ) -> Result<(), LedgerError> {
        for entry in entries {
            self.record_one(entry)?;
        }
        Ok(())
    }

    fn record_one(&mut self, entry: LedgerEntry) -> Result<(), LedgerError> {
        let seq = entry.seq;
        let corrupt = |detail: &str| LedgerError::Corrupt {
            seq,
            detail: detail.to_owned(),
        };
        if seq != self.next_seq() {
            return Err(corrupt("sequence gap or duplicate"));
        }
        let index = self.entries.len();
        match &entry.change {
            EntryChange::Accrued {
                points,
                expires_at,
                order,
            } => {
                if *points <= 0 {
                    return Err(corrupt("non-positive accrual"));
                }
                self.batches.insert(
                    seq,
                    Batch {
                        earned_at: entry.at,
                        expires_at: *expires_at,
                        earned: *points,
                        remaining: *points,
                        reversed: 0,
                        owed: 0,
                        order_id: order.as_ref().map(|o| o.order_id.clone()),
                        accrued: true,
                    },
                );
                if let Some(order) = order {
                    self.orders
                        .entry(order.order_id.clone())
                        .or_insert_with(|| OrderRecord {
                            amount: order.amount,
                            batches: Vec::new(),
                            refunded_minor: 0,
                        })
                        .batches
                        .push(seq);
                }
            }
            EntryChange::Redeemed { draws, points, .. } => {
                if draws.iter().map(|d| d.points).sum::<Points>() != *points {
                    return Err(corrupt("draws do not add up to the redeemed points"));
                }
                self.take(draws, seq)?;
                self.redemptions.insert(
                    seq,
                    RedemptionRecord {
                        draws: draws.clone(),
                        cancelled: false,
                    },
                );
            }
            EntryChange::RedemptionCancelled {
                redemption,
                restored,
                settled_clawback,
            } => {
                let rec = self
                    .redemptions
                    .get_mut(redemption)
                    .ok_or_else(|| corrupt("cancels an unknown redemption"))?;
                if rec.cancelled {
                    return Err(corrupt("cancels a redemption twice"));
                }
                rec.cancelled = true;
                for d in restored {
                    let b = self
                        .batches
                        .get_mut(&d.batch)
                        .ok_or_else(|| corrupt("unknown batch"))?;
                    b.remaining += d.points;
                }
                for d in settled_clawback {
                    let b = self
                        .batches
                        .get_mut(&d.batch)
                        .ok_or_else(|| corrupt("unknown batch"))?;
                    b.owed -= d.points;
                    if b.owed < 0 {
                        return Err(corrupt("clawback settled twice"));
                    }
                }
            }
            EntryChange::Expired { batch, points } => {
                self.take(
                    &[BatchDraw {
                        batch: *batch,
                        points: *points,
                    }],
                    seq,
                )?;
            }
            EntryChange::Reversed {
                order_id,
                refund,
                draws,
                unrecovered,
            } => {
                self.take(draws, seq)?;
                for d in draws {
                    if let Some(b) = self.batches.get_mut(&d.batch) {
                        b.reversed += d.points;
                    }
                }
                for d in unrecovered {
                    let b = self
                        .batches
                        .get_mut(&d.batch)
                        .ok_or_else(|| corrupt("unknown batch"))?;
                    b.reversed += d.points;
                    b.owed += d.points;
                }
                let order = self
                    .orders
                    .get_mut(order_id)
                    .ok_or_else(|| corrupt("reverses an unknown order"))?;
                order.refunded_minor += refund.amount_minor;
            }
            EntryChange::Adjusted {
                points,
                expires_at,
                draws,
                ..
            } => {
                if *points > 0 {
                    self.batches.insert(
                        seq,
                        Batch {
                            earned_at: entry.at,
                            expires_at: *expires_at,
                            earned: *points,
                            remaining: *points,
                            reversed: 0,
                            owed: 0,
                            order_id: None,
                            accrued: false,
                        },
                    );
                } else {
                    self.take(draws, seq)?;
                }
            }
            EntryChange::MergedOut { into, draws } => {
                if self.merged_into.is_some() {
                    return Err(corrupt("merged away twice"));
                }
                self.take(draws, seq)?;
                self.merged_into = Some(into.clone());
            }
            EntryChange::MergedIn { batch, .. } => {
                if batch.remaining < 0 || batch.owed < 0 || batch.reversed < 0 {
                    return Err(corrupt("moved batch with negative points"));
                }
                self.batches.insert(
                    seq,
                    Batch {
                        earned_at: batch.earned_at,
                        expires_at: batch.expires_at,
                        earned: batch.earned,
                        remaining: batch.remaining,
                        reversed: batch.reversed,
                        owed: batch.owed,
                        order_id: batch.order.as_ref().map(|o| o.order_id.clone()),
                        accrued: batch.accrued,
                    },
                );
                if let Some(order) = &batch.order {
                    let rec = self
                        .orders
                        .entry(order.order_id.clone())
                        .or_insert_with(|| OrderRecord {
                            amount: order.amount,
                            batches: Vec::new(),
                            refunded_minor: 0,
                        });
                    rec.batches.push(seq);
                    rec.refunded_minor = rec.refunded_minor.max(batch.order_refunded_minor);
                }
            }
        }
        match self.keys.get_mut(&entry.key) {
            Some(rec) if rec.first + rec.count == index => rec.count += 1,
            Some(_) => return Err(corrupt("idempotency key reused by a later command")),
            None => {
                self.keys.insert(
                    entry.key.clone(),
                    KeyRecord {
                        fingerprint: entry.fingerprint,
                        first: index,
                        count: 1,
                    },
                );
            }
        }
        self.entries.push(entry);
        Ok(())
    }

    /// Batches by earning time, then batch id. Without merges that is batch-id order (entries
    /// are in time order); a merge brings in batches earned earlier, which must still be
    /// spent and expired first.
    fn oldest_first(&self) -> Vec<(&EntrySeq, &Batch)> {
        let mut v: Vec<(&EntrySeq, &Batch)> = self.batches.iter().collect();
        v.sort_by_key(|(seq, b)| (b.earned_at, **seq));
        v
    }

    /// The survivor this ledger was merged into, if it was.
    pub fn merged_into(&self) -> Option<&str> {
        self.merged_into.as_deref()
    }

    /// Whether an accrual on `order_id` is in this ledger (earned here or moved by a merge).
    pub fn has_order(&self, order_id: &str) -> bool {
        self.orders.contains_key(order_id)
    }

    /// Points earned (accrued batches, net of refund reversals) per batch with their earning
    /// time, for tiers that qualify by points earned: merged-in batches count at the time
    /// they were originally earned. Entries are read by the caller for the rest.
    pub fn moved_in_earnings(&self) -> Vec<(DateTime<Utc>, Points)> {
        self.entries
            .iter()
            .filter_map(|e| match &e.change {
                EntryChange::MergedIn { batch, .. } if batch.accrued => {
                    Some((batch.earned_at, batch.earned - batch.reversed))
                }
                _ => None,
            })
            .collect()
    }

    /// The entries that merge this (the loser's) ledger into `into` under `key` at `at`: one
    /// `MergedOut` entry taking every batch's remaining points (expired ones too, so the book
    /// balance ends at 0), and the batches to move, oldest first. Every batch is moved, spent
    /// ones included, so refunds of their orders and tier qualification follow them.
    ///
    /// A key applied before returns no entries (a replay moves nothing).
    ///
    /// # Errors
    /// [`LedgerError::MergedAway`] if the ledger was merged under another key;
    /// [`LedgerError::OutOfOrder`] if `at` is before the last entry.
    pub fn merge_out(
        &self,
        key: &IdempotencyKey,
        at: DateTime<Utc>,
        into: &str,
    ) -> Result<(Vec<LedgerEntry>, Vec<MovedBatch>), LedgerError> {
        let fingerprint = merge_fingerprint(9, into);
        if let Some(rec) = self.keys.get(key) {
            if rec.fingerprint != fingerprint {
                return Err(LedgerError::IdempotencyConflict { key: key.clone() });
            }
            return Ok((Vec::new(), Vec::new()));
        }
        if let Some(into) = &self.merged_into {
            return Err(LedgerError::MergedAway { into: into.clone() });
        }
        if let Some(last) = self.entries.last()
            && at < last.at
        {
            return Err(LedgerError::OutOfOrder { last: last.at, at });
        }
        let mut draws = Vec::new();
        let mut moved = Vec::new();
        for (seq, b) in self.oldest_first() {
            if b.remaining > 0 {
                draws.push(BatchDraw {
                    batch: *seq,
                    points: b.remaining,
                });
            }
            let order = b.order_id.as_ref().and_then(|id| {
                self.orders.get(id).map(|o| {
                    (
                        OrderRef {
                            order_id: id.clone(),
                            amount: o.amount,
                        },
                        o.refunded_minor,
                    )
                })
            });
            moved.push(MovedBatch {
                from_batch: *seq,
                earned_at: b.earned_at,
                expires_at: b.expires_at,
                earned: b.earned,
                remaining: b.remaining,
                reversed: b.reversed,
                owed: b.owed,
                order_refunded_minor: order.as_ref().map_or(0, |o| o.1),
                order: order.map(|o| o.0),
                accrued: b.accrued,
            });
        }
        let entry = LedgerEntry {
            seq: self.next_seq(),
            key: key.clone(),
            fingerprint,
            at,
            change: EntryChange::MergedOut {
                into: into.to_owned(),
                draws,
            },
        };
        Ok((vec![entry], moved))
    }

    /// The entries that credit `moved` (from [`merge_out`](Self::merge_out) of `from`) to
    /// this (the survivor's) ledger under `key` at `at`, one `MergedIn` entry per batch. A key
    /// applied before returns no entries. `at` is raised to the last entry's time if earlier.
    pub fn merge_in(
        &self,
        key: &IdempotencyKey,
        at: DateTime<Utc>,
        from: &str,
        moved: &[MovedBatch],
    ) -> Vec<LedgerEntry> {
        if self.keys.contains_key(key) {
            return Vec::new();
        }
        let at = self.entries.last().map_or(at, |l| l.at.max(at));
        let first = self.entries.len() as u64;
        moved
            .iter()
            .enumerate()
            .map(|(i, b)| LedgerEntry {
                seq: EntrySeq(first + i as u64),
                key: key.clone(),
                fingerprint: merge_fingerprint(10, from),
                at,
                change: EntryChange::MergedIn {
                    from: from.to_owned(),
                    batch: b.clone(),
                },
            })
            .collect()
    }

    fn take(&mut self, draws: &[BatchDraw], seq: EntrySeq) -> Result<(), LedgerError> {
        for d in draws {
            let b = self
                .batches
                .get_mut(&d.batch)
                .ok_or_else(|| LedgerError::Corrupt {
                    seq,
                    detail: format!("unknown batch {:?}", d.batch),
                })?;
            if d.points <= 0 || b.remaining < d.points {
                return Err(LedgerError::Corrupt {
                    seq,
                    detail: format!("draw of {} from batch {:?} is invalid", d.points, d.batch),
                });
            }
            b.remaining -= d.points;
        }
        Ok(())
    }

    fn accrue(
        &self,
        at: DateTime<Utc>,
        points: Points,
        expires_at: Option<DateTime<Utc>>,
        order: Option<&OrderRef>,
    ) -> Result<EntryChange, LedgerError> {
        require_positive(points)?;
        check_expiry(at, expires_at)?;
        if let Some(order) = order {
            if order.amount.amount_minor <= 0 {
                return Err(LedgerError::NonPositiveAmount {
                    amount_minor: order.amount.amount_minor,
                });
            }
            if let Some(rec) = self.orders.get(&order.order_id)
                && rec.amount != order.amount
            {
                return Err(LedgerError::OrderAmountMismatch {
                    order_id: order.order_id.clone(),
                    recorded: rec.amount,
                    given: order.amount,
                });
            }
        }
        Ok(EntryChange::Accrued {
            points,
            expires_at,
            order: order.cloned(),
        })
    }

    fn draw_fifo(&self, at: DateTime<Utc>, points: Points) -> Result<Vec<BatchDraw>, LedgerError> {
        let available = self.balance(at);
        if points > available {
            return Err(LedgerError::InsufficientBalance {
                requested: points,
                available,
            });
        }
        let mut left = points;
        let mut draws = Vec::new();
        for (seq, b) in self.oldest_first() {
            if left == 0 {
                break;
            }
            if b.remaining == 0 || b.expired_at(at) {
                continue;
            }
            let take = left.min(b.remaining);
            draws.push(BatchDraw {
                batch: *seq,
                points: take,
            });
            left -= take;
        }
        Ok(draws)
    }

    fn cancel_redemption(&self, key: &IdempotencyKey) -> Result<EntryChange, LedgerError> {
        let unknown = || LedgerError::UnknownRedemption { key: key.clone() };
        let rec = self.keys.get(key).ok_or_else(unknown)?;
        let seq = self.entries[rec.first].seq;
        let redemption = self.redemptions.get(&seq).ok_or_else(unknown)?;
        if redemption.cancelled {
            return Err(LedgerError::RedemptionAlreadyCancelled { key: key.clone() });
        }
        let mut restored = Vec::new();
        let mut settled = Vec::new();
        for d in &redemption.draws {
            let owed = self.batches.get(&d.batch).map_or(0, |b| b.owed);
            let settle = d.points.min(owed);
            if settle > 0 {
                settled.push(BatchDraw {
                    batch: d.batch,
                    points: settle,
                });
            }
            if d.points > settle {
                restored.push(BatchDraw {
                    batch: d.batch,
                    points: d.points - settle,
                });
            }
        }
        Ok(EntryChange::RedemptionCancelled {
            redemption: seq,
            restored,
            settled_clawback: settled,
        })
    }

    fn reverse_order(&self, order_id: &str, refund: &Money) -> Result<EntryChange, LedgerError> {
        let order = self
            .orders
            .get(order_id)
            .ok_or_else(|| LedgerError::UnknownOrder {
                order_id: order_id.to_owned(),
            })?;
        if refund.currency != order.amount.currency {
            return Err(LedgerError::CurrencyMismatch {
                expected: order.amount.currency,
                actual: refund.currency,
            });
        }
        if refund.amount_minor <= 0 {
            return Err(LedgerError::NonPositiveAmount {
                amount_minor: refund.amount_minor,
            });
        }
        let total = order.amount.amount_minor;
        let refunded = order.refunded_minor.saturating_add(refund.amount_minor);
        if refunded > total {
            return Err(LedgerError::RefundExceedsOrder {
                order_id: order_id.to_owned(),
                refund_minor: refund.amount_minor,
                refunded_minor: order.refunded_minor,
                order_minor: total,
            });
        }
        let mut draws = Vec::new();
        let mut unrecovered = Vec::new();
        for seq in &order.batches {
            let Some(b) = self.batches.get(seq) else {
                continue;
            };
            let target = proportion_floor(b.earned, refunded, total);
            let due = target - b.reversed;
            if due <= 0 {
                continue;
            }
            let take = due.min(b.remaining);
            if take > 0 {
                draws.push(BatchDraw {
                    batch: *seq,
                    points: take,
                });
            }
            if due > take {
                unrecovered.push(BatchDraw {
                    batch: *seq,
                    points: due - take,
                });
            }
        }
        Ok(EntryChange::Reversed {
            order_id: order_id.to_owned(),
            refund: *refund,
            draws,
            unrecovered,
        })
    }

    fn adjust(
        &self,
        at: DateTime<Utc>,
        points: Points,
        reason: &str,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<EntryChange, LedgerError> {
        if reason.trim().is_empty() {
            return Err(LedgerError::MissingReason);
        }
        if points == 0 {
            return Err(LedgerError::InvalidPoints {
                points,
                expected: "a non-zero adjustment",
            });
        }
        if points > 0 {
            check_expiry(at, expires_at)?;
            Ok(EntryChange::Adjusted {
                points,
                reason: reason.to_owned(),
                expires_at,
                draws: Vec::new(),
            })
        } else {
            let draws = self.draw_fifo(at, points.checked_neg().unwrap_or(Points::MAX))?;
            Ok(EntryChange::Adjusted {
                points,
                reason: reason.to_owned(),
                expires_at: None,
                draws,
            })
        }
    }
}

fn merge_fingerprint(tag: u8, profile: &str) -> u64 {
    let mut f = Fnv::new();
    f.u8(tag);
    f.str(profile);
    f.0
}

fn require_positive(points: Points) -> Result<(), LedgerError> {
    if points <= 0 {
        return Err(LedgerError::InvalidPoints {
            points,
            expected: "a positive number of points",
        });
    }
    Ok(())
}

fn check_expiry(at: DateTime<Utc>, expires_at: Option<DateTime<Utc>>) -> Result<(), LedgerError> {
    match expires_at {
        Some(e) if e <= at => Err(LedgerError::ExpiryNotAfterEarning { at, expires_at: e }),
        _ => Ok(()),
    }
}

/// `floor(points × numerator / denominator)` without overflow; `denominator > 0`.
fn proportion_floor(points: Points, numerator: i64, denominator: i64) -> Points {
    let v = i128::from(points) * i128::from(numerator) / i128::from(denominator);
    Points::try_from(v).unwrap_or(Points::MAX)
}

/// The entry with everything that could identify the person removed, for erasure: the
/// idempotency key, order ids, redemption references and adjustment reasons are blanked;
/// sequence, time, points, draws and expiries stay, so the points liability and the ledger's
/// arithmetic remain auditable. Idempotent.
pub fn anonymise_entry(entry: &LedgerEntry) -> LedgerEntry {
    let mut e = entry.clone();
    e.key = IdempotencyKey::new("");
    match &mut e.change {
        EntryChange::Accrued { order, .. } => {
            if let Some(o) = order {
                o.order_id.clear();
            }
        }
        EntryChange::Redeemed { reference, .. } => reference.clear(),
        EntryChange::Reversed { order_id, .. } => order_id.clear(),
        EntryChange::Adjusted { reason, .. } => reason.clear(),
        EntryChange::MergedOut { into, .. } => into.clear(),
        EntryChange::MergedIn { from, batch } => {
            from.clear();
            if let Some(o) = &mut batch.order {
                o.order_id.clear();
            }
        }
        EntryChange::RedemptionCancelled { .. } | EntryChange::Expired { .. } => {}
    }
    e
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {

    #[test]
    fn anonymised_entries_keep_points_and_lose_identifying_text() {
        let t = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
        let mut l = PointsLedger::new();
        l.execute(&LedgerRequest {
            key: IdempotencyKey::new("order:jane-1"),
            at: t,
            command: LedgerCommand::Accrue {
                points: 120,
                expires_at: None,
                order: Some(OrderRef {
                    order_id: "jane-1".into(),
                    amount: Money::new(12_000, CurrencyCode::new("EUR").unwrap()),
                }),
            },
        })
        .unwrap();
        l.execute(&LedgerRequest {
            key: IdempotencyKey::new("redeem:jane"),
            at: t,
            command: LedgerCommand::Redeem {
                points: 20,
                reference: "jane's voucher".into(),
            },
        })
        .unwrap();
        let anon: Vec<LedgerEntry> = l.entries().iter().map(anonymise_entry).collect();
        let text = serde_json::to_string(&anon).unwrap();
        assert!(!text.contains("jane"), "{text}");
        let rebuilt = PointsLedger::from_entries(anon.clone()).unwrap();
        assert_eq!(rebuilt.balance(t), 100);
        let again: Vec<LedgerEntry> = anon.iter().map(anonymise_entry).collect();
        assert_eq!(again, anon);
    }
    use chrono::{Duration, TimeZone};
    use proptest::prelude::*;

    use super::*;

    fn t(day: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap() + Duration::days(day)
    }

    fn eur(minor: i64) -> Money {
        Money::new(minor, CurrencyCode::new("EUR").unwrap())
    }

    fn req(key: &str, day: i64, command: LedgerCommand) -> LedgerRequest {
        LedgerRequest {
            key: IdempotencyKey::new(key),
            at: t(day),
            command,
        }
    }

    fn accrue(
        points: Points,
        expires_day: Option<i64>,
        order: Option<(&str, i64)>,
    ) -> LedgerCommand {
        LedgerCommand::Accrue {
            points,
            expires_at: expires_day.map(t),
            order: order.map(|(id, amount)| OrderRef {
                order_id: id.to_owned(),
                amount: eur(amount),
            }),
        }
    }

    fn redeem(points: Points) -> LedgerCommand {
        LedgerCommand::Redeem {
            points,
            reference: "reward".to_owned(),
        }
    }

    /// Merges `l` into `s` at `day` the way the store does.
    fn merge(l: &mut PointsLedger, s: &mut PointsLedger, day: i64) -> usize {
        let key = IdempotencyKey::new("merge:l");
        let (out, moved) = l.merge_out(&key, t(day), "s").unwrap();
        let into = s.merge_in(&key, t(day), "l", &moved);
        let n = into.len();
        l.record(out).unwrap();
        s.record(into).unwrap();
        n
    }

    #[test]
    fn merged_batches_keep_earning_and_expiry_times_and_are_spent_oldest_first() {
        let (mut l, mut s) = (PointsLedger::new(), PointsLedger::new());
        l.execute(&req("l1", 0, accrue(30, Some(20), Some(("o1", 3_000)))))
            .unwrap();
        s.execute(&req("s1", 1, accrue(50, None, None))).unwrap();
        l.execute(&req("l2", 2, accrue(10, None, None))).unwrap();
        assert_eq!(merge(&mut l, &mut s, 5), 2);
        assert_eq!(l.balance(t(5)), 0);
        assert_eq!(l.book_balance(), 0);
        assert_eq!(s.balance(t(5)), 90);
        let earned: Vec<_> = s.batches(t(5)).iter().map(|b| b.earned_at).collect();
        assert_eq!(earned, vec![t(0), t(1), t(2)]);
        assert_eq!(s.batches(t(5))[0].expires_at, Some(t(20)));
        // Tiers by points earned count the loser's accruals at their earning times.
        assert_eq!(s.moved_in_earnings(), vec![(t(0), 30), (t(2), 10)]);
        // Oldest of either profile first: the loser's day-0 batch, then the survivor's.
        let e = s.execute(&req("r", 6, redeem(40))).unwrap();
        match &e[0].change {
            EntryChange::Redeemed { draws, .. } => {
                let got: Vec<_> = draws.iter().map(|d| d.points).collect();
                assert_eq!(got, vec![30, 10]);
            }
            other => panic!("expected a redemption, got {other:?}"),
        }
        // Replays move nothing; the loser takes no new commands.
        assert_eq!(merge_again(&l, &s), (0, 0));
        assert!(matches!(
            l.execute(&req("l3", 7, accrue(1, None, None))),
            Err(LedgerError::MergedAway { .. })
        ));
        // The survivor refunds the loser's order from the moved batch (already spent:
        // recorded as unrecovered, never negative).
        let e = s
            .execute(&req(
                "refund",
                8,
                LedgerCommand::ReverseOrder {
                    order_id: "o1".into(),
                    refund: eur(1_500),
                },
            ))
            .unwrap();
        assert_eq!(e[0].change.book_delta(), 0);
        let rebuilt = PointsLedger::from_entries(s.entries().to_vec()).unwrap();
        assert_eq!(rebuilt.balance(t(9)), s.balance(t(9)));
    }

    fn merge_again(l: &PointsLedger, s: &PointsLedger) -> (usize, usize) {
        let key = IdempotencyKey::new("merge:l");
        let (out, moved) = l.merge_out(&key, t(9), "s").unwrap();
        (out.len(), s.merge_in(&key, t(9), "l", &moved).len())
    }

    #[test]
    fn accrual_creates_a_batch_and_raises_the_balance() {
        let mut l = PointsLedger::new();
        let e = l
            .execute(&req("a", 0, accrue(100, Some(365), None)))
            .unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].seq, EntrySeq(0));
        assert_eq!(l.balance(t(1)), 100);
        assert_eq!(l.batches(t(1)).len(), 1);
    }

    #[test]
    fn redemption_spends_oldest_batch_first() {
        let mut l = PointsLedger::new();
        l.execute(&req("a", 0, accrue(100, Some(400), None)))
            .unwrap();
        l.execute(&req("b", 1, accrue(50, Some(300), None)))
            .unwrap();
        let e = l.execute(&req("r", 2, redeem(120))).unwrap();
        let EntryChange::Redeemed { draws, .. } = &e[0].change else {
            panic!("expected a redemption");
        };
        assert_eq!(
            draws,
            &vec![
                BatchDraw {
                    batch: EntrySeq(0),
                    points: 100
                },
                BatchDraw {
                    batch: EntrySeq(1),
                    points: 20
                },
            ]
        );
        assert_eq!(l.balance(t(2)), 30);
    }

    #[test]
    fn redemption_skips_expired_batches() {
        let mut l = PointsLedger::new();
        l.execute(&req("a", 0, accrue(100, Some(10), None)))
            .unwrap();
        l.execute(&req("b", 1, accrue(50, None, None))).unwrap();
        assert_eq!(l.balance(t(10)), 50);
        let err = l.execute(&req("r", 10, redeem(60))).unwrap_err();
        assert_eq!(
            err,
            LedgerError::InsufficientBalance {
                requested: 60,
                available: 50
            }
        );
        l.execute(&req("r2", 10, redeem(50))).unwrap();
        assert_eq!(l.balance(t(10)), 0);
    }

    #[test]
    fn redemption_larger_than_balance_is_refused() {
        let mut l = PointsLedger::new();
        l.execute(&req("a", 0, accrue(10, None, None))).unwrap();
        assert!(matches!(
            l.execute(&req("r", 1, redeem(11))),
            Err(LedgerError::InsufficientBalance {
                requested: 11,
                available: 10
            })
        ));
        assert_eq!(l.entries().len(), 1);
    }

    #[test]
    fn expiry_writes_off_expired_batches_oldest_first() {
        let mut l = PointsLedger::new();
        l.execute(&req("a", 0, accrue(100, Some(30), None)))
            .unwrap();
        l.execute(&req("b", 1, accrue(40, Some(20), None))).unwrap();
        l.execute(&req("c", 2, accrue(7, None, None))).unwrap();
        l.execute(&req("r", 3, redeem(60))).unwrap();
        let e = l.execute(&req("x", 40, LedgerCommand::ExpireDue)).unwrap();
        let expired: Vec<_> = e
            .iter()
            .map(|e| match e.change {
                EntryChange::Expired { batch, points } => (batch.0, points),
                _ => panic!("expected expiry"),
            })
            .collect();
        assert_eq!(expired, vec![(0, 40), (1, 40)]);
        assert_eq!(l.balance(t(40)), 7);
        assert_eq!(l.book_balance(), 7);
    }

    #[test]
    fn balance_as_of_an_earlier_time_ignores_later_entries() {
        let mut l = PointsLedger::new();
        l.execute(&req("a", 0, accrue(100, Some(30), None)))
            .unwrap();
        l.execute(&req("r", 5, redeem(30))).unwrap();
        let then = l.as_of(t(3));
        assert_eq!(then.balance(t(3)), 100);
        assert_eq!(l.as_of(t(6)).balance(t(6)), 70);
        assert_eq!(l.as_of(t(31)).balance(t(31)), 0);
    }

    #[test]
    fn same_key_same_command_returns_original_entries() {
        let mut l = PointsLedger::new();
        let first = l.execute(&req("a", 0, accrue(100, None, None))).unwrap();
        // A retry stamped later is still the same request.
        let again = l.execute(&req("a", 1, accrue(100, None, None))).unwrap();
        assert_eq!(first, again);
        assert_eq!(l.entries().len(), 1);
        assert_eq!(l.balance(t(2)), 100);
    }

    #[test]
    fn same_key_different_command_is_a_conflict() {
        let mut l = PointsLedger::new();
        l.execute(&req("a", 0, accrue(100, None, None))).unwrap();
        assert_eq!(
            l.execute(&req("a", 0, accrue(101, None, None))),
            Err(LedgerError::IdempotencyConflict {
                key: IdempotencyKey::new("a")
            })
        );
    }

    #[test]
    fn cancelled_redemption_restores_the_batches_it_consumed() {
        let mut l = PointsLedger::new();
        l.execute(&req("a", 0, accrue(100, Some(400), None)))
            .unwrap();
        l.execute(&req("b", 1, accrue(50, Some(300), None)))
            .unwrap();
        l.execute(&req("r", 2, redeem(120))).unwrap();
        let e = l
            .execute(&req(
                "c",
                3,
                LedgerCommand::CancelRedemption {
                    redemption_key: IdempotencyKey::new("r"),
                },
            ))
            .unwrap();
        assert_eq!(e[0].change.book_delta(), 120);
        let remaining: Vec<_> = l.batches(t(3)).iter().map(|b| b.remaining).collect();
        assert_eq!(remaining, vec![100, 50]);
        assert_eq!(
            l.apply(&req(
                "c2",
                3,
                LedgerCommand::CancelRedemption {
                    redemption_key: IdempotencyKey::new("r"),
                },
            )),
            Err(LedgerError::RedemptionAlreadyCancelled {
                key: IdempotencyKey::new("r")
            })
        );
    }

    #[test]
    fn cancelling_after_expiry_does_not_revive_expired_points() {
        let mut l = PointsLedger::new();
        l.execute(&req("a", 0, accrue(100, Some(10), None)))
            .unwrap();
        l.execute(&req("r", 2, redeem(100))).unwrap();
        l.execute(&req(
            "c",
            11,
            LedgerCommand::CancelRedemption {
                redemption_key: IdempotencyKey::new("r"),
            },
        ))
        .unwrap();
        assert_eq!(l.balance(t(11)), 0);
        assert_eq!(l.book_balance(), 100);
        l.execute(&req("x", 11, LedgerCommand::ExpireDue)).unwrap();
        assert_eq!(l.book_balance(), 0);
    }

    #[test]
    fn refund_reverses_points_in_proportion() {
        let mut l = PointsLedger::new();
        l.execute(&req("a", 0, accrue(100, None, Some(("o1", 10_000)))))
            .unwrap();
        let e = l
            .execute(&req(
                "ref1",
                1,
                LedgerCommand::ReverseOrder {
                    order_id: "o1".into(),
                    refund: eur(3_000),
                },
            ))
            .unwrap();
        assert_eq!(e[0].change.book_delta(), -30);
        assert_eq!(l.balance(t(1)), 70);
    }

    #[test]
    fn partial_refunds_round_down_on_the_running_total() {
        let mut l = PointsLedger::new();
        l.execute(&req("a", 0, accrue(3, None, Some(("o1", 100)))))
            .unwrap();
        let half = |k: &str| {
            req(
                k,
                1,
                LedgerCommand::ReverseOrder {
                    order_id: "o1".into(),
                    refund: eur(50),
                },
            )
        };
        let first = l.execute(&half("r1")).unwrap();
        assert_eq!(first[0].change.book_delta(), -1); // floor(1.5)
        let second = l.execute(&half("r2")).unwrap();
        assert_eq!(second[0].change.book_delta(), -2); // total floor(3) - 1
        assert_eq!(l.balance(t(1)), 0);
        assert!(matches!(
            l.apply(&half("r3")),
            Err(LedgerError::RefundExceedsOrder { .. })
        ));
    }

    #[test]
    fn refund_of_spent_points_records_shortfall_and_never_goes_negative() {
        let mut l = PointsLedger::new();
        l.execute(&req("a", 0, accrue(100, None, Some(("o1", 1_000)))))
            .unwrap();
        l.execute(&req("b", 0, accrue(20, None, None))).unwrap();
        l.execute(&req("r", 1, redeem(90))).unwrap();
        let e = l
            .execute(&req(
                "ref",
                2,
                LedgerCommand::ReverseOrder {
                    order_id: "o1".into(),
                    refund: eur(1_000),
                },
            ))
            .unwrap();
        let EntryChange::Reversed {
            draws, unrecovered, ..
        } = &e[0].change
        else {
            panic!("expected a reversal");
        };
        assert_eq!(
            draws,
            &vec![BatchDraw {
                batch: EntrySeq(0),
                points: 10
            }]
        );
        assert_eq!(
            unrecovered,
            &vec![BatchDraw {
                batch: EntrySeq(0),
                points: 90
            }]
        );
        // The other batch is untouched: no debt against other points.
        assert_eq!(l.balance(t(2)), 20);
        // Cancelling the redemption settles the clawback instead of reviving refunded points.
        l.execute(&req(
            "c",
            3,
            LedgerCommand::CancelRedemption {
                redemption_key: IdempotencyKey::new("r"),
            },
        ))
        .unwrap();
        assert_eq!(l.balance(t(3)), 20);
        assert_eq!(l.batches(t(3))[0].clawback_owed, 0);
    }

    #[test]
    fn refund_in_another_currency_is_refused() {
        let mut l = PointsLedger::new();
        l.execute(&req("a", 0, accrue(100, None, Some(("o1", 1_000)))))
            .unwrap();
        let usd = Money::new(10, CurrencyCode::new("USD").unwrap());
        assert!(matches!(
            l.apply(&req(
                "ref",
                1,
                LedgerCommand::ReverseOrder {
                    order_id: "o1".into(),
                    refund: usd
                }
            )),
            Err(LedgerError::CurrencyMismatch { .. })
        ));
    }

    #[test]
    fn manual_adjustment_needs_a_reason_and_cannot_overdraw() {
        let mut l = PointsLedger::new();
        let adjust = |points, reason: &str| LedgerCommand::Adjust {
            points,
            reason: reason.to_owned(),
            expires_at: None,
        };
        assert_eq!(
            l.apply(&req("a", 0, adjust(10, "  "))),
            Err(LedgerError::MissingReason)
        );
        l.execute(&req("a", 0, adjust(10, "goodwill: late delivery")))
            .unwrap();
        assert!(matches!(
            l.apply(&req("b", 1, adjust(-11, "correction"))),
            Err(LedgerError::InsufficientBalance { .. })
        ));
        l.execute(&req("b", 1, adjust(-4, "correction"))).unwrap();
        assert_eq!(l.balance(t(1)), 6);
    }

    #[test]
    fn commands_earlier_than_the_last_entry_are_refused() {
        let mut l = PointsLedger::new();
        l.execute(&req("a", 5, accrue(10, None, None))).unwrap();
        assert!(matches!(
            l.apply(&req("b", 4, accrue(10, None, None))),
            Err(LedgerError::OutOfOrder { .. })
        ));
    }

    #[test]
    fn rebuilding_from_entries_detects_gaps() {
        let mut l = PointsLedger::new();
        l.execute(&req("a", 0, accrue(10, None, None))).unwrap();
        l.execute(&req("b", 0, accrue(10, None, None))).unwrap();
        let mut entries = l.entries().to_vec();
        entries.remove(0);
        assert!(matches!(
            PointsLedger::from_entries(entries),
            Err(LedgerError::Corrupt { .. })
        ));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Accrue(Points, Option<i64>, bool),
        Redeem(Points),
        Cancel(usize),
        Refund(usize, i64),
        Adjust(Points),
        Expire,
        Retry(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1..500i64, proptest::option::of(1..60i64), any::<bool>())
                .prop_map(|(p, e, o)| Op::Accrue(p, e, o)),
            (1..800i64).prop_map(Op::Redeem),
            (0..50usize).prop_map(Op::Cancel),
            (0..50usize, 1..1_000i64).prop_map(|(i, r)| Op::Refund(i, r)),
            (-300..300i64).prop_map(Op::Adjust),
            Just(Op::Expire),
            (0..50usize).prop_map(Op::Retry),
        ]
    }

    proptest! {
        #[test]
        fn merging_two_random_ledgers_adds_balances_and_keeps_every_invariant(
            ops in proptest::collection::vec((any::<bool>(), 1..100i64, 0..3i64, any::<bool>()), 1..40)
        ) {
            let (mut l, mut s) = (PointsLedger::new(), PointsLedger::new());
            let mut day = 0;
            for (i, (to_loser, p, step, spend)) in ops.into_iter().enumerate() {
                day += step;
                let ledger = if to_loser { &mut l } else { &mut s };
                let command = if spend { redeem(p) } else { accrue(p, Some(day + 1 + p % 30), Some(("o", 10_000))) };
                let _ = ledger.execute(&req(&format!("k{i}"), day, command));
            }
            day += 1;
            let (lb, sb) = (l.balance(t(day)), s.balance(t(day)));
            let book = l.book_balance() + s.book_balance();
            merge(&mut l, &mut s, day);
            prop_assert_eq!(l.balance(t(day)), 0);
            prop_assert_eq!(l.book_balance(), 0);
            prop_assert_eq!(s.balance(t(day)), lb + sb);
            prop_assert_eq!(s.book_balance(), book);
            let sum: Points = s.entries().iter().map(|e| e.change.book_delta()).sum();
            prop_assert_eq!(sum, s.book_balance());
            // Everything available can be spent, and not a point more.
            if lb + sb > 0 {
                prop_assert!(s.execute(&req("all", day, redeem(lb + sb))).is_ok());
            }
            prop_assert_eq!(s.balance(t(day)), 0);
            prop_assert!(s.execute(&req("more", day, redeem(1))).is_err());
            // A refund of the whole order never drives anything negative.
            let _ = s.execute(&req("refund", day, LedgerCommand::ReverseOrder { order_id: "o".into(), refund: eur(10_000) }));
            prop_assert!(s.batches(t(day)).iter().all(|b| b.remaining >= 0));
            let rebuilt = PointsLedger::from_entries(s.entries().to_vec()).unwrap();
            prop_assert_eq!(rebuilt.book_balance(), s.book_balance());
        }

        #[test]
        fn random_command_sequences_never_drive_the_balance_negative(
            ops in proptest::collection::vec((op(), 0..5i64), 1..60)
        ) {
            let mut l = PointsLedger::new();
            let mut day = 0;
            let mut sent: Vec<LedgerRequest> = Vec::new();
            for (i, (op, step)) in ops.into_iter().enumerate() {
                day += step;
                let key = format!("k{i}");
                let command = match op {
                    Op::Accrue(p, e, with_order) => LedgerCommand::Accrue {
                        points: p,
                        expires_at: e.map(|e| t(day + e)),
                        order: with_order.then(|| OrderRef {
                            order_id: "o".repeat(1 + i % 3),
                            amount: eur(1_000),
                        }),
                    },
                    Op::Redeem(p) => redeem(p),
                    Op::Cancel(j) => LedgerCommand::CancelRedemption {
                        redemption_key: IdempotencyKey::new(format!("k{j}")),
                    },
                    Op::Refund(j, amount) => LedgerCommand::ReverseOrder {
                        order_id: "o".repeat(1 + j % 3),
                        refund: eur(amount),
                    },
                    Op::Adjust(p) => LedgerCommand::Adjust {
                        points: p,
                        reason: "test".into(),
                        expires_at: None,
                    },
                    Op::Expire => LedgerCommand::ExpireDue,
                    Op::Retry(j) => match sent.get(j) {
                        Some(r) => {
                            let before = l.entries().len();
                            let _ = l.execute(&LedgerRequest { at: t(day), ..r.clone() });
                            prop_assert_eq!(l.entries().len(), before);
                            continue;
                        }
                        None => LedgerCommand::ExpireDue,
                    },
                };
                let request = LedgerRequest { key: IdempotencyKey::new(key), at: t(day), command };
                // A command that wrote nothing (ExpireDue with nothing due) leaves no
                // trace, so only commands that wrote entries are replayed.
                if l.execute(&request).is_ok_and(|entries| !entries.is_empty()) {
                    sent.push(request);
                }
                prop_assert!(l.balance(t(day)) >= 0);
                prop_assert!(l.batches(t(day)).iter().all(|b| b.remaining >= 0 && b.remaining <= b.earned));
                let book: Points = l.entries().iter().map(|e| e.change.book_delta()).sum();
                prop_assert_eq!(book, l.book_balance());
            }
            let rebuilt = PointsLedger::from_entries(l.entries().to_vec()).unwrap();
            prop_assert_eq!(rebuilt.balance(t(day)), l.balance(t(day)));
        }
    }
}
