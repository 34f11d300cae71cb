-- The one-user variant of grants_referrals.sql (decided sets of the user and of its referrer): $1 is
-- a JSON array of the referrers to read; everything is read, none of it shared with the slots part.
SELECT u.id, u.referred_by_user_id, u.created_at, r.id IS NOT NULL
FROM users u
LEFT JOIN users r ON r.id = u.referred_by_user_id
WHERE u.referred_by_user_id IS NOT NULL
  AND u.referred_by_user_id IN (SELECT value FROM json_each($1))
