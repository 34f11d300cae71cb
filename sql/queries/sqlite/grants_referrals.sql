-- Grant programs: every referral (R, U), whether or not R holds an invite code, and whether R's
-- user row exists (grants_referrals_one.sql: those of given referrers).
-- $c: 1 to leave out the referrals of invite-code holders, which the slots snapshot of the same
-- transaction has read already.
SELECT u.id, u.referred_by_user_id, u.created_at, r.id IS NOT NULL
FROM users u
LEFT JOIN users r ON r.id = u.referred_by_user_id
WHERE u.referred_by_user_id IS NOT NULL
  AND (NOT $c OR r.id IS NULL OR r.invite_code IS NULL)
