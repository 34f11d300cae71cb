-- $2: a JSON array of [referrer_user_id, field, old_value, new_value].
INSERT INTO reward_changes (run_id, referrer_user_id, field, old_value, new_value)
SELECT $1, j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3
FROM json_each($2) AS j
