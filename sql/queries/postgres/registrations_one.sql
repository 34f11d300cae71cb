-- The event name is compared exactly (COLLATE "C"), whatever the column's collation: under a
-- case-insensitive one 'User_Registered' = 'user_registered'. The plain comparison beside it is
-- implied by the exact one, and lets the planner use the partial index on registrations.
SELECT e.user_id, e.ip_hash
FROM telemetry_events e
JOIN users u ON u.id = e.user_id
WHERE u.referred_by_user_id = $1 AND e.event_name = 'user_registered'
  AND e.event_name COLLATE "C" = 'user_registered' AND e.ip_hash IS NOT NULL
