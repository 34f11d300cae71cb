-- Grant programs: the IP hashes of the referrers in $3 (a JSON array; as in grants_referrals.sql)
-- around the window (whole dates as text, as in referrer_events.sql; the exact window is applied
-- in Rust).
SELECT e.user_id, e.ip_hash, e.created_at, e.id
FROM telemetry_events e
WHERE e.ip_hash IS NOT NULL
  AND e.user_id IN (SELECT value FROM json_each($3))
  AND ((e.created_at >= $1 AND e.created_at < $2) OR e.created_at NOT GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*')
