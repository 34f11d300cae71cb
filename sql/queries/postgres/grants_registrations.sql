-- Grant programs: the referred users' registration IP hashes (the greatest non-blank one is
-- chosen in Rust; the event name compared exactly, as in registrations.sql). $1 as in
-- grants_referrals.sql.
SELECT e.user_id::bigint, e.ip_hash::text
FROM telemetry_events e
JOIN users u ON u.id = e.user_id
WHERE u.referred_by_user_id IS NOT NULL
  AND u.referred_by_user_id = ANY($1::bigint[])
  AND e.event_name = 'user_registered' AND e.event_name COLLATE "C" = 'user_registered'
  AND e.ip_hash IS NOT NULL
