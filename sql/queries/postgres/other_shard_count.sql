-- After the shard's own keys are held: whether any other shard count's key ($3 + 1 ..= $3 + 65536,
-- except $3 + $4) is held in this database. Each process takes its count's key before looking,
-- so two counts never both go ahead.
SELECT EXISTS (
  SELECT 1 FROM pg_locks
  WHERE locktype = 'advisory' AND granted AND objid IS NOT NULL AND objsubid = 1
    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
    AND ((classid::bigint << 32) | objid::bigint) BETWEEN $1 + 1 AND $1 + 65536
    AND ((classid::bigint << 32) | objid::bigint) <> $1 + $2)
