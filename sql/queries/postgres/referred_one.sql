-- referred.sql for one referrer ($1).
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
LEFT JOIN subscriptions s ON s.user_id = u.id
WHERE u.referred_by_user_id = $1
