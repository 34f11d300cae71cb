-- A full or shard snapshot's referred users, as one sequential scan: every user with a referrer;
-- the job keeps those whose referrer holds an invite code and joins their subscriptions
-- (scan_subscriptions.sql) in memory, where the database would probe an index per user on a
-- host without the recommended ones. Times as the column sends them, uncast: TIMESTAMP and
-- TIMESTAMPTZ have the same binary form (microseconds since 2000-01-01; 'infinity' and
-- '-infinity' the largest and smallest int8), and times are UTC, so both read as the same
-- instants. A cast to timestamptz gives the same bytes but converts a TIMESTAMP through the
-- session's time zone on every row.
SELECT id, referred_by_user_id, created_at, is_active, is_verified
FROM users
WHERE referred_by_user_id IS NOT NULL
