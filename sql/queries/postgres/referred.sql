-- Every user referred by a referrer, with its subscription and the subscription's own id.
-- Times as microseconds since the epoch (the transaction runs in UTC, so TIMESTAMP and
-- TIMESTAMPTZ columns read as the same instants); 'infinity' and '-infinity' are data, read as
-- the largest and smallest instants. A finite time past the last microsecond a bigint holds
-- (294247-01-10 04:00:54.775807 UTC; PostgreSQL stores up to 294276) reads as the smallest
-- bigint, which no time reads as otherwise: the job then names the row (a failed conversion
-- here would fail the whole query with "bigint out of range" and no row).
SELECT u.id, u.referred_by_user_id,
       CASE WHEN u.created_at = 'infinity' THEN 9223372036854775807 WHEN u.created_at = '-infinity' THEN -9223372036854775807
            WHEN u.created_at > '294247-01-10 04:00:54.775807' THEN '-9223372036854775808'::bigint
            ELSE (EXTRACT(EPOCH FROM u.created_at::timestamptz) * 1000000)::bigint END,
       u.is_active, u.is_verified, s.user_id IS NOT NULL, s.tier::text, s.status::text,
       CASE WHEN s.started_at = 'infinity' THEN 9223372036854775807 WHEN s.started_at = '-infinity' THEN -9223372036854775807
            WHEN s.started_at > '294247-01-10 04:00:54.775807' THEN '-9223372036854775808'::bigint
            ELSE (EXTRACT(EPOCH FROM s.started_at::timestamptz) * 1000000)::bigint END,
       CASE WHEN s.expires_at = 'infinity' THEN 9223372036854775807 WHEN s.expires_at = '-infinity' THEN -9223372036854775807
            WHEN s.expires_at > '294247-01-10 04:00:54.775807' THEN '-9223372036854775808'::bigint
            ELSE (EXTRACT(EPOCH FROM s.expires_at::timestamptz) * 1000000)::bigint END,
       s.id
FROM users u
JOIN users r ON r.id = u.referred_by_user_id AND r.invite_code IS NOT NULL
LEFT JOIN subscriptions s ON s.user_id = u.id
