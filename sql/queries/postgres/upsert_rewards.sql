INSERT INTO referral_rewards (
  referrer_user_id, referred_users_total, qualified_referrals, disqualified_self_referral,
  disqualified_cooldown, disqualified_missing_ip, disqualified_shared_ip,
  disqualified_duplicate_ip, bonus_slots, badge, last_run_id, updated_at)
SELECT t.*, $11, now()
FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[],
            $7::bigint[], $8::bigint[], $9::bigint[], $10::text[]) AS t
ON CONFLICT (referrer_user_id) DO UPDATE SET
  referred_users_total = EXCLUDED.referred_users_total,
  qualified_referrals = EXCLUDED.qualified_referrals,
  disqualified_self_referral = EXCLUDED.disqualified_self_referral,
  disqualified_cooldown = EXCLUDED.disqualified_cooldown,
  disqualified_missing_ip = EXCLUDED.disqualified_missing_ip,
  disqualified_shared_ip = EXCLUDED.disqualified_shared_ip,
  disqualified_duplicate_ip = EXCLUDED.disqualified_duplicate_ip,
  bonus_slots = EXCLUDED.bonus_slots,
  badge = EXCLUDED.badge,
  last_run_id = EXCLUDED.last_run_id,
  updated_at = EXCLUDED.updated_at
