-- explain's shared_ip facts: the newest time user $3 used each IP hash inside the window.
SELECT e.ip_hash COLLATE "C", max(e.created_at)::timestamptz
FROM telemetry_events e
WHERE e.user_id = $3 AND e.ip_hash IS NOT NULL AND e.created_at >= $1 AND e.created_at <= $2
GROUP BY 1
