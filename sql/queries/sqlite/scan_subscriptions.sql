-- Every subscription, as one pass over the table: the referred users' tiers, statuses and
-- times, and the host column of the referrers' and of any other holding a bonus, picked and
-- checked in memory. The cells of rows the job does not keep are never checked, as when the
-- database joined them.
SELECT user_id, tier, status, started_at, expires_at, id, referral_bonus_domains
FROM subscriptions
