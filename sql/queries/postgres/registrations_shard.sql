-- The shard variant: $1 (or $3) holds the ids of the shard's referrers.
-- The referred users' registration IP hashes; the greatest non-blank one is chosen in Rust
-- (byte order). DISTINCT under "C": a case-insensitive collation must not merge hashes.
SELECT DISTINCT e.user_id, e.ip_hash COLLATE "C"
FROM telemetry_events e
JOIN users u ON u.id = e.user_id
JOIN unnest($1::bigint[]) AS r(id) ON r.id = u.referred_by_user_id
WHERE e.event_name = 'user_registered' AND e.ip_hash IS NOT NULL
