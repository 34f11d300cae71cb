-- A subscription for a referrer without one; a row the host created meanwhile is a conflict.
-- {tier_type} and {status_type} are the columns' own types (column_types.sql): tier and status
-- go in as text and are cast to them, so that an enum (or domain) column takes them as a text
-- column does (text has no implicit cast to an enum).
INSERT INTO subscriptions (user_id, tier, status, max_domains, referral_bonus_domains, started_at, expires_at)
SELECT v.user_id, $3::text::{tier_type}, $4::text::{status_type}, $5, v.bonus, $6, NULL
FROM UNNEST($1::bigint[], $2::int[]) AS v(user_id, bonus)
ON CONFLICT (user_id) DO NOTHING
RETURNING user_id
