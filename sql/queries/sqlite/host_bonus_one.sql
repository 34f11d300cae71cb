SELECT user_id, referral_bonus_domains FROM subscriptions WHERE user_id = $1
