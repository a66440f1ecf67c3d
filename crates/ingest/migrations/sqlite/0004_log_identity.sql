-- The identity of this event log as a feed of aggregate deltas (see the PostgreSQL migration):
-- random, made once here.
CREATE TABLE log_identity (
    feed       TEXT   PRIMARY KEY,
    created_at BIGINT NOT NULL
);
INSERT INTO log_identity (feed, created_at)
VALUES ('ingest-log:' || lower(hex(randomblob(16))),
        CAST(strftime('%s', 'now') AS INTEGER) * 1000000);
