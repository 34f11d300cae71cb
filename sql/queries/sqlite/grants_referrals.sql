-- Grant programs: every referral (R, U), whether or not R holds an invite code, and whether R's
-- user row exists. $1: NULL for every referral, or a JSON array of the referrers to read.
-- $c: 1 to leave out the referrals of invite-code holders, which the slots snapshot of the same
-- transaction has read already.
SELECT u.id, u.referred_by_user_id, u.created_at, r.id IS NOT NULL
FROM users u
LEFT JOIN users r ON r.id = u.referred_by_user_id
WHERE u.referred_by_user_id IS NOT NULL
  AND ($1 IS NULL OR u.referred_by_user_id IN (SELECT value FROM json_each($1)))
  AND (NOT $c OR r.id IS NULL OR r.invite_code IS NULL)
