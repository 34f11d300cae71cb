SELECT e.user_id, e.ip_hash, e.id
FROM telemetry_events e
JOIN users u ON u.id = e.user_id
WHERE u.referred_by_user_id = $1 AND e.event_name = 'user_registered' AND e.ip_hash IS NOT NULL
