-- The start of a full or one-referrer run, in one statement on the run lock's connection (one
-- round trip where there were four): the exclusive run lock ($1); then, only if it was taken and
-- the one referrer ($3; NULL for a full run) is a user, the orphans marked `abandoned` (as
-- abandon_orphans.sql, under the exclusive lock) and the run's `running` row (as
-- start_run.sql). The lock's CTE calls a volatile function, so it is evaluated once, before
-- the others read its result. Its rows: whether the lock was taken, whether the user exists,
-- how many orphans were marked, and the run's id (NULL when nothing was written).
-- The statement's commit does not wait for its WAL to reach the disk (synchronous_commit off
-- for this transaction alone): should the server crash before, the `running` row and the
-- orphans' marks are lost with the run itself, which had written nothing yet; the run's end
-- commits synchronously, and with it everything logged before. A one-referrer apply runs it
-- prepared, in the same message as its snapshot's read: its parameters' types are spelled out
-- there too (one.rs, `prepare_begin_sql`).
WITH lock AS (
  SELECT pg_try_advisory_lock($1) AS got, set_config('synchronous_commit', 'off', true)
),
known AS (SELECT $3::bigint IS NULL OR EXISTS (SELECT 1 FROM users WHERE id = $3) AS known),
go AS (SELECT (SELECT got FROM lock) AND (SELECT known FROM known) AS go),
orphans AS (
  UPDATE reward_runs SET status = 'abandoned', finished_at = $2, error = $7
  WHERE status = 'running' AND (SELECT go FROM go)
  RETURNING 1
),
run AS (
  INSERT INTO reward_runs (mode, referrer_user_id, shard, as_of, started_at, status, trigger)
  SELECT $4, $3, NULL, $5, $2, 'running', $6 WHERE (SELECT go FROM go)
  RETURNING id
)
SELECT (SELECT got FROM lock), (SELECT known FROM known), (SELECT count(*) FROM orphans),
       (SELECT id FROM run)
