-- Every user's registration IP hashes, as one pass (over the partial index on registrations
-- where there is one, else the table): the referred users' are kept in memory, where SQLite
-- would look up each referred user's events by index.
SELECT user_id, ip_hash, id
FROM telemetry_events
WHERE event_name = 'user_registered' AND ip_hash IS NOT NULL
