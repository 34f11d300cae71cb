-- The run's own row, in its apply transaction: only while it still says `running`, so that a
-- run another process has marked `abandoned` cannot commit (the caller checks one row changed).
UPDATE reward_runs SET status = 'succeeded', finished_at = $11, referrers_processed = $1,
       rewards_up = $2, rewards_down = $3, bonus_delta = $4, reward_rows_written = $5,
       host_values_written = $6, conflicts = $7, outcome_counts = $8, digest = $9,
       error = $12
WHERE id = $10 AND status = 'running'
