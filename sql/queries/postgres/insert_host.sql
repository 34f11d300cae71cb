-- A subscription for a referrer without one; a row the host created meanwhile is a conflict.
INSERT INTO subscriptions (user_id, tier, status, max_domains, referral_bonus_domains, started_at, expires_at)
SELECT v.user_id, $3, $4, $5, v.bonus, $6, NULL
FROM UNNEST($1::bigint[], $2::int[]) AS v(user_id, bonus)
ON CONFLICT (user_id) DO NOTHING
RETURNING user_id
