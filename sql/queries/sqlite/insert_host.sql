-- A subscription for a referrer without one; a row the host created meanwhile is a conflict.
-- $1: a JSON array of [user_id, bonus].
INSERT INTO subscriptions (user_id, tier, status, max_domains, referral_bonus_domains, started_at, expires_at)
SELECT j.value ->> 0, $2, $3, $4, j.value ->> 1, $5, NULL
FROM json_each($1) AS j
WHERE true
ON CONFLICT (user_id) DO NOTHING
RETURNING user_id
