-- A full or shard snapshot's referred users, as one pass over the table: every user with a
-- referrer; the job keeps those whose referrer holds an invite code and joins their
-- subscriptions (scan_subscriptions.sql) in memory, where SQLite would look up the referrer and
-- the subscription by index for each user. The unary + keeps SQLite from reading the users
-- through the referral index (a lookup per row) instead of in table order.
SELECT id, referred_by_user_id, created_at, is_active, is_verified
FROM users
WHERE +referred_by_user_id IS NOT NULL
