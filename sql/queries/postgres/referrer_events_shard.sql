-- The shard variant: $1 (or $3) holds the ids of the shard's referrers.
-- The referrers' IP hashes inside the window [$1, $2], both ends included.
SELECT DISTINCT e.user_id, e.ip_hash COLLATE "C"
FROM telemetry_events e
JOIN unnest($3::bigint[]) AS r(id) ON r.id = e.user_id
WHERE e.ip_hash IS NOT NULL
  AND e.created_at >= $1 AND e.created_at <= $2
