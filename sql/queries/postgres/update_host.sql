-- Compare-and-set: only where the column still holds the value the snapshot read.
UPDATE subscriptions s SET referral_bonus_domains = v.new_value
FROM UNNEST($1::bigint[], $2::int[], $3::int[]) AS v(user_id, old_value, new_value)
WHERE s.user_id = v.user_id AND s.referral_bonus_domains = v.old_value
RETURNING s.user_id
