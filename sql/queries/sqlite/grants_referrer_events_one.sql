-- The one-user variant of grants_referrer_events.sql (decided sets of the user and of its referrer): $3 is
-- a JSON array of the referrers to read; everything is read, none of it shared with the slots part.
SELECT e.user_id, e.ip_hash, e.created_at, e.id
FROM telemetry_events e
WHERE e.ip_hash IS NOT NULL
  AND e.user_id IN (SELECT value FROM json_each($3))
  AND ((e.created_at >= $1 AND e.created_at < $2) OR e.created_at NOT GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*')
