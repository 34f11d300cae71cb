-- The one-user variant of grants_registrations.sql (decided sets of the user and of its referrer): $1 is
-- a JSON array of the referrers to read; everything is read, none of it shared with the slots part.
SELECT e.user_id, e.ip_hash, e.id
FROM telemetry_events e
JOIN users u ON u.id = e.user_id
LEFT JOIN users r ON r.id = u.referred_by_user_id
WHERE u.referred_by_user_id IS NOT NULL
  AND u.referred_by_user_id IN (SELECT value FROM json_each($1))
  AND e.event_name = 'user_registered' AND e.ip_hash IS NOT NULL
