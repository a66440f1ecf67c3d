-- Retention is recorded on the run, not inferred from its snapshot rows: a run that scored
-- nobody has no rows yet is still retained. Runs whose rows are already gone were pruned.
ALTER TABLE seg_runs ADD COLUMN snapshot_dropped BIGINT NOT NULL DEFAULT 0;
UPDATE seg_runs SET snapshot_dropped = 1
WHERE state = 3
  AND NOT EXISTS (SELECT 1 FROM seg_run_scores s WHERE s.run_id = seg_runs.run_id)
  AND NOT EXISTS (SELECT 1 FROM seg_run_members m WHERE m.run_id = seg_runs.run_id)
  AND run_id <> COALESCE((SELECT run_id FROM seg_runs WHERE state = 3
                          ORDER BY finish_time DESC, run_id DESC LIMIT 1), '');
