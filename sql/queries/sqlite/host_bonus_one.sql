SELECT user_id, referral_bonus_domains, id FROM subscriptions WHERE user_id = $1
