-- Grant programs: every referral (R, U), whether or not R holds an invite code, and whether R's
-- user row exists. $1: NULL for every referral, or the referrers to read. Times as in
-- referred.sql. $2: true to leave out the referrals of invite-code holders, which the slots
-- snapshot of the same transaction has read already.
SELECT u.id::bigint, u.referred_by_user_id::bigint,
       CASE WHEN u.created_at = 'infinity' THEN 9223372036854775807 WHEN u.created_at = '-infinity' THEN -9223372036854775807
            WHEN u.created_at > '294247-01-10 04:00:54.775807' THEN '-9223372036854775808'::bigint
            ELSE (EXTRACT(EPOCH FROM u.created_at::timestamptz) * 1000000)::bigint END,
       r.id IS NOT NULL
FROM users u
LEFT JOIN users r ON r.id = u.referred_by_user_id
WHERE u.referred_by_user_id IS NOT NULL
  AND ($1::bigint[] IS NULL OR u.referred_by_user_id = ANY($1::bigint[]))
  AND (NOT $2::boolean OR r.id IS NULL OR r.invite_code IS NULL)
