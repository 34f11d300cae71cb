-- Grant programs: the referred users' registration IP hashes (the greatest non-blank one is
-- chosen in Rust). $c as in grants_referrals.sql.
SELECT e.user_id, e.ip_hash, e.id
FROM telemetry_events e
JOIN users u ON u.id = e.user_id
LEFT JOIN users r ON r.id = u.referred_by_user_id
WHERE u.referred_by_user_id IS NOT NULL
  AND (NOT $c OR r.id IS NULL OR r.invite_code IS NULL)
  AND e.event_name = 'user_registered' AND e.ip_hash IS NOT NULL
