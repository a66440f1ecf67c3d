-- Erasure (GDPR art. 17): ingest follows ProfileService.WatchChanges and deletes the stored
-- events of erased people, including those stored under ids later merged into them.

-- Ids merged into another profile (from MERGED changes), flattened to the current survivor.
CREATE TABLE profile_aliases (
    alias_id    TEXT PRIMARY KEY,
    survivor_id TEXT NOT NULL
);
CREATE INDEX profile_aliases_survivor ON profile_aliases (survivor_id);

-- Erased profile ids (and the ids merged into them). A commit never stores an event for one
-- of these, so an event resolved just before the erasure and committed after it is dropped.
CREATE TABLE erased_profiles (
    profile_id TEXT   PRIMARY KEY,
    erased_at  BIGINT NOT NULL
);

-- Durable cursors of the feeds ingest consumes, saved in the same transaction as their effect.
CREATE TABLE feed_cursors (
    feed       TEXT   PRIMARY KEY,
    position   BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
