-- A full or shard snapshot's referred users, as one sequential scan: every user with a referrer;
-- the job keeps those whose referrer holds an invite code and joins their subscriptions
-- (scan_subscriptions.sql) in memory, where the database would probe an index per user on a
-- host without the recommended ones. Times in the binary send format of timestamptz
-- (microseconds since 2000-01-01 UTC; 'infinity' and '-infinity' the largest and smallest
-- int8): no arithmetic per row. The transaction runs in UTC, so TIMESTAMP and TIMESTAMPTZ
-- columns read as the same instants.
SELECT id, referred_by_user_id, created_at::timestamptz, is_active, is_verified
FROM users
WHERE referred_by_user_id IS NOT NULL
