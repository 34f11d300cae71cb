-- Grant programs: the registration IP hashes of the users referred by the referrers in $1 (a
-- JSON array; as in grants_referrals.sql). The greatest non-blank one is chosen in Rust.
SELECT e.user_id, e.ip_hash, e.id
FROM telemetry_events e
JOIN users u ON u.id = e.user_id
WHERE u.referred_by_user_id IS NOT NULL
  AND u.referred_by_user_id IN (SELECT value FROM json_each($1))
  AND e.event_name = 'user_registered' AND e.ip_hash IS NOT NULL
