-- $1: a JSON array of [referrer_user_id, referred_users_total, qualified_referrals,
-- disqualified_self_referral, disqualified_cooldown, disqualified_missing_ip,
-- disqualified_shared_ip, disqualified_duplicate_ip, bonus_slots, badge].
INSERT INTO referral_rewards (
  referrer_user_id, referred_users_total, qualified_referrals, disqualified_self_referral,
  disqualified_cooldown, disqualified_missing_ip, disqualified_shared_ip,
  disqualified_duplicate_ip, bonus_slots, badge, last_run_id, updated_at)
SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3, j.value ->> 4, j.value ->> 5,
       j.value ->> 6, j.value ->> 7, j.value ->> 8, j.value ->> 9, $2, $3
FROM json_each($1) AS j
WHERE true
ON CONFLICT (referrer_user_id) DO UPDATE SET
  referred_users_total = excluded.referred_users_total,
  qualified_referrals = excluded.qualified_referrals,
  disqualified_self_referral = excluded.disqualified_self_referral,
  disqualified_cooldown = excluded.disqualified_cooldown,
  disqualified_missing_ip = excluded.disqualified_missing_ip,
  disqualified_shared_ip = excluded.disqualified_shared_ip,
  disqualified_duplicate_ip = excluded.disqualified_duplicate_ip,
  bonus_slots = excluded.bonus_slots,
  badge = excluded.badge,
  last_run_id = excluded.last_run_id,
  updated_at = excluded.updated_at
