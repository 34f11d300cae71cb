SELECT e.user_id, e.ip_hash, e.created_at, e.id
FROM telemetry_events e
WHERE e.user_id = $3 AND e.ip_hash IS NOT NULL AND ((e.created_at >= $1 AND e.created_at < $2) OR e.created_at NOT GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*')
