-- A run's row, `running` until its apply commits (`finish_run.sql`) or it fails (`fail_run.sql`).
INSERT INTO reward_runs (mode, referrer_user_id, shard, as_of, started_at, status, trigger)
VALUES ($1, $2, $3, $4, $5, 'running', $6) RETURNING id
