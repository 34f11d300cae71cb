SELECT referrer_user_id, referred_users_total, qualified_referrals, disqualified_self_referral,
       disqualified_cooldown, disqualified_missing_ip, disqualified_shared_ip,
       disqualified_duplicate_ip, bonus_slots, badge
FROM referral_rewards
