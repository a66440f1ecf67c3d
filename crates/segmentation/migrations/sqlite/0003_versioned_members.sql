-- Issue #4: versioned memberships (see the PostgreSQL migration 0003 for the model). A row is
-- valid from `from_version` (inclusive) to `to_version` (exclusive; NULL while current); a
-- published run's snapshot is the rows valid at its `member_version`. Run scores stay in
-- seg_run_scores (one table: SQLite has no partitions).
CREATE TABLE seg_memberships_versioned (
    segment_id    TEXT NOT NULL,
    profile_id    TEXT NOT NULL,
    cluster_index BIGINT NOT NULL,
    distance      DOUBLE PRECISION,
    entered_at    BIGINT NOT NULL,
    from_version  BIGINT NOT NULL DEFAULT 0,
    to_version    BIGINT,
    PRIMARY KEY (segment_id, profile_id, from_version)
);
INSERT INTO seg_memberships_versioned (segment_id, profile_id, cluster_index, distance, entered_at)
SELECT segment_id, profile_id, cluster_index, distance, entered_at FROM seg_memberships;
DROP TABLE seg_memberships;
ALTER TABLE seg_memberships_versioned RENAME TO seg_memberships;
CREATE INDEX seg_memberships_by_profile ON seg_memberships (profile_id);
CREATE INDEX seg_memberships_closed ON seg_memberships (to_version) WHERE to_version IS NOT NULL;

-- NULL for runs published before this migration (their members stay in seg_run_members).
ALTER TABLE seg_runs ADD COLUMN member_version BIGINT;
CREATE INDEX seg_runs_by_member_version ON seg_runs (member_version);

-- The segments a versioned run evaluated (its snapshot covers only these).
CREATE TABLE seg_run_segments (
    run_id     TEXT NOT NULL,
    segment_id TEXT NOT NULL,
    PRIMARY KEY (run_id, segment_id)
);
