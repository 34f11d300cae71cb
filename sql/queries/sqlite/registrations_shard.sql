-- The shard variant: $1 (or $3) is a JSON array of the shard's referrer ids.
-- The referred users' registration IP hashes; the greatest non-blank one is chosen in Rust.
SELECT e.user_id, e.ip_hash, e.id
FROM telemetry_events e
JOIN users u ON u.id = e.user_id
JOIN json_each($1) AS r ON r.value = u.referred_by_user_id
WHERE e.event_name = 'user_registered' AND e.ip_hash IS NOT NULL
