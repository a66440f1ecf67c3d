//! OfferService persistence behind one trait, [`OfferStore`], with one SQL implementation that
//! runs on PostgreSQL and on SQLite through `sqlx::Any`.
//!
//! What is enforced here, atomically, rather than by reads before writes in the service:
//!
//! * **Ledger writes are serialised per profile.** [`OfferStore::apply_ledger`] takes the
//!   profile's advisory lock (PostgreSQL; SQLite serialises all writers), replays the stored
//!   entries into a [`PointsLedger`], applies the command with the pure rules (which re-check
//!   the balance and the idempotency key) and appends the new entries, all in one transaction.
//!   `PRIMARY KEY (profile_id, seq)` is the backstop: a writer that somehow raced another
//!   fails on the sequence number, rolls back and retries from a fresh read. So concurrent
//!   redemptions can never spend the same points, and the balance never goes negative.
//! * **Feed cursors advance with the writes they cause**: [`OfferStore::apply_ledger`] takes
//!   an optional cursor that is stored in the same transaction, so an order is accrued exactly
//!   once even if the consumer crashes between the two.
//! * **Budgets and caps are booked at issuance in one transaction**: the per-profile cap and
//!   the catalogue-wide frequency cap are counted under the profile's advisory lock, and the
//!   budget is booked by one conditional `UPDATE offers … WHERE issued_count < max_issued …`
//!   whose row lock makes concurrent issuers re-evaluate the condition; zero rows updated
//!   means the budget is exhausted (or the offer is no longer ACTIVE).
//! * **Trigger firings are recorded once** per `(trigger_id, source_key)` by primary key.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use clientele_proto::v1 as pb;
use clientele_runtime::db::{Database, WriteTx};
use prost::Message;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::ledger::{
    EntryChange, IdempotencyKey, LedgerCommand, LedgerEntry, LedgerError, LedgerRequest,
    PointsLedger, anonymise_entry,
};
use crate::program::EarnActivity;

/// How often a ledger write is retried after losing a sequence-number race.
const LEDGER_ATTEMPTS: usize = 5;

/// Why an issuance was refused by the atomic checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueRefusal {
    /// The profile already holds the offer's per-profile cap of codes.
    ProfileCap,
    /// The catalogue-wide frequency cap leaves no room.
    FrequencyCap,
    /// The budget is exhausted.
    Budget,
    /// The offer is not ACTIVE (paused or archived).
    NotActive,
}

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The thing named does not exist (`kind`, `id`).
    #[error("{0} `{1}` not found")]
    NotFound(&'static str, String),
    /// An object with this id exists with a different body.
    #[error("{0} `{1}` already exists with a different definition")]
    AlreadyExists(&'static str, String),
    /// The idempotency key was already used with a different request.
    #[error("idempotency key `{0}` was already used with a different request")]
    IdempotencyConflict(String),
    /// The stored version differs from the expected one.
    #[error("offer `{id}` changed concurrently (now at version {actual})")]
    VersionConflict {
        /// The offer.
        id: String,
        /// Its current version.
        actual: i64,
    },
    /// The ledger rules refused the command.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// Issuance refused by a cap or the budget.
    #[error("issuance refused: {0:?}")]
    Refused(IssueRefusal),
    /// The operation is not allowed in the object's current state.
    #[error("{0}")]
    Precondition(String),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// Stored data could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

/// Result type of the store.
pub type StoreResult<T> = Result<T, StoreError>;

/// API-level facts about a ledger entry that the pure ledger does not carry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryMeta {
    /// `pb::LedgerEntryKind` to report instead of the one derived from the change (BONUS for
    /// offer points); 0 derives it.
    pub kind: i32,
    /// `pb::AdjustmentReason` for adjustments.
    pub adjustment_reason: i32,
    /// Free-text note.
    pub note: String,
    /// Who made the change.
    pub actor: String,
    /// Caller's reference for redemptions.
    pub reference: String,
    /// Issued offer that caused a BONUS.
    pub issue_id: String,
}

/// A persisted ledger entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    /// Server-assigned UUID.
    pub entry_id: String,
    /// The profile.
    pub profile_id: String,
    /// The domain entry.
    pub entry: LedgerEntry,
    /// `pb::LedgerEntryKind`.
    pub kind: i32,
    /// Signed change of the available balance.
    pub points: i64,
    /// Available points right after the command that wrote the entry.
    pub balance_after: i64,
    /// When written (µs).
    pub created_at: i64,
    /// Order id for order-related entries.
    pub order_id: String,
    /// API facts.
    pub meta: EntryMeta,
}

/// The result of a ledger command.
#[derive(Debug, Clone)]
pub struct LedgerOutcome {
    /// The entries the command wrote (or wrote originally, on a replay).
    pub entries: Vec<StoredEntry>,
    /// True if the key had been applied before and nothing was written.
    pub replayed: bool,
    /// Available points after the command.
    pub available: i64,
}

/// A catalogue offer as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct OfferRecord {
    /// The definition without output-only fields (status and counters are in the record).
    pub offer: pb::Offer,
    /// `pb::OfferStatus`.
    pub status: i32,
    /// 1 on create, +1 per update.
    pub version: i64,
    /// Codes issued and not cancelled.
    pub issued: i64,
    /// Codes redeemed.
    pub redeemed: i64,
    /// Budget cost booked (minor units).
    pub cost_booked: i64,
    /// Created (µs).
    pub created_at: i64,
    /// Last updated (µs).
    pub updated_at: i64,
}

/// An issuance to perform atomically.
#[derive(Debug, Clone)]
pub struct NewIssue {
    /// The issued offer as it will be stored (status ISSUED).
    pub issued: pb::IssuedOffer,
    /// Scoped idempotency key.
    pub idem_key: String,
    /// Fingerprint of the request, to tell a retry from a conflict.
    pub fingerprint: String,
    /// Per-profile cap of non-cancelled codes of this offer.
    pub per_profile_cap: Option<i64>,
    /// Catalogue-wide cap: at most `.0` non-cancelled codes issued after `.1` (µs).
    pub frequency_cap: Option<(i64, i64)>,
}

/// A redemption to perform atomically.
#[derive(Debug, Clone)]
pub struct RedeemCode {
    /// Normalised code.
    pub code: String,
    /// Scoped idempotency key.
    pub idem_key: String,
    /// Order id, may be empty.
    pub order_id: String,
    /// The redemption details to store.
    pub redemption: pb::Redemption,
    /// When (µs).
    pub now: i64,
}

/// Who holds a code, for checks before redeeming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeOwner {
    /// The profile the code was issued to.
    pub profile_id: String,
    /// The offer.
    pub offer_id: String,
}

/// Everything OfferService persists. Each call is atomic.
#[async_trait]
pub trait OfferStore: Send + Sync + std::fmt::Debug {
    /// Applies a ledger command for `profile_id` at `now` (moved forward to the last entry's
    /// time if earlier, so the ledger stays in time order), storing `cursor` (consumer, value)
    /// in the same transaction. A key applied before returns the original entries with
    /// `replayed = true` (cursor still stored); a refused command stores nothing.
    async fn apply_ledger(
        &self,
        profile_id: &str,
        key: &str,
        command: LedgerCommand,
        now: DateTime<Utc>,
        meta: EntryMeta,
        cursor: Option<(&str, &str)>,
    ) -> StoreResult<LedgerOutcome>;
    /// The profile's ledger rebuilt from its entries, with the stored entries in order.
    async fn ledger(&self, profile_id: &str) -> StoreResult<(PointsLedger, Vec<StoredEntry>)>;
    /// The stored cursor of `consumer`.
    async fn cursor(&self, consumer: &str) -> StoreResult<Option<String>>;
    /// Stores the cursor of `consumer`.
    async fn set_cursor(&self, consumer: &str, cursor: &str) -> StoreResult<()>;

    /// Creates an offer; an existing id with an equal definition returns the stored record and
    /// `false`, with a different one [`StoreError::AlreadyExists`].
    async fn create_offer(&self, record: &OfferRecord) -> StoreResult<(OfferRecord, bool)>;
    /// The offer, or [`StoreError::NotFound`].
    async fn get_offer(&self, offer_id: &str) -> StoreResult<OfferRecord>;
    /// Up to `limit` offers with id above `after`, by id, with a status in `statuses`.
    async fn list_offers(
        &self,
        statuses: &[i32],
        after: &str,
        limit: i64,
    ) -> StoreResult<Vec<OfferRecord>>;
    /// Replaces definition and status if the version is still `based_on`.
    async fn update_offer(
        &self,
        offer: &pb::Offer,
        status: i32,
        based_on: i64,
        now: i64,
    ) -> StoreResult<OfferRecord>;
    /// Archives the offer (idempotent), optionally cancelling outstanding codes; returns the
    /// record and the number of codes cancelled.
    async fn archive_offer(
        &self,
        offer_id: &str,
        cancel_outstanding: bool,
        now: i64,
    ) -> StoreResult<(OfferRecord, i64)>;

    /// Issues a code: idempotency check, caps and budget booking in one transaction. A key
    /// used before with the same fingerprint returns the original and `true`.
    async fn issue(&self, issue: &NewIssue) -> StoreResult<(pb::IssuedOffer, bool)>;
    /// Redeems a code once; see `RedeemOfferRequest` for replay rules. Returns the issued
    /// offer and whether this was a replay.
    async fn redeem(&self, redeem: &RedeemCode) -> StoreResult<(pb::IssuedOffer, bool)>;
    /// Cancels an issued code by issue id or code, giving back its budget and cap slot.
    async fn cancel(
        &self,
        issue_id: Option<&str>,
        code: Option<&str>,
        reason: &str,
        now: i64,
    ) -> StoreResult<pb::IssuedOffer>;
    /// The owner and offer of a code, if it exists.
    async fn peek_code(&self, code: &str) -> StoreResult<Option<CodeOwner>>;
    /// The issued offer stored under an issuance idempotency key, with its fingerprint.
    async fn find_issue(&self, idem_key: &str) -> StoreResult<Option<(pb::IssuedOffer, String)>>;
    /// A profile's issued offers, newest first, at most `limit`, skipping `offset`.
    async fn list_issued(
        &self,
        profile_id: &str,
        offset: i64,
        limit: i64,
    ) -> StoreResult<Vec<pb::IssuedOffer>>;
    /// Per offer, the profile's non-cancelled codes, and the issue times of all of them.
    async fn profile_usage(
        &self,
        profile_id: &str,
    ) -> StoreResult<(HashMap<String, u32>, Vec<i64>)>;

    /// Creates a trigger (same id rules as offers).
    async fn create_trigger(&self, trigger: &pb::Trigger) -> StoreResult<(pb::Trigger, bool)>;
    /// Live triggers by id, above `after`, optionally of one offer.
    async fn list_triggers(
        &self,
        offer_id: &str,
        after: &str,
        limit: i64,
    ) -> StoreResult<Vec<pb::Trigger>>;
    /// Deletes a trigger (idempotent); [`StoreError::NotFound`] if never created.
    async fn delete_trigger(&self, trigger_id: &str) -> StoreResult<()>;
    /// Records that `trigger_id` fired for `source_key`; false if it already had, or if the
    /// trigger has been deleted meanwhile (it stops firing at once).
    async fn claim_firing(
        &self,
        trigger_id: &str,
        source_key: &str,
        profile_id: &str,
        now: i64,
    ) -> StoreResult<bool>;
    /// Counts a firing's outcome and remembers the issue id.
    async fn finish_firing(
        &self,
        trigger_id: &str,
        source_key: &str,
        issue_id: Option<&str>,
    ) -> StoreResult<()>;

    /// The profile's recorded order activity (spend and points per order or refund).
    async fn activity(&self, profile_id: &str) -> StoreResult<Vec<EarnActivity>>;
    /// Records one order or refund once per `(profile_id, activity.key)`; false if it had
    /// been recorded before (nothing changes then).
    async fn record_activity(&self, profile_id: &str, activity: &EarnActivity)
    -> StoreResult<bool>;
    /// Erases what the service holds about a profile, in one transaction under the profile's
    /// ledger lock, storing `cursor` with it: deletes its issued offers, trigger firings and
    /// order activity, and anonymises its ledger entries (moved to a fresh random pseudonym,
    /// identifying text blanked; points stay for the accounts). Offer usage counters and
    /// budgets are left as they are: budget already spent stays spent. Profiles merged into
    /// it ([`Self::merge_profiles`], transitively) are erased with it. Idempotent: a second
    /// call finds nothing left.
    async fn erase_profile(
        &self,
        profile_id: &str,
        cursor: Option<(&str, &str)>,
    ) -> StoreResult<ErasureOutcome>;
    /// Whether [`Self::erase_profile`] ran for the profile.
    async fn is_erased(&self, profile_id: &str) -> StoreResult<bool>;
    /// Merges each of `losers` into `survivor` in one transaction under the ledger locks of
    /// all of them, storing `cursor` with it. Per loser: its ledger gets one `MergedOut`
    /// entry (balance 0, no further commands) and the survivor one `MergedIn` entry per
    /// batch, keeping earned and expiry times, refund state and order (key `merge:<loser>`
    /// in both ledgers); its order activity (keys the survivor already has are dropped),
    /// issued offers and trigger firings are re-owned by the survivor; the pair is recorded
    /// for [`Self::survivor_of`]. Exactly once: a replay finds the key and moves nothing.
    async fn merge_profiles(
        &self,
        survivor: &str,
        losers: &[String],
        cursor: Option<(&str, &str)>,
    ) -> StoreResult<MergeOutcome>;
    /// The profile a merged-away profile now lives in (following chains of merges), or
    /// `None` if it was not merged.
    async fn survivor_of(&self, profile_id: &str) -> StoreResult<Option<String>>;
}

/// What a merge moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeOutcome {
    /// Losers merged now (not before).
    pub merged: u64,
    /// Batches moved to the survivor.
    pub batches: u64,
    /// Available points moved (at the merge time).
    pub points: i64,
    /// Issued offers re-owned.
    pub issued_offers: u64,
    /// Order activity rows re-owned.
    pub activity: u64,
}

/// What an erasure removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErasureOutcome {
    /// Issued offers deleted.
    pub issued_offers: u64,
    /// Ledger entries anonymised.
    pub ledger_entries: u64,
    /// Order activity rows deleted.
    pub activity: u64,
    /// Trigger firings deleted.
    pub trigger_firings: u64,
}

/// [`OfferStore`] over a [`Database`].
#[derive(Debug, Clone)]
pub struct SqlOfferStore {
    db: Database,
}

impl SqlOfferStore {
    /// A store over `db` (already migrated).
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    async fn begin_write(&self) -> StoreResult<WriteTx<'_>> {
        Ok(self.db.begin_write().await?)
    }
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn enc<M: Message>(m: &M) -> String {
    hex::encode(m.encode_to_vec())
}

fn dec<M: Message + Default>(s: &str) -> StoreResult<M> {
    let bytes = hex::decode(s).map_err(corrupt)?;
    M::decode(bytes.as_slice()).map_err(corrupt)
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.is_unique_violation()
                || d.code()
                    .is_some_and(|c| c == "23505" || c == "2067" || c == "1555")
        }
        _ => false,
    }
}

/// The API kind and signed available-balance change of an entry.
pub fn entry_kind_points(change: &EntryChange) -> (pb::LedgerEntryKind, i64) {
    use pb::LedgerEntryKind as K;
    let kind = match change {
        EntryChange::Accrued { .. } => K::Earn,
        EntryChange::Redeemed { .. } => K::Redemption,
        EntryChange::RedemptionCancelled { .. }
        | EntryChange::Adjusted { .. }
        | EntryChange::MergedOut { .. }
        | EntryChange::MergedIn { .. } => K::Adjustment,
        EntryChange::Expired { .. } => K::Expiry,
        EntryChange::Reversed { .. } => K::EarnReversal,
    };
    (kind, change.book_delta())
}

fn order_of(change: &EntryChange) -> String {
    match change {
        EntryChange::Accrued { order: Some(o), .. } => o.order_id.clone(),
        EntryChange::Reversed { order_id, .. } => order_id.clone(),
        _ => String::new(),
    }
}

const ENTRY_COLUMNS: &str =
    "entry_id, profile_id, kind, points, balance_after, created_at, order_id, meta, body";

fn entry_row(row: &AnyRow) -> StoreResult<StoredEntry> {
    let meta: String = row.try_get("meta")?;
    let body: String = row.try_get("body")?;
    Ok(StoredEntry {
        entry_id: row.try_get("entry_id")?,
        profile_id: row.try_get("profile_id")?,
        kind: i32::try_from(row.try_get::<i64, _>("kind")?).map_err(corrupt)?,
        points: row.try_get("points")?,
        balance_after: row.try_get("balance_after")?,
        created_at: row.try_get("created_at")?,
        order_id: row.try_get("order_id")?,
        meta: serde_json::from_str(&meta).map_err(corrupt)?,
        entry: serde_json::from_str(&body).map_err(corrupt)?,
    })
}

async fn load_entries(conn: &mut AnyConnection, profile_id: &str) -> StoreResult<Vec<StoredEntry>> {
    let sql =
        format!("SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE profile_id = $1 ORDER BY seq");
    let rows = sqlx::query(&sql)
        .bind(profile_id)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(entry_row).collect()
}

/// Inserts already-computed entries of `profile_id` (key from the entries), each with
/// `balance_after` = `available`.
async fn insert_entries(
    conn: &mut AnyConnection,
    profile_id: &str,
    entries: Vec<LedgerEntry>,
    available: i64,
    meta: &EntryMeta,
) -> StoreResult<Vec<StoredEntry>> {
    let mut written = Vec::with_capacity(entries.len());
    for entry in entries {
        let (kind, points) = entry_kind_points(&entry.change);
        let s = StoredEntry {
            entry_id: uuid::Uuid::now_v7().to_string(),
            profile_id: profile_id.to_string(),
            order_id: order_of(&entry.change),
            kind: kind as i32,
            points,
            balance_after: available,
            created_at: entry.at.timestamp_micros(),
            meta: meta.clone(),
            entry,
        };
        sqlx::query(
            "INSERT INTO ledger_entries (profile_id, seq, entry_id, idem_key, kind, points, \
             balance_after, created_at, order_id, meta, body) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(profile_id)
        .bind(i64::try_from(s.entry.seq.0).map_err(corrupt)?)
        .bind(&s.entry_id)
        .bind(&s.entry.key.0)
        .bind(i64::from(s.kind))
        .bind(s.points)
        .bind(s.balance_after)
        .bind(s.created_at)
        .bind(&s.order_id)
        .bind(serde_json::to_string(&s.meta).map_err(corrupt)?)
        .bind(serde_json::to_string(&s.entry).map_err(corrupt)?)
        .execute(&mut *conn)
        .await?;
        written.push(s);
    }
    Ok(written)
}

/// Follows `merged_profiles` from `profile_id` to the profile that now holds its data.
async fn survivor_in(conn: &mut AnyConnection, profile_id: &str) -> StoreResult<Option<String>> {
    let mut current = profile_id.to_string();
    let mut found = None;
    // Bounded: a merge cycle (which ProfileService never produces) cannot loop forever.
    for _ in 0..16 {
        let row = sqlx::query("SELECT survivor_id FROM merged_profiles WHERE loser_id = $1")
            .bind(&current)
            .fetch_optional(&mut *conn)
            .await?;
        let Some(row) = row else { break };
        current = row.try_get("survivor_id")?;
        found = Some(current.clone());
    }
    Ok(found)
}

/// The profiles merged into `profile_id`, transitively (not including it).
async fn merged_into(conn: &mut AnyConnection, profile_id: &str) -> StoreResult<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    let mut frontier = vec![profile_id.to_string()];
    while let Some(p) = frontier.pop() {
        let rows = sqlx::query("SELECT loser_id FROM merged_profiles WHERE survivor_id = $1")
            .bind(&p)
            .fetch_all(&mut *conn)
            .await?;
        for r in &rows {
            let l: String = r.try_get("loser_id")?;
            if l != profile_id && !out.contains(&l) && out.len() < 10_000 {
                out.push(l.clone());
                frontier.push(l);
            }
        }
    }
    Ok(out)
}

/// The erasure of one profile id inside [`OfferStore::erase_profile`]'s transaction.
async fn erase_one(
    conn: &mut AnyConnection,
    profile_id: &str,
    out: &mut ErasureOutcome,
) -> StoreResult<()> {
    let mut deleted = [0_u64; 3];
    for (i, table) in ["issued_offers", "trigger_firings", "earn_activity"]
        .iter()
        .enumerate()
    {
        deleted[i] = sqlx::query(&format!("DELETE FROM {table} WHERE profile_id = $1"))
            .bind(profile_id)
            .execute(&mut *conn)
            .await?
            .rows_affected();
    }
    out.issued_offers += deleted[0];
    out.trigger_firings += deleted[1];
    out.activity += deleted[2];
    let stored = load_entries(conn, profile_id).await?;
    if !stored.is_empty() {
        let pseudonym = format!("erased:{}", uuid::Uuid::new_v4());
        let meta = serde_json::to_string(&EntryMeta::default()).map_err(corrupt)?;
        for s in &stored {
            let body = serde_json::to_string(&anonymise_entry(&s.entry)).map_err(corrupt)?;
            sqlx::query(
                "UPDATE ledger_entries SET profile_id = $1, idem_key = '', order_id = '', \
                 meta = $2, body = $3 WHERE profile_id = $4 AND seq = $5",
            )
            .bind(&pseudonym)
            .bind(&meta)
            .bind(&body)
            .bind(profile_id)
            .bind(i64::try_from(s.entry.seq.0).map_err(corrupt)?)
            .execute(&mut *conn)
            .await?;
            out.ledger_entries += 1;
        }
    }
    sqlx::query(
        "INSERT INTO erased_profiles (profile_id, erased_at) VALUES ($1, $2) \
         ON CONFLICT (profile_id) DO NOTHING",
    )
    .bind(profile_id)
    .bind(clientele_runtime::time::now_micros())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn store_cursor(conn: &mut AnyConnection, consumer: &str, cursor: &str) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO consumer_cursors (consumer, cursor, updated_at) VALUES ($1, $2, $3) \
         ON CONFLICT (consumer) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at",
    )
    .bind(consumer)
    .bind(cursor)
    .bind(clientele_runtime::time::now_micros())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

const OFFER_COLUMNS: &str = "offer_id, body, status, version, issued_count, redeemed_count, \
     cost_booked, created_at, updated_at";

fn offer_row(row: &AnyRow) -> StoreResult<OfferRecord> {
    let body: String = row.try_get("body")?;
    Ok(OfferRecord {
        offer: dec(&body)?,
        status: i32::try_from(row.try_get::<i64, _>("status")?).map_err(corrupt)?,
        version: row.try_get("version")?,
        issued: row.try_get("issued_count")?,
        redeemed: row.try_get("redeemed_count")?,
        cost_booked: row.try_get("cost_booked")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// `(max_issued, max_cost, cost_per_issue)` of an offer's budget.
fn budget_columns(offer: &pb::Offer) -> (Option<i64>, Option<i64>, i64) {
    use pb::budget::Limit;
    match offer.budget.as_ref().and_then(|b| b.limit.as_ref()) {
        Some(Limit::MaxIssued(n)) => (Some(*n), None, 0),
        Some(Limit::MaxCost(m)) => (
            None,
            m.limit.as_ref().map(|l| l.amount_minor),
            m.cost_per_issue.as_ref().map_or(0, |c| c.amount_minor),
        ),
        None => (None, None, 0),
    }
}

async fn get_offer_in(conn: &mut AnyConnection, offer_id: &str) -> StoreResult<OfferRecord> {
    let sql = format!("SELECT {OFFER_COLUMNS} FROM offers WHERE offer_id = $1");
    let row = sqlx::query(&sql)
        .bind(offer_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::NotFound("offer", offer_id.to_string()))?;
    offer_row(&row)
}

const ISSUED_COLUMNS: &str =
    "issue_id, status, body, fingerprint, redeem_key, redeem_order_id, valid_until, cost, offer_id";

fn issued_row(row: &AnyRow) -> StoreResult<pb::IssuedOffer> {
    let body: String = row.try_get("body")?;
    let mut issued: pb::IssuedOffer = dec(&body)?;
    issued.status = i32::try_from(row.try_get::<i64, _>("status")?).map_err(corrupt)?;
    Ok(issued)
}

async fn lock_code(
    db: &Database,
    conn: &mut AnyConnection,
    issue_id: Option<&str>,
    code: Option<&str>,
) -> StoreResult<AnyRow> {
    let (sql, arg) = match (issue_id, code) {
        (Some(id), _) => (
            format!("SELECT {ISSUED_COLUMNS} FROM issued_offers WHERE issue_id = $1"),
            id,
        ),
        (None, Some(c)) => (
            format!("SELECT {ISSUED_COLUMNS} FROM issued_offers WHERE code = $1"),
            c,
        ),
        (None, None) => return Err(StoreError::NotFound("code", String::new())),
    };
    let not_found = || {
        StoreError::NotFound(
            if issue_id.is_some() {
                "issued offer"
            } else {
                "code"
            },
            arg.to_string(),
        )
    };
    let row = sqlx::query(&sql)
        .bind(arg)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(not_found)?;
    let id: String = row.try_get("issue_id")?;
    db.lock_keys(&mut *conn, [format!("offers:issue:{id}")])
        .await?;
    // Re-read under the lock.
    let row = sqlx::query(&format!(
        "SELECT {ISSUED_COLUMNS} FROM issued_offers WHERE issue_id = $1"
    ))
    .bind(&id)
    .fetch_one(&mut *conn)
    .await?;
    Ok(row)
}

async fn set_issued(
    conn: &mut AnyConnection,
    issued: &pb::IssuedOffer,
    redeem: Option<(&str, &str)>,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE issued_offers SET status = $1, body = $2, \
         redeem_key = COALESCE($3, redeem_key), redeem_order_id = COALESCE($4, redeem_order_id) \
         WHERE issue_id = $5",
    )
    .bind(i64::from(issued.status))
    .bind(enc(issued))
    .bind(redeem.map(|r| r.0.to_string()))
    .bind(redeem.map(|r| r.1.to_string()))
    .bind(&issued.issue_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn release_budget(conn: &mut AnyConnection, offer_id: &str, cost: i64) -> StoreResult<()> {
    sqlx::query(
        "UPDATE offers SET issued_count = issued_count - 1, cost_booked = cost_booked - $1 \
         WHERE offer_id = $2",
    )
    .bind(cost)
    .bind(offer_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn trigger_row(row: &AnyRow) -> StoreResult<pb::Trigger> {
    let body: String = row.try_get("body")?;
    let mut t: pb::Trigger = dec(&body)?;
    t.create_time = Some(clientele_runtime::time::timestamp(
        row.try_get("created_at")?,
    ));
    t.issued_count = row.try_get("issued_count")?;
    t.skipped_count = row.try_get("skipped_count")?;
    Ok(t)
}

#[async_trait]
impl OfferStore for SqlOfferStore {
    async fn apply_ledger(
        &self,
        profile_id: &str,
        key: &str,
        command: LedgerCommand,
        now: DateTime<Utc>,
        meta: EntryMeta,
        cursor: Option<(&str, &str)>,
    ) -> StoreResult<LedgerOutcome> {
        let mut last_err = None;
        for _ in 0..LEDGER_ATTEMPTS {
            let mut w = self.begin_write().await?;
            let conn: &mut AnyConnection = &mut w.tx;
            self.db
                .lock_keys(&mut *conn, [format!("offers:ledger:{profile_id}")])
                .await?;
            let stored = load_entries(conn, profile_id).await?;
            let mut ledger = PointsLedger::from_entries(stored.iter().map(|s| s.entry.clone()))?;
            let at = stored.last().map_or(now, |s| s.entry.at.max(now));
            let request = LedgerRequest {
                key: IdempotencyKey::new(key),
                at,
                command: command.clone(),
            };
            let next = ledger.next_seq().0;
            let entries = ledger.execute(&request)?;
            let replayed = entries.first().is_some_and(|e| e.seq.0 < next)
                || (entries.is_empty() && stored.iter().any(|s| s.entry.key.0 == key));
            if replayed {
                let seqs: Vec<u64> = entries.iter().map(|e| e.seq.0).collect();
                let original: Vec<StoredEntry> = stored
                    .iter()
                    .filter(|s| seqs.contains(&s.entry.seq.0))
                    .cloned()
                    .collect();
                if let Some((consumer, value)) = cursor {
                    store_cursor(conn, consumer, value).await?;
                }
                w.tx.commit().await?;
                return Ok(LedgerOutcome {
                    entries: original,
                    replayed: true,
                    available: ledger.balance(now.max(at)),
                });
            }
            let available = ledger.balance(at);
            let created_at = at.timestamp_micros();
            let mut written = Vec::with_capacity(entries.len());
            let mut conflict = None;
            for entry in entries {
                let (kind, points) = entry_kind_points(&entry.change);
                let kind = if meta.kind != 0 {
                    meta.kind
                } else {
                    kind as i32
                };
                let s = StoredEntry {
                    entry_id: uuid::Uuid::now_v7().to_string(),
                    profile_id: profile_id.to_string(),
                    order_id: order_of(&entry.change),
                    kind,
                    points,
                    balance_after: available,
                    created_at,
                    meta: meta.clone(),
                    entry,
                };
                let res = sqlx::query(
                    "INSERT INTO ledger_entries (profile_id, seq, entry_id, idem_key, kind, points, \
                     balance_after, created_at, order_id, meta, body) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                )
                .bind(profile_id)
                .bind(i64::try_from(s.entry.seq.0).map_err(corrupt)?)
                .bind(&s.entry_id)
                .bind(key)
                .bind(i64::from(s.kind))
                .bind(s.points)
                .bind(s.balance_after)
                .bind(s.created_at)
                .bind(&s.order_id)
                .bind(serde_json::to_string(&s.meta).map_err(corrupt)?)
                .bind(serde_json::to_string(&s.entry).map_err(corrupt)?)
                .execute(&mut *conn)
                .await;
                match res {
                    Ok(_) => written.push(s),
                    Err(e) if is_unique_violation(&e) => {
                        conflict = Some(e);
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if let Some(e) = conflict {
                last_err = Some(e);
                continue; // dropping `w` rolls back; retry from a fresh read
            }
            if let Some((consumer, value)) = cursor {
                store_cursor(conn, consumer, value).await?;
            }
            w.tx.commit().await?;
            return Ok(LedgerOutcome {
                entries: written,
                replayed: false,
                available,
            });
        }
        Err(last_err.map_or_else(|| corrupt("ledger retries exhausted"), StoreError::Db))
    }

    async fn ledger(&self, profile_id: &str) -> StoreResult<(PointsLedger, Vec<StoredEntry>)> {
        let mut conn = self.db.pool.acquire().await?;
        let stored = load_entries(&mut conn, profile_id).await?;
        let ledger = PointsLedger::from_entries(stored.iter().map(|s| s.entry.clone()))?;
        Ok((ledger, stored))
    }

    async fn cursor(&self, consumer: &str) -> StoreResult<Option<String>> {
        let row = sqlx::query("SELECT cursor FROM consumer_cursors WHERE consumer = $1")
            .bind(consumer)
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(row.map(|r| r.try_get("cursor")).transpose()?)
    }

    async fn set_cursor(&self, consumer: &str, cursor: &str) -> StoreResult<()> {
        let mut w = self.begin_write().await?;
        store_cursor(&mut w.tx, consumer, cursor).await?;
        w.tx.commit().await?;
        Ok(())
    }

    async fn create_offer(&self, record: &OfferRecord) -> StoreResult<(OfferRecord, bool)> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        let (max_issued, max_cost, cost_per_issue) = budget_columns(&record.offer);
        let inserted = sqlx::query(
            "INSERT INTO offers (offer_id, body, status, version, max_issued, max_cost, \
             cost_per_issue, created_at, updated_at) VALUES ($1, $2, $3, 1, $4, $5, $6, $7, $7) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&record.offer.offer_id)
        .bind(enc(&record.offer))
        .bind(i64::from(record.status))
        .bind(max_issued)
        .bind(max_cost)
        .bind(cost_per_issue)
        .bind(record.created_at)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        let stored = get_offer_in(conn, &record.offer.offer_id).await?;
        w.tx.commit().await?;
        if inserted == 1 {
            return Ok((stored, true));
        }
        if stored.offer == record.offer && stored.status == record.status {
            Ok((stored, false))
        } else {
            Err(StoreError::AlreadyExists(
                "offer",
                record.offer.offer_id.clone(),
            ))
        }
    }

    async fn get_offer(&self, offer_id: &str) -> StoreResult<OfferRecord> {
        let mut conn = self.db.pool.acquire().await?;
        get_offer_in(&mut conn, offer_id).await
    }

    async fn list_offers(
        &self,
        statuses: &[i32],
        after: &str,
        limit: i64,
    ) -> StoreResult<Vec<OfferRecord>> {
        let sql =
            format!("SELECT {OFFER_COLUMNS} FROM offers WHERE offer_id > $1 ORDER BY offer_id");
        let rows = sqlx::query(&sql)
            .bind(after)
            .fetch_all(&self.db.pool)
            .await?;
        let mut out = Vec::new();
        for row in &rows {
            let r = offer_row(row)?;
            if statuses.is_empty() || statuses.contains(&r.status) {
                out.push(r);
                if i64::try_from(out.len()).unwrap_or(i64::MAX) >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    async fn update_offer(
        &self,
        offer: &pb::Offer,
        status: i32,
        based_on: i64,
        now: i64,
    ) -> StoreResult<OfferRecord> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        let (max_issued, max_cost, cost_per_issue) = budget_columns(offer);
        let changed = sqlx::query(
            "UPDATE offers SET body = $1, status = $2, version = version + 1, updated_at = $3, \
             max_issued = $4, max_cost = $5, cost_per_issue = $6 WHERE offer_id = $7 AND version = $8",
        )
        .bind(enc(offer))
        .bind(i64::from(status))
        .bind(now)
        .bind(max_issued)
        .bind(max_cost)
        .bind(cost_per_issue)
        .bind(&offer.offer_id)
        .bind(based_on)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        let stored = get_offer_in(conn, &offer.offer_id).await?;
        if changed == 0 {
            return Err(StoreError::VersionConflict {
                id: offer.offer_id.clone(),
                actual: stored.version,
            });
        }
        w.tx.commit().await?;
        Ok(stored)
    }

    async fn archive_offer(
        &self,
        offer_id: &str,
        cancel_outstanding: bool,
        now: i64,
    ) -> StoreResult<(OfferRecord, i64)> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        let archived = pb::OfferStatus::Archived as i64;
        sqlx::query(
            "UPDATE offers SET status = $1, version = version + 1, updated_at = $2 \
             WHERE offer_id = $3 AND status <> $1",
        )
        .bind(archived)
        .bind(now)
        .bind(offer_id)
        .execute(&mut *conn)
        .await?;
        let mut cancelled = 0;
        if cancel_outstanding {
            let rows = sqlx::query(&format!(
                "SELECT {ISSUED_COLUMNS} FROM issued_offers WHERE offer_id = $1 AND status = $2 \
                 AND valid_until > $3"
            ))
            .bind(offer_id)
            .bind(pb::IssuedOfferStatus::Issued as i64)
            .bind(now)
            .fetch_all(&mut *conn)
            .await?;
            for row in &rows {
                let mut issued = issued_row(row)?;
                let cost: i64 = row.try_get("cost")?;
                issued.status = pb::IssuedOfferStatus::Cancelled as i32;
                issued.cancelled_at = Some(clientele_runtime::time::timestamp(now));
                issued.cancel_reason = "offer archived".into();
                set_issued(conn, &issued, None).await?;
                release_budget(conn, offer_id, cost).await?;
                cancelled += 1;
            }
        }
        let stored = get_offer_in(conn, offer_id).await?;
        w.tx.commit().await?;
        Ok((stored, cancelled))
    }

    async fn issue(&self, issue: &NewIssue) -> StoreResult<(pb::IssuedOffer, bool)> {
        let issued = &issue.issued;
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        self.db
            .lock_keys(
                &mut *conn,
                [
                    format!("offers:profile:{}", issued.profile_id),
                    format!("offers:key:{}", issue.idem_key),
                ],
            )
            .await?;
        let existing = sqlx::query(&format!(
            "SELECT {ISSUED_COLUMNS} FROM issued_offers WHERE idem_key = $1"
        ))
        .bind(&issue.idem_key)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(row) = existing {
            let fp: String = row.try_get("fingerprint")?;
            if fp != issue.fingerprint {
                return Err(StoreError::IdempotencyConflict(issue.idem_key.clone()));
            }
            return Ok((issued_row(&row)?, true));
        }
        let cancelled = pb::IssuedOfferStatus::Cancelled as i64;
        if let Some(cap) = issue.per_profile_cap {
            let held: i64 = sqlx::query(
                "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM issued_offers \
                 WHERE profile_id = $1 AND offer_id = $2 AND status <> $3",
            )
            .bind(&issued.profile_id)
            .bind(&issued.offer_id)
            .bind(cancelled)
            .fetch_one(&mut *conn)
            .await?
            .try_get("n")?;
            if held >= cap {
                return Err(StoreError::Refused(IssueRefusal::ProfileCap));
            }
        }
        if let Some((max, since)) = issue.frequency_cap {
            let recent: i64 = sqlx::query(
                "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM issued_offers \
                 WHERE profile_id = $1 AND status <> $2 AND issued_at > $3",
            )
            .bind(&issued.profile_id)
            .bind(cancelled)
            .bind(since)
            .fetch_one(&mut *conn)
            .await?
            .try_get("n")?;
            if recent >= max {
                return Err(StoreError::Refused(IssueRefusal::FrequencyCap));
            }
        }
        // Book the budget: the row lock taken by the UPDATE makes concurrent issuers wait and
        // re-evaluate the condition against the committed counters.
        let booked = sqlx::query(
            "UPDATE offers SET issued_count = issued_count + 1, \
             cost_booked = cost_booked + cost_per_issue \
             WHERE offer_id = $1 AND status = $2 \
             AND (max_issued IS NULL OR issued_count < max_issued) \
             AND (max_cost IS NULL OR cost_booked + cost_per_issue <= max_cost)",
        )
        .bind(&issued.offer_id)
        .bind(pb::OfferStatus::Active as i64)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if booked == 0 {
            let offer = get_offer_in(conn, &issued.offer_id).await?;
            let refusal = if offer.status == pb::OfferStatus::Active as i32 {
                IssueRefusal::Budget
            } else {
                IssueRefusal::NotActive
            };
            return Err(StoreError::Refused(refusal));
        }
        let cost: i64 = sqlx::query("SELECT cost_per_issue FROM offers WHERE offer_id = $1")
            .bind(&issued.offer_id)
            .fetch_one(&mut *conn)
            .await?
            .try_get("cost_per_issue")?;
        let issued_at = issued.issued_at.as_ref().map_or(0, |t| {
            clientele_runtime::time::micros(t).unwrap_or_default()
        });
        let valid_until = issued.valid_until.as_ref().map_or(i64::MAX, |t| {
            clientele_runtime::time::micros(t).unwrap_or(i64::MAX)
        });
        sqlx::query(
            "INSERT INTO issued_offers (issue_id, code, offer_id, offer_version, profile_id, status, \
             idem_key, fingerprint, cost, issued_at, valid_until, body) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&issued.issue_id)
        .bind(&issued.code)
        .bind(&issued.offer_id)
        .bind(issued.offer_version)
        .bind(&issued.profile_id)
        .bind(i64::from(issued.status))
        .bind(&issue.idem_key)
        .bind(&issue.fingerprint)
        .bind(cost)
        .bind(issued_at)
        .bind(valid_until)
        .bind(enc(issued))
        .execute(&mut *conn)
        .await?;
        w.tx.commit().await?;
        Ok((issued.clone(), false))
    }

    async fn redeem(&self, r: &RedeemCode) -> StoreResult<(pb::IssuedOffer, bool)> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        let row = lock_code(&self.db, conn, None, Some(&r.code)).await?;
        let mut issued = issued_row(&row)?;
        let valid_until: i64 = row.try_get("valid_until")?;
        let offer_id: String = row.try_get("offer_id")?;
        use pb::IssuedOfferStatus as S;
        match S::try_from(issued.status).unwrap_or(S::Unspecified) {
            S::Redeemed => {
                let key: Option<String> = row.try_get("redeem_key")?;
                let order: Option<String> = row.try_get("redeem_order_id")?;
                let same_key = key.as_deref() == Some(r.idem_key.as_str());
                let same_order =
                    !r.order_id.is_empty() && order.as_deref() == Some(r.order_id.as_str());
                if same_key || same_order {
                    return Ok((issued, true));
                }
                return Err(StoreError::Precondition(format!(
                    "code `{}` was already redeemed",
                    r.code
                )));
            }
            S::Cancelled => {
                return Err(StoreError::Precondition(format!(
                    "code `{}` is cancelled",
                    r.code
                )));
            }
            _ => {}
        }
        if valid_until <= r.now {
            return Err(StoreError::Precondition(format!(
                "code `{}` expired",
                r.code
            )));
        }
        issued.status = S::Redeemed as i32;
        issued.redemption = Some(r.redemption.clone());
        set_issued(conn, &issued, Some((&r.idem_key, &r.order_id))).await?;
        sqlx::query("UPDATE offers SET redeemed_count = redeemed_count + 1 WHERE offer_id = $1")
            .bind(&offer_id)
            .execute(&mut *conn)
            .await?;
        w.tx.commit().await?;
        Ok((issued, false))
    }

    async fn cancel(
        &self,
        issue_id: Option<&str>,
        code: Option<&str>,
        reason: &str,
        now: i64,
    ) -> StoreResult<pb::IssuedOffer> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        let row = lock_code(&self.db, conn, issue_id, code).await?;
        let mut issued = issued_row(&row)?;
        let valid_until: i64 = row.try_get("valid_until")?;
        let cost: i64 = row.try_get("cost")?;
        let offer_id: String = row.try_get("offer_id")?;
        use pb::IssuedOfferStatus as S;
        match S::try_from(issued.status).unwrap_or(S::Unspecified) {
            S::Cancelled => return Ok(issued),
            S::Redeemed => {
                return Err(StoreError::Precondition(
                    "the code was already redeemed".into(),
                ));
            }
            _ if valid_until <= now => {
                return Err(StoreError::Precondition("the code has expired".into()));
            }
            _ => {}
        }
        issued.status = S::Cancelled as i32;
        issued.cancelled_at = Some(clientele_runtime::time::timestamp(now));
        issued.cancel_reason = reason.to_string();
        set_issued(conn, &issued, None).await?;
        release_budget(conn, &offer_id, cost).await?;
        w.tx.commit().await?;
        Ok(issued)
    }

    async fn peek_code(&self, code: &str) -> StoreResult<Option<CodeOwner>> {
        let row = sqlx::query("SELECT profile_id, offer_id FROM issued_offers WHERE code = $1")
            .bind(code)
            .fetch_optional(&self.db.pool)
            .await?;
        row.map(|r| {
            Ok(CodeOwner {
                profile_id: r.try_get("profile_id")?,
                offer_id: r.try_get("offer_id")?,
            })
        })
        .transpose()
    }

    async fn find_issue(&self, idem_key: &str) -> StoreResult<Option<(pb::IssuedOffer, String)>> {
        let row = sqlx::query(&format!(
            "SELECT {ISSUED_COLUMNS} FROM issued_offers WHERE idem_key = $1"
        ))
        .bind(idem_key)
        .fetch_optional(&self.db.pool)
        .await?;
        row.map(|r| Ok((issued_row(&r)?, r.try_get("fingerprint")?)))
            .transpose()
    }

    async fn list_issued(
        &self,
        profile_id: &str,
        offset: i64,
        limit: i64,
    ) -> StoreResult<Vec<pb::IssuedOffer>> {
        let rows = sqlx::query(&format!(
            "SELECT {ISSUED_COLUMNS} FROM issued_offers WHERE profile_id = $1 \
             ORDER BY issued_at DESC, issue_id DESC LIMIT $2 OFFSET $3"
        ))
        .bind(profile_id)
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter().map(issued_row).collect()
    }

    async fn profile_usage(
        &self,
        profile_id: &str,
    ) -> StoreResult<(HashMap<String, u32>, Vec<i64>)> {
        let rows = sqlx::query(
            "SELECT offer_id, issued_at FROM issued_offers WHERE profile_id = $1 AND status <> $2",
        )
        .bind(profile_id)
        .bind(pb::IssuedOfferStatus::Cancelled as i64)
        .fetch_all(&self.db.pool)
        .await?;
        let mut per_offer: HashMap<String, u32> = HashMap::new();
        let mut times = Vec::with_capacity(rows.len());
        for row in &rows {
            *per_offer.entry(row.try_get("offer_id")?).or_default() += 1;
            times.push(row.try_get("issued_at")?);
        }
        Ok((per_offer, times))
    }

    async fn create_trigger(&self, trigger: &pb::Trigger) -> StoreResult<(pb::Trigger, bool)> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        let now = clientele_runtime::time::now_micros();
        let inserted = sqlx::query(
            "INSERT INTO triggers (trigger_id, offer_id, body, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&trigger.trigger_id)
        .bind(&trigger.offer_id)
        .bind(enc(trigger))
        .bind(now)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        let row = sqlx::query(
            "SELECT body, created_at, issued_count, skipped_count, deleted FROM triggers WHERE trigger_id = $1",
        )
        .bind(&trigger.trigger_id)
        .fetch_one(&mut *conn)
        .await?;
        w.tx.commit().await?;
        let stored = trigger_row(&row)?;
        let body: String = row.try_get("body")?;
        if inserted == 1 {
            Ok((stored, true))
        } else if body == enc(trigger) {
            Ok((stored, false))
        } else {
            Err(StoreError::AlreadyExists(
                "trigger",
                trigger.trigger_id.clone(),
            ))
        }
    }

    async fn list_triggers(
        &self,
        offer_id: &str,
        after: &str,
        limit: i64,
    ) -> StoreResult<Vec<pb::Trigger>> {
        let rows = sqlx::query(
            "SELECT body, created_at, issued_count, skipped_count FROM triggers \
             WHERE deleted = 0 AND trigger_id > $1 AND ($2 = '' OR offer_id = $2) \
             ORDER BY trigger_id LIMIT $3",
        )
        .bind(after)
        .bind(offer_id)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter().map(trigger_row).collect()
    }

    async fn delete_trigger(&self, trigger_id: &str) -> StoreResult<()> {
        let mut w = self.begin_write().await?;
        let n = sqlx::query("UPDATE triggers SET deleted = 1 WHERE trigger_id = $1")
            .bind(trigger_id)
            .execute(&mut *w.tx)
            .await?
            .rows_affected();
        w.tx.commit().await?;
        if n == 0 {
            return Err(StoreError::NotFound("trigger", trigger_id.to_string()));
        }
        Ok(())
    }

    async fn claim_firing(
        &self,
        trigger_id: &str,
        source_key: &str,
        profile_id: &str,
        now: i64,
    ) -> StoreResult<bool> {
        let mut w = self.begin_write().await?;
        let n = sqlx::query(
            "INSERT INTO trigger_firings (trigger_id, source_key, profile_id, fired_at) \
             SELECT $1, $2, $3, $4 WHERE EXISTS \
             (SELECT 1 FROM triggers WHERE trigger_id = $5 AND deleted = 0) \
             ON CONFLICT DO NOTHING",
        )
        .bind(trigger_id)
        .bind(source_key)
        .bind(profile_id)
        .bind(now)
        .bind(trigger_id)
        .execute(&mut *w.tx)
        .await?
        .rows_affected();
        w.tx.commit().await?;
        Ok(n == 1)
    }

    async fn finish_firing(
        &self,
        trigger_id: &str,
        source_key: &str,
        issue_id: Option<&str>,
    ) -> StoreResult<()> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        sqlx::query(
            "UPDATE trigger_firings SET issue_id = $1 WHERE trigger_id = $2 AND source_key = $3",
        )
        .bind(issue_id.map(str::to_string))
        .bind(trigger_id)
        .bind(source_key)
        .execute(&mut *conn)
        .await?;
        let sql = if issue_id.is_some() {
            "UPDATE triggers SET issued_count = issued_count + 1 WHERE trigger_id = $1"
        } else {
            "UPDATE triggers SET skipped_count = skipped_count + 1 WHERE trigger_id = $1"
        };
        sqlx::query(sql)
            .bind(trigger_id)
            .execute(&mut *conn)
            .await?;
        w.tx.commit().await?;
        Ok(())
    }

    async fn activity(&self, profile_id: &str) -> StoreResult<Vec<EarnActivity>> {
        let rows = sqlx::query(
            "SELECT activity_key, occurred_at, spend_minor, points FROM earn_activity \
             WHERE profile_id = $1 ORDER BY occurred_at, activity_key",
        )
        .bind(profile_id)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(EarnActivity {
                    key: r.try_get("activity_key")?,
                    at: crate::convert::utc(r.try_get("occurred_at")?),
                    spend_minor: r.try_get("spend_minor")?,
                    points: r.try_get("points")?,
                })
            })
            .collect()
    }

    async fn record_activity(
        &self,
        profile_id: &str,
        activity: &EarnActivity,
    ) -> StoreResult<bool> {
        let mut w = self.begin_write().await?;
        let done = sqlx::query(
            "INSERT INTO earn_activity (profile_id, activity_key, occurred_at, spend_minor, points) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (profile_id, activity_key) DO NOTHING",
        )
        .bind(profile_id)
        .bind(&activity.key)
        .bind(activity.at.timestamp_micros())
        .bind(activity.spend_minor)
        .bind(activity.points)
        .execute(&mut *w.tx)
        .await?;
        w.tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    async fn erase_profile(
        &self,
        profile_id: &str,
        cursor: Option<(&str, &str)>,
    ) -> StoreResult<ErasureOutcome> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        // Profiles merged into this one left their history (their ledger up to the merge)
        // under their own ids: the person's erasure covers them too.
        let mut ids = vec![profile_id.to_string()];
        ids.extend(merged_into(conn, profile_id).await?);
        self.db
            .lock_keys(&mut *conn, ids.iter().map(|p| format!("offers:ledger:{p}")))
            .await?;
        let mut out = ErasureOutcome::default();
        for id in &ids {
            erase_one(conn, id, &mut out).await?;
        }
        sqlx::query("DELETE FROM merged_profiles WHERE survivor_id = $1 OR loser_id = $2")
            .bind(profile_id)
            .bind(profile_id)
            .execute(&mut *conn)
            .await?;
        for id in &ids[1..] {
            sqlx::query("DELETE FROM merged_profiles WHERE loser_id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?;
        }
        if let Some((consumer, value)) = cursor {
            store_cursor(conn, consumer, value).await?;
        }
        w.tx.commit().await?;
        Ok(out)
    }

    async fn merge_profiles(
        &self,
        survivor: &str,
        losers: &[String],
        cursor: Option<(&str, &str)>,
    ) -> StoreResult<MergeOutcome> {
        let mut w = self.begin_write().await?;
        let conn: &mut AnyConnection = &mut w.tx;
        let losers: Vec<&String> = losers
            .iter()
            .filter(|l| !l.is_empty() && l.as_str() != survivor)
            .collect();
        self.db
            .lock_keys(
                &mut *conn,
                std::iter::once(survivor)
                    .chain(losers.iter().map(|l| l.as_str()))
                    .map(|p| format!("offers:ledger:{p}")),
            )
            .await?;
        let mut out = MergeOutcome::default();
        let now = Utc::now();
        for loser in losers {
            let key = IdempotencyKey::new(format!("merge:{loser}"));
            let stored = load_entries(conn, loser).await?;
            let ledger = PointsLedger::from_entries(stored.iter().map(|s| s.entry.clone()))?;
            let at = stored.last().map_or(now, |s| s.entry.at.max(now));
            let (out_entries, moved) = match ledger.merge_out(&key, at, survivor) {
                Ok(r) => r,
                // Merged into another survivor before: that merge stands.
                Err(LedgerError::MergedAway { into }) => {
                    tracing::warn!(loser = %loser, into = %into, "profile was merged before");
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if out_entries.is_empty() {
                continue; // replay: moved before
            }
            let points = ledger.balance(at);
            // Statements show the move as an adjustment naming the other profile.
            let meta = |note: String| EntryMeta {
                adjustment_reason: pb::AdjustmentReason::Other as i32,
                note,
                actor: "profile-merge".into(),
                ..EntryMeta::default()
            };
            insert_entries(
                conn,
                loser,
                out_entries,
                0,
                &meta(format!("merged into profile {survivor}")),
            )
            .await?;
            let s_stored = load_entries(conn, survivor).await?;
            let mut s_ledger =
                PointsLedger::from_entries(s_stored.iter().map(|s| s.entry.clone()))?;
            let in_entries = s_ledger.merge_in(&key, now, loser, &moved);
            let s_at = in_entries.first().map_or(now, |e| e.at);
            s_ledger.record(in_entries.iter().cloned())?;
            let available = s_ledger.balance(s_at);
            out.batches += in_entries.len() as u64;
            insert_entries(
                conn,
                survivor,
                in_entries,
                available,
                &meta(format!("merged from profile {loser}")),
            )
            .await?;
            out.points += points;
            out.merged += 1;
            out.activity += sqlx::query(
                "UPDATE earn_activity SET profile_id = $1 WHERE profile_id = $2 AND activity_key \
                 NOT IN (SELECT activity_key FROM earn_activity WHERE profile_id = $3)",
            )
            .bind(survivor)
            .bind(loser)
            .bind(survivor)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            sqlx::query("DELETE FROM earn_activity WHERE profile_id = $1")
                .bind(loser)
                .execute(&mut *conn)
                .await?;
            out.issued_offers +=
                sqlx::query("UPDATE issued_offers SET profile_id = $1 WHERE profile_id = $2")
                    .bind(survivor)
                    .bind(loser)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
            sqlx::query("UPDATE trigger_firings SET profile_id = $1 WHERE profile_id = $2")
                .bind(survivor)
                .bind(loser)
                .execute(&mut *conn)
                .await?;
            sqlx::query(
                "INSERT INTO merged_profiles (loser_id, survivor_id, merged_at) \
                 VALUES ($1, $2, $3) ON CONFLICT (loser_id) DO NOTHING",
            )
            .bind(loser.as_str())
            .bind(survivor)
            .bind(now.timestamp_micros())
            .execute(&mut *conn)
            .await?;
        }
        if let Some((consumer, value)) = cursor {
            store_cursor(conn, consumer, value).await?;
        }
        w.tx.commit().await?;
        Ok(out)
    }

    async fn survivor_of(&self, profile_id: &str) -> StoreResult<Option<String>> {
        let mut conn = self.db.pool.acquire().await?;
        survivor_in(&mut conn, profile_id).await
    }

    async fn is_erased(&self, profile_id: &str) -> StoreResult<bool> {
        let row = sqlx::query("SELECT 1 AS x FROM erased_profiles WHERE profile_id = $1")
            .bind(profile_id)
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(row.is_some())
    }
}
