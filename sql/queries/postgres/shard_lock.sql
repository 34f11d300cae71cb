-- A shard's run lock, all three taken (each call is evaluated: a select list, not an AND):
-- the run key shared ($1), the shard's own key ($2), its shard count's key shared ($3 + $4).
-- Locks taken when another is refused stay taken: the caller unlocks all.
SELECT pg_try_advisory_lock_shared($1), pg_try_advisory_lock($2), pg_try_advisory_lock_shared($3 + $4)
