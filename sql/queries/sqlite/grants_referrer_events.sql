-- Grant programs: the IP hashes of every user who referred someone, around the window (whole
-- dates as text, as in referrer_events.sql; the exact window is applied in Rust).
-- $c: 1 to leave out invite-code holders' events (the slots snapshot read them).
SELECT e.user_id, e.ip_hash, e.created_at, e.id
FROM telemetry_events e
WHERE e.ip_hash IS NOT NULL
  AND e.user_id IN (SELECT referred_by_user_id FROM users WHERE referred_by_user_id IS NOT NULL)
  AND (NOT $c OR NOT EXISTS (SELECT 1 FROM users r WHERE r.id = e.user_id AND r.invite_code IS NOT NULL))
  AND ((e.created_at >= $1 AND e.created_at < $2) OR e.created_at NOT GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*')
