-- IngestService schema (embedded SQLite, `ingest.db`). Times are microseconds since the Unix
-- epoch (BIGINT), as in every Clientele service.

-- Deduplication keys: one row per accepted (source, event_id), kept for the dedup window.
CREATE TABLE event_keys (
    source       TEXT   NOT NULL,
    event_id     TEXT   NOT NULL,
    payload_hash BLOB   NOT NULL,
    profile_id   TEXT   NOT NULL,
    accepted_at  BIGINT NOT NULL,
    PRIMARY KEY (source, event_id)
);
CREATE INDEX event_keys_accepted_at ON event_keys (accepted_at);

-- The append-only event log; `seq` is the log order (assigned under a lock, so it is also the
-- commit order that WatchEvents cursors rely on).
CREATE TABLE events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    source      TEXT   NOT NULL,
    event_id    TEXT   NOT NULL,
    profile_id  TEXT   NOT NULL,
    kind        BIGINT NOT NULL,
    custom_name TEXT,
    occurred_at BIGINT NOT NULL,
    ingested_at BIGINT NOT NULL,
    body        BLOB   NOT NULL,
    redacted    TEXT   NOT NULL
);
CREATE INDEX events_profile_time ON events (profile_id, occurred_at, seq);

-- The first ORDER_COMPLETED per order id (it alone counts) and the first full refund per order.
CREATE TABLE orders (
    order_id   TEXT   PRIMARY KEY,
    event_key  TEXT   NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE full_refunds (
    order_id  TEXT PRIMARY KEY,
    event_key TEXT NOT NULL
);

-- Aggregate deltas waiting for ProfileService.ApplyAggregates. ready: 0 = a refund waiting for
-- its order, 1 = deliverable, 2 = refused by ProfileService as invalid (kept for inspection).
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key TEXT   NOT NULL,
    delta           BLOB   NOT NULL,
    ready           BIGINT NOT NULL,
    order_id        TEXT,
    created_at      BIGINT NOT NULL
);
CREATE INDEX outbox_ready ON outbox (ready, id);
CREATE INDEX outbox_waiting_order ON outbox (order_id) WHERE ready = 0;

-- IngestStream producers: the highest durable batch sequence, and each batch's result.
CREATE TABLE producers (
    producer_id   TEXT   PRIMARY KEY,
    last_sequence BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE TABLE stream_batches (
    producer_id TEXT   NOT NULL,
    sequence    BIGINT NOT NULL,
    result      BLOB   NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (producer_id, sequence)
);
CREATE INDEX stream_batches_created_at ON stream_batches (created_at);
