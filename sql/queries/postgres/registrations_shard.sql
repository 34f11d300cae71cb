-- The shard variant: $1 (or $3) holds the ids of the shard's referrers.
-- The referred users' registration IP hashes; the greatest non-blank one is chosen in Rust
-- (byte order), so repeated rows do no harm and no DISTINCT is needed.
-- The event name is compared exactly (COLLATE "C"), whatever the column's collation: under a
-- case-insensitive one 'User_Registered' = 'user_registered'. The plain comparison beside it is
-- implied by the exact one, and lets the planner use the partial index on registrations.
SELECT e.user_id, e.ip_hash
FROM telemetry_events e
JOIN users u ON u.id = e.user_id
JOIN unnest($1::bigint[]) AS r(id) ON r.id = u.referred_by_user_id
WHERE e.event_name = 'user_registered' AND e.event_name COLLATE "C" = 'user_registered'
  AND e.ip_hash IS NOT NULL
