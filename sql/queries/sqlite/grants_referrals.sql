-- Grant programs: the referrals (R, U) of the referrers in $1 (a JSON array), whether or not R
-- holds an invite code, and whether R's user row exists. A one-user run passes the user and its
-- referrer; a full or shard run the referrers without an invite code (the slots part of the same
-- snapshot has read the invite-code holders' referrals).
SELECT u.id, u.referred_by_user_id, u.created_at, r.id IS NOT NULL
FROM users u
LEFT JOIN users r ON r.id = u.referred_by_user_id
WHERE u.referred_by_user_id IS NOT NULL
  AND u.referred_by_user_id IN (SELECT value FROM json_each($1))
