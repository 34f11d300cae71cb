-- Under the exclusive lock ($2 NULL) every `running` row is an orphan; under a shard's lock
-- ($2 = 'K/N'), that shard's.
UPDATE reward_runs SET status = 'abandoned', finished_at = $1,
       error = 'no end was recorded: the process running it was killed, or lost the database (or its lock) before it could record one'
WHERE status = 'running' AND ($2 IS NULL OR shard = $2)
