-- The event log carries its own dedup key and aggregate delta; see the PostgreSQL migration of
-- the same number for the meaning of each column (SQLite commits one at a time behind the
-- store's writer lock, so `seq` is commit order too).
ALTER TABLE events ADD COLUMN payload_hash BLOB;
ALTER TABLE events ADD COLUMN delta BLOB;

UPDATE events SET payload_hash = (
    SELECT k.payload_hash FROM event_keys k
    WHERE k.source = events.source AND k.event_id = events.event_id)
WHERE seq IN (SELECT MAX(seq) FROM events GROUP BY source, event_id);

CREATE UNIQUE INDEX events_key ON events (source, event_id) WHERE payload_hash IS NOT NULL;
DROP TABLE event_keys;

INSERT INTO feed_cursors (feed, position, updated_at)
SELECT 'aggregates', COALESCE(MAX(seq), 0), 0 FROM events WHERE true
ON CONFLICT (feed) DO NOTHING;
INSERT INTO feed_cursors (feed, position, updated_at) VALUES ('dedup_keys', 0, 0)
ON CONFLICT (feed) DO NOTHING;
