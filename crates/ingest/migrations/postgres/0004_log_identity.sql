-- The identity of this event log as a feed of aggregate deltas: the forwarder sends it as
-- ApplyAggregatesRequest.feed with each delta's `seq` as its position, and ProfileService
-- counts a delta iff its position is above the one it stored for this feed. Random, made once
-- here, so two ingest databases sent to one ProfileService never share positions. A copy of
-- this database that will forward on its own (a restore of the ingest schema alone to an
-- older point, a clone) must get a new identity first: see the README (Backup, restore).
CREATE TABLE log_identity (
    feed       TEXT   PRIMARY KEY,
    created_at BIGINT NOT NULL
);
INSERT INTO log_identity (feed, created_at)
VALUES ('ingest-log:' || gen_random_uuid()::text,
        (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT);
