-- A shard's run lock, in order: the run key shared ($1), the shard's own key ($2), its shard
-- count's key shared ($3 + $4); then true only if no other shard count's key is held in this
-- database. Locks taken before a false stay taken: the caller unlocks all.
SELECT pg_try_advisory_lock_shared($1)
   AND pg_try_advisory_lock($2)
   AND pg_try_advisory_lock_shared($3 + $4)
   AND NOT EXISTS (
     SELECT 1 FROM pg_locks
     WHERE locktype = 'advisory' AND granted AND objsubid = 1
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND ((classid::bigint << 32) | objid::bigint) BETWEEN $3 + 1 AND $3 + 65536
       AND ((classid::bigint << 32) | objid::bigint) <> $3 + $4)
