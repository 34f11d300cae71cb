-- Grant programs: every user who referred someone (an index-only scan of the referral column).
SELECT DISTINCT referred_by_user_id FROM users WHERE referred_by_user_id IS NOT NULL
