-- The referred users' registration IP hashes; the greatest non-blank one is chosen in Rust.
SELECT e.user_id, e.ip_hash, e.id
FROM telemetry_events e
JOIN users u ON u.id = e.user_id
JOIN users r ON r.id = u.referred_by_user_id AND r.invite_code IS NOT NULL
WHERE e.event_name = 'user_registered' AND e.ip_hash IS NOT NULL
