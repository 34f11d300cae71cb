-- The host column for every referrer's subscription, and for any other holding a bonus.
SELECT s.user_id, s.referral_bonus_domains, s.id
FROM subscriptions s
LEFT JOIN users u ON u.id = s.user_id
WHERE u.invite_code IS NOT NULL OR s.referral_bonus_domains <> 0
