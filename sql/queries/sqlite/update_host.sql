-- Compare-and-set: only where the column still holds the value the snapshot read.
-- $1: a JSON array of [user_id, old_value, new_value].
UPDATE subscriptions SET referral_bonus_domains = v.new_value
FROM (SELECT j.value ->> 0 AS user_id, j.value ->> 1 AS old_value, j.value ->> 2 AS new_value
      FROM json_each($1) AS j) AS v
WHERE subscriptions.user_id = v.user_id AND subscriptions.referral_bonus_domains = v.old_value
RETURNING subscriptions.user_id
