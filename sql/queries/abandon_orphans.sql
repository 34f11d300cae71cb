-- Under the exclusive lock ($2 NULL) every `running` row is an orphan; under a shard's lock
-- ($2 = 'K/N'), that shard's. $3: the error recorded (`store::ORPHAN_ERROR`).
UPDATE reward_runs SET status = 'abandoned', finished_at = $1, error = $3
WHERE status = 'running' AND ($2 IS NULL OR shard = $2)
