-- Every subscription, as one sequential scan: the referred users' tiers, statuses and times,
-- and the host column (`referral_bonus_domains`) of the referrers' and of any other holding a
-- bonus, picked and checked in memory (see scan_users.sql for the times). The cells of rows the
-- job does not keep are never checked, as when the database joined them.
SELECT user_id, tier::text, status::text, started_at, expires_at, id,
       referral_bonus_domains::bigint
FROM subscriptions
