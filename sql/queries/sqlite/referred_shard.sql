-- The shard variant: $1 (or $3) is a JSON array of the shard's referrer ids.
-- Every user referred by a referrer, with its subscription. Times are text, parsed in Rust.
SELECT u.id, u.referred_by_user_id, u.created_at, u.is_active, u.is_verified,
       s.user_id IS NOT NULL, s.tier, s.status, s.started_at, s.expires_at, s.id
FROM users u
JOIN json_each($1) AS r ON r.value = u.referred_by_user_id
LEFT JOIN subscriptions s ON s.user_id = u.id
