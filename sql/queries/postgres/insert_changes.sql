INSERT INTO reward_changes (run_id, referrer_user_id, field, old_value, new_value)
SELECT $1, t.* FROM UNNEST($2::bigint[], $3::text[], $4::text[], $5::text[]) AS t
