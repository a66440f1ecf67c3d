//! Plain records the store reads and writes; the service converts them to and from protobuf.
//! Times are microseconds since the Unix epoch; money is integer minor units.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A typed trait value as stored (JSON, externally tagged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraitValue {
    /// UTF-8 text, at most 1024 bytes.
    String(String),
    /// Signed integer.
    Int(i64),
    /// Finite double.
    Double(f64),
    /// Boolean.
    Bool(bool),
    /// Point in time, µs since the epoch.
    Timestamp(i64),
}

/// A trait and when it was last set (merges keep the most recently set value per name).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraitRecord {
    /// The value.
    pub value: TraitValue,
    /// When it was set, µs.
    pub updated_at: i64,
}

/// One consent decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsentRecord {
    /// `clientele.v1.ConsentPurpose` code.
    pub purpose: i64,
    /// `clientele.v1.ConsentStatus` code.
    pub status: i64,
    /// When the customer decided, µs.
    pub decided_at: i64,
    /// Where it was captured.
    pub source: String,
}

/// Spend in one currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpendRecord {
    /// ISO 4217 code.
    pub currency: String,
    /// Gross order value, minor units.
    pub gross_minor: i64,
    /// Refunded value, minor units.
    pub refunded_minor: i64,
}

/// A stored identifier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdentifierRecord {
    /// `clientele.v1.IdentifierType` code.
    pub id_type: i64,
    /// Namespace of custom ids.
    pub namespace: String,
    /// Raw value, or keyed hash for emails and phones.
    pub stored_value: String,
    /// When first linked, µs.
    pub first_seen_at: i64,
}

/// The single customer view as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProfileRecord {
    /// Profile id (UUID text).
    pub id: String,
    /// Profiles merged into this one.
    pub merged_ids: Vec<String>,
    /// Linked identifiers.
    pub identifiers: Vec<IdentifierRecord>,
    /// Traits by name.
    pub traits: BTreeMap<String, TraitRecord>,
    /// Latest consent decision per purpose.
    pub consents: Vec<ConsentRecord>,
    /// Earliest completed order, µs.
    pub first_order_at: Option<i64>,
    /// Latest completed order, µs.
    pub last_order_at: Option<i64>,
    /// Latest event of any kind, µs.
    pub last_seen_at: Option<i64>,
    /// Completed orders.
    pub order_count: i64,
    /// Refunds.
    pub refund_count: i64,
    /// Spend per currency, sorted by currency.
    pub spend: Vec<SpendRecord>,
    /// Engagement counters by event kind: the profile row's built-in counters that are not
    /// zero plus the `engagement` table's rows (see [`crate::row_engagement`]).
    pub engagement: BTreeMap<String, i64>,
    /// Created, µs.
    pub created_at: i64,
    /// Last changed, µs.
    pub updated_at: i64,
    /// Incremented on every write.
    pub version: i64,
}

/// Result of resolving one identifier set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResolveOutcome {
    /// The surviving profile; empty when `erased`.
    pub profile_id: String,
    /// The profile was created by this call.
    pub created: bool,
    /// Profiles merged into `profile_id` by this call.
    pub merged: Vec<String>,
    /// Indexes (in the request set) of identifiers refused by the over-merge guard.
    pub refused: Vec<usize>,
    /// An identifier belongs to an erased person; nothing was written.
    pub erased: bool,
    /// The survivor's version after the call, when the call wrote.
    pub version: Option<i64>,
}

/// Aggregate changes of one event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AggregateDelta {
    /// Idempotency key (event id).
    pub key: String,
    /// Profile id.
    pub profile_id: String,
    /// When the event happened, µs.
    pub occurred_at: i64,
    /// Orders to add (1 for a completed order, -1 to reverse one).
    pub orders: i64,
    /// Refunds to add.
    pub refunds: i64,
    /// Gross spend to add: currency and minor units.
    pub gross: Option<(String, i64)>,
    /// Refunded value to add: currency and minor units.
    pub refunded: Option<(String, i64)>,
    /// Engagement counter increments.
    pub engagement: Vec<(String, i64)>,
    /// Position in its feed (0 = none); see [`crate::ProfileStore::apply_feed_aggregates`].
    pub position: i64,
}

/// Counts of one `apply_aggregates` call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApplyOutcome {
    /// Deltas applied now.
    pub applied: u32,
    /// Deltas whose key was already applied.
    pub duplicates: u32,
    /// Deltas for missing or erased profiles.
    pub unknown_profiles: u32,
    /// Profiles written, with their new versions.
    pub touched: Vec<(String, i64)>,
}

/// Result of an erasure.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EraseOutcome {
    /// Identifiers tombstoned.
    pub identifiers_tombstoned: u32,
    /// When the person was erased, µs.
    pub erased_at: i64,
    /// The erased profile and its aliases (for cache invalidation).
    pub profile_ids: Vec<String>,
}

/// Kinds of profile change, with `clientele.v1.ProfileChangeKind` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Created.
    Created = 1,
    /// Updated.
    Updated = 2,
    /// Merged.
    Merged = 3,
    /// Erased.
    Erased = 4,
}

/// One entry of the changes feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRecord {
    /// Monotonic sequence number, in commit order.
    pub seq: i64,
    /// The changed (surviving) profile.
    pub profile_id: String,
    /// `ChangeKind` code.
    pub kind: i64,
    /// Ids merged in, for merges.
    pub merged_ids: Vec<String>,
    /// When, µs.
    pub changed_at: i64,
}
