-- Positions of ordered delta feeds (ApplyAggregatesRequest.feed, e.g. one ingest event log):
-- a positioned delta counts iff its position is above the feed's stored position, which the
-- same transaction raises to the call's highest (see the PostgreSQL migration; SQLite runs the
-- store's generic statements, with writers serialised).
CREATE TABLE feed_positions (
    feed       TEXT PRIMARY KEY,
    position   BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
