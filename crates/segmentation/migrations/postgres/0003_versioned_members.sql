-- Issue #4: a batch run no longer rewrites a snapshot of every membership.
--
-- Memberships are versioned: a row is valid from `from_version` (inclusive) to `to_version`
-- (exclusive; NULL while current). A published run takes the next version
-- (`seg_runs.member_version`, one more than the largest so far, under the change-log lock) and
-- its snapshot is the rows valid at that version, so an unchanged membership costs no write.
-- Writes between runs (real-time re-scores, merges, erasure, segment deletion) use the
-- pending version (largest run version + 1): a row they close stays visible to the runs
-- before, a row they open is visible from the next run on, and a row opened and closed at the
-- same pending version was never visible to any run and is deleted instead.
ALTER TABLE seg_memberships ADD COLUMN from_version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE seg_memberships ADD COLUMN to_version BIGINT;
ALTER TABLE seg_memberships DROP CONSTRAINT seg_memberships_pkey;
ALTER TABLE seg_memberships ADD PRIMARY KEY (segment_id, profile_id, from_version);
-- Retention deletes the rows closed before the oldest retained run.
CREATE INDEX seg_memberships_closed ON seg_memberships (to_version) WHERE to_version IS NOT NULL;

-- NULL for runs published before this migration: their members stay in seg_run_members
-- until retention drops them.
ALTER TABLE seg_runs ADD COLUMN member_version BIGINT;
CREATE INDEX seg_runs_by_member_version ON seg_runs (member_version);

-- The segments a versioned run evaluated (its snapshot covers only these).
CREATE TABLE seg_run_segments (
    run_id     TEXT NOT NULL,
    segment_id TEXT NOT NULL,
    PRIMARY KEY (run_id, segment_id)
);

-- Run scores: one partition per run, loaded with COPY into a table created in the publishing
-- transaction, indexed after loading and attached; retention drops the partition.
ALTER TABLE seg_run_scores RENAME TO seg_run_scores_unpartitioned;
CREATE TABLE seg_run_scores (
    run_id          TEXT NOT NULL,
    profile_id      TEXT NOT NULL,
    r               BIGINT,
    f               BIGINT,
    m               BIGINT,
    rfm_name        TEXT,
    recency_days    DOUBLE PRECISION,
    frequency       BIGINT,
    monetary_minor  BIGINT,
    lifecycle       BIGINT,
    lifecycle_since BIGINT,
    clv             DOUBLE PRECISION,
    p_alive         DOUBLE PRECISION,
    exp_purchases   DOUBLE PRECISION,
    exp_aov         DOUBLE PRECISION
) PARTITION BY LIST (run_id);

-- The partition of run `p_run`'s scores.
CREATE FUNCTION seg_run_scores_partition(p_run TEXT) RETURNS TEXT
LANGUAGE sql IMMUTABLE AS $fn$ SELECT 'seg_run_scores_' || md5(p_run) $fn$;

DO $mig$
DECLARE
    r RECORD;
    part TEXT;
BEGIN
    FOR r IN SELECT DISTINCT run_id FROM seg_run_scores_unpartitioned LOOP
        part := seg_run_scores_partition(r.run_id);
        EXECUTE format('CREATE TABLE %I (LIKE seg_run_scores)', part);
        EXECUTE format('INSERT INTO %I SELECT * FROM seg_run_scores_unpartitioned WHERE run_id = %L',
                       part, r.run_id);
        EXECUTE format('CREATE UNIQUE INDEX ON %I (profile_id)', part);
        EXECUTE format('ALTER TABLE seg_run_scores ATTACH PARTITION %I FOR VALUES IN (%L)',
                       part, r.run_id);
    END LOOP;
END
$mig$;
DROP TABLE seg_run_scores_unpartitioned;

-- The real-time re-score's writes in the versioned layout: as in 0002, but an exit or a
-- cluster move closes the stored row at the pending version and an entry or a move opens a
-- row at it; a row already opened at the pending version is deleted or moved in place.
CREATE OR REPLACE FUNCTION seg_apply_realtime(
    p_lock BIGINT, p_run TEXT, p_now BIGINT, p_reason BIGINT, p_entered BIGINT, p_exited BIGINT,
    p_segments TEXT[],
    p_mseg TEXT[], p_mprofile TEXT[], p_mcluster BIGINT[], p_mdist DOUBLE PRECISION[],
    p_profile TEXT[], p_r BIGINT[], p_f BIGINT[], p_m BIGINT[], p_rfm_name TEXT[],
    p_recency DOUBLE PRECISION[], p_frequency BIGINT[], p_monetary BIGINT[],
    p_lifecycle BIGINT[], p_lifecycle_since BIGINT[], p_clv DOUBLE PRECISION[],
    p_p_alive DOUBLE PRECISION[], p_exp_purchases DOUBLE PRECISION[], p_exp_aov DOUBLE PRECISION[]
) RETURNS TABLE (seq BIGINT, change_id TEXT, profile_id TEXT, segment_id TEXT,
                 cluster_index BIGINT, change_type BIGINT)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    SELECT COALESCE(MAX(r.member_version), 0) + 1 INTO v FROM seg_runs r;
    RETURN QUERY
    WITH nxt AS (
        SELECT n.segment_id, n.profile_id, n.cluster_index, n.distance, n.ord
        FROM UNNEST(p_mseg, p_mprofile, p_mcluster, p_mdist) WITH ORDINALITY
             AS n(segment_id, profile_id, cluster_index, distance, ord)
    ), cur AS (
        SELECT m.segment_id, m.profile_id, m.cluster_index, m.from_version
        FROM seg_memberships m
        WHERE m.profile_id = ANY(p_profile) AND m.segment_id = ANY(p_segments)
          AND m.to_version IS NULL
    ), moved AS (
        SELECT n.segment_id, n.profile_id, n.cluster_index, n.distance, n.ord,
               c.cluster_index AS old_cluster, c.from_version AS old_from
        FROM nxt n LEFT JOIN cur c ON c.segment_id = n.segment_id AND c.profile_id = n.profile_id
        WHERE c.cluster_index IS DISTINCT FROM n.cluster_index
    ), gone AS (
        SELECT c.segment_id, c.profile_id, c.cluster_index, c.from_version FROM cur c
        WHERE NOT EXISTS (SELECT 1 FROM nxt n
                          WHERE n.segment_id = c.segment_id AND n.profile_id = c.profile_id)
    ), del AS (
        -- Exits of rows opened at the pending version: never visible to a run.
        DELETE FROM seg_memberships m USING gone g
        WHERE g.from_version = v AND m.segment_id = g.segment_id
          AND m.profile_id = g.profile_id AND m.from_version = v
    ), closed AS (
        -- Exits and the old side of cluster moves of rows a run can see.
        UPDATE seg_memberships m SET to_version = v
        FROM (SELECT g.segment_id, g.profile_id, g.from_version FROM gone g
              UNION ALL
              SELECT x.segment_id, x.profile_id, x.old_from FROM moved x
              WHERE x.old_cluster IS NOT NULL) e
        WHERE e.from_version < v AND m.segment_id = e.segment_id
          AND m.profile_id = e.profile_id AND m.from_version = e.from_version
    ), upd AS (
        -- A cluster move of a row opened at the pending version is made in place.
        UPDATE seg_memberships m
        SET cluster_index = x.cluster_index, distance = x.distance, entered_at = p_now
        FROM moved x
        WHERE x.old_from = v AND m.segment_id = x.segment_id
          AND m.profile_id = x.profile_id AND m.from_version = v
    ), ins AS (
        INSERT INTO seg_memberships (segment_id, profile_id, cluster_index, distance,
                                     entered_at, from_version)
        SELECT x.segment_id, x.profile_id, x.cluster_index, x.distance, p_now, v FROM moved x
        WHERE x.old_from IS NULL OR x.old_from < v
    ), chg AS (
        SELECT v2.profile_id, v2.segment_id, v2.old_cluster AS cluster_index,
               p_exited AS change_type, 0 AS part, v2.ord, 0 AS sub
        FROM moved v2 WHERE v2.old_cluster IS NOT NULL
        UNION ALL
        SELECT v2.profile_id, v2.segment_id, v2.cluster_index, p_entered, 0, v2.ord, 1 FROM moved v2
        UNION ALL
        SELECT g.profile_id, g.segment_id, g.cluster_index, p_exited, 1, 0, 0 FROM gone g
    ), logged AS (
        INSERT INTO seg_changes (change_id, profile_id, segment_id, cluster_index, change_type,
                                 reason, run_id, occurred_at)
        SELECT gen_random_uuid()::text, c.profile_id, c.segment_id, c.cluster_index,
               c.change_type, p_reason, '', p_now
        FROM chg c ORDER BY c.part, c.ord, c.sub, c.segment_id, c.profile_id
        RETURNING seg_changes.seq, seg_changes.change_id, seg_changes.profile_id,
                  seg_changes.segment_id, seg_changes.cluster_index, seg_changes.change_type
    )
    SELECT l.seq, l.change_id, l.profile_id, l.segment_id, l.cluster_index, l.change_type
    FROM logged l ORDER BY l.seq;

    INSERT INTO seg_scores AS s (run_id, scored_at, profile_id, r, f, m, rfm_name, recency_days,
                                 frequency, monetary_minor, lifecycle, lifecycle_since, clv,
                                 p_alive, exp_purchases, exp_aov)
    SELECT p_run, p_now, u.* FROM UNNEST(p_profile, p_r, p_f, p_m, p_rfm_name, p_recency,
        p_frequency, p_monetary, p_lifecycle, p_lifecycle_since, p_clv, p_p_alive,
        p_exp_purchases, p_exp_aov) AS u
    ON CONFLICT (profile_id) DO UPDATE SET
        run_id = excluded.run_id, scored_at = excluded.scored_at, r = excluded.r,
        f = excluded.f, m = excluded.m, rfm_name = excluded.rfm_name,
        recency_days = excluded.recency_days, frequency = excluded.frequency,
        monetary_minor = excluded.monetary_minor, lifecycle = excluded.lifecycle,
        lifecycle_since = excluded.lifecycle_since, clv = excluded.clv,
        p_alive = excluded.p_alive, exp_purchases = excluded.exp_purchases,
        exp_aov = excluded.exp_aov;
END
$fn$;
