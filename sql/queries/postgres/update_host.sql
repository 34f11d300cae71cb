-- Compare-and-set: only where the column still holds the value the snapshot read (old values
-- as bigint: a host value beyond INTEGER is only compared, and must not fail the write).
UPDATE subscriptions s SET referral_bonus_domains = v.new_value
FROM UNNEST($1::bigint[], $2::bigint[], $3::int[]) AS v(user_id, old_value, new_value)
WHERE s.user_id = v.user_id AND s.referral_bonus_domains = v.old_value
RETURNING s.user_id
