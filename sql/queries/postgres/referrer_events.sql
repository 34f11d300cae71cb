-- The referrers' IP hashes inside the window [$1, $2], both ends included.
SELECT DISTINCT e.user_id, e.ip_hash COLLATE "C"
FROM telemetry_events e
JOIN users r ON r.id = e.user_id
WHERE r.invite_code IS NOT NULL AND e.ip_hash IS NOT NULL
  AND e.created_at >= $1 AND e.created_at <= $2
