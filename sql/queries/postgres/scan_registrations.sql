-- Every user's registration IP hashes, as one scan (or one read of the partial index on
-- registrations): the referred users' are kept in memory. The event name is compared exactly
-- (COLLATE "C"), whatever the column's collation; the plain comparison beside it is implied by
-- the exact one, and lets the planner use the partial index.
SELECT user_id, ip_hash
FROM telemetry_events
WHERE event_name = 'user_registered' AND event_name COLLATE "C" = 'user_registered'
  AND ip_hash IS NOT NULL
