-- Feeds consumed by the ExperimentService: IngestService.WatchEvents (event-derived
-- conversions) and ProfileService.WatchChanges (merges and erasures). Each batch is applied
-- with its new cursor in one transaction (compare-and-set on the stored cursor).
CREATE TABLE feed_cursors (
    feed   TEXT PRIMARY KEY,
    feed_cursor TEXT NOT NULL
);

-- Profile ids merged away -> the surviving profile id (kept flat: a survivor is never an
-- alias). Results attribute exposures and conversions through it, so a person is one unit.
CREATE TABLE unit_aliases (
    alias_id    TEXT PRIMARY KEY,
    survivor_id TEXT NOT NULL
);
CREATE INDEX unit_aliases_survivor ON unit_aliases (survivor_id);

-- Orders seen on the ingest feed (first ORDER_COMPLETED per order id wins), so a refund can
-- reduce its order's revenue at the order's time and for the order's unit.
CREATE TABLE event_orders (
    order_id    TEXT PRIMARY KEY,
    profile_id  TEXT NOT NULL,
    occurred_at BIGINT NOT NULL,
    currency    TEXT NOT NULL
);
CREATE INDEX event_orders_profile ON event_orders (profile_id);

-- Refunds whose order has not been seen yet; applied when it is.
CREATE TABLE pending_refunds (
    idempotency_key TEXT PRIMARY KEY,
    order_id        TEXT NOT NULL,
    amount_minor    BIGINT NOT NULL,
    currency        TEXT NOT NULL
);
CREATE INDEX pending_refunds_order ON pending_refunds (order_id);

-- Erased profile ids: events of theirs still in flight on the ingest feed are dropped.
CREATE TABLE erased_profiles (
    profile_id TEXT PRIMARY KEY,
    erased_at  BIGINT NOT NULL
);

CREATE INDEX exposures_profile ON exposures (profile_id);
CREATE INDEX exposures_unit ON exposures (unit_id);
CREATE INDEX conversion_units_any_unit ON conversion_units (unit_id);
