-- Retention is recorded on the run, not inferred from its snapshot rows: a run that scored
-- nobody has no rows yet is still retained. Runs whose rows are already gone were pruned.
ALTER TABLE seg_runs ADD COLUMN snapshot_dropped BIGINT NOT NULL DEFAULT 0;
UPDATE seg_runs r SET snapshot_dropped = 1
WHERE r.state = 3
  AND NOT EXISTS (SELECT 1 FROM seg_run_scores s WHERE s.run_id = r.run_id)
  AND NOT EXISTS (SELECT 1 FROM seg_run_members m WHERE m.run_id = r.run_id)
  AND r.run_id <> (SELECT run_id FROM seg_runs WHERE state = 3
                   ORDER BY finish_time DESC, run_id DESC LIMIT 1);

-- The write half of a real-time re-score in one round trip: under the change-log lock, diff
-- the profiles' new memberships (of the evaluated segments) against the stored ones, apply
-- the diff (UPDATE for a cluster move, INSERT for an entry, DELETE for an exit), append the
-- changes in the order the portable path appends them (per new membership: EXITED of the old
-- cluster then ENTERED; then exits ordered by segment, profile) and replace the profiles'
-- real-time scores. Returns the appended changes in seq order.
CREATE FUNCTION seg_apply_realtime(
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
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    RETURN QUERY
    WITH nxt AS (
        SELECT n.segment_id, n.profile_id, n.cluster_index, n.distance, n.ord
        FROM UNNEST(p_mseg, p_mprofile, p_mcluster, p_mdist) WITH ORDINALITY
             AS n(segment_id, profile_id, cluster_index, distance, ord)
    ), cur AS (
        SELECT m.segment_id, m.profile_id, m.cluster_index
        FROM seg_memberships m
        WHERE m.profile_id = ANY(p_profile) AND m.segment_id = ANY(p_segments)
    ), moved AS (
        SELECT n.segment_id, n.profile_id, n.cluster_index, n.distance, n.ord,
               c.cluster_index AS old_cluster
        FROM nxt n LEFT JOIN cur c ON c.segment_id = n.segment_id AND c.profile_id = n.profile_id
        WHERE c.cluster_index IS DISTINCT FROM n.cluster_index
    ), gone AS (
        SELECT c.segment_id, c.profile_id, c.cluster_index FROM cur c
        WHERE NOT EXISTS (SELECT 1 FROM nxt n
                          WHERE n.segment_id = c.segment_id AND n.profile_id = c.profile_id)
    ), del AS (
        DELETE FROM seg_memberships m USING gone g
        WHERE m.segment_id = g.segment_id AND m.profile_id = g.profile_id
    ), upd AS (
        UPDATE seg_memberships m
        SET cluster_index = v.cluster_index, distance = v.distance, entered_at = p_now
        FROM moved v
        WHERE v.old_cluster IS NOT NULL
          AND m.segment_id = v.segment_id AND m.profile_id = v.profile_id
    ), ins AS (
        INSERT INTO seg_memberships (segment_id, profile_id, cluster_index, distance, entered_at)
        SELECT v.segment_id, v.profile_id, v.cluster_index, v.distance, p_now
        FROM moved v WHERE v.old_cluster IS NULL
    ), chg AS (
        SELECT v.profile_id, v.segment_id, v.old_cluster AS cluster_index, p_exited AS change_type,
               0 AS part, v.ord, 0 AS sub
        FROM moved v WHERE v.old_cluster IS NOT NULL
        UNION ALL
        SELECT v.profile_id, v.segment_id, v.cluster_index, p_entered, 0, v.ord, 1 FROM moved v
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

    -- One upsert per profile (ids are distinct): one index probe instead of a delete and an
    -- insert.
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
