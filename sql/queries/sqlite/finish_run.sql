-- The run's own row, in its apply transaction: only while it still says `running`, so that a
-- run another process has marked `abandoned` cannot commit (the caller checks one row changed).
UPDATE reward_runs SET status = 'succeeded', finished_at = $1, referrers_processed = $2,
       rewards_up = $3, rewards_down = $4, bonus_delta = $5, reward_rows_written = $6,
       host_values_written = $7, conflicts = $8, outcome_counts = $9, digest = $10,
       error = $11
WHERE id = $12 AND status = 'running'
