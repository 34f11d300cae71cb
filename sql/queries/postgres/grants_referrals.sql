-- Grant programs: every referral (R, U), whether or not R holds an invite code, and whether R's
-- user row exists. $1: the referrers to read (a one-user run: the user and its referrer; a full
-- or shard run: the referrers without an invite code, since the slots part of the same snapshot
-- has read the invite-code holders' referrals). Times as in referred.sql.
SELECT u.id::bigint, u.referred_by_user_id::bigint,
       CASE WHEN u.created_at = 'infinity' THEN 9223372036854775807 WHEN u.created_at = '-infinity' THEN -9223372036854775807
            WHEN u.created_at > '294247-01-10 04:00:54.775807' THEN '-9223372036854775808'::bigint
            ELSE (EXTRACT(EPOCH FROM u.created_at::timestamptz) * 1000000)::bigint END,
       r.id IS NOT NULL
FROM users u
LEFT JOIN users r ON r.id = u.referred_by_user_id
WHERE u.referred_by_user_id IS NOT NULL
  AND u.referred_by_user_id = ANY($1::bigint[])
