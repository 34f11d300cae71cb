-- explain --user: whether user $1 exists, and who referred it.
SELECT referred_by_user_id::bigint FROM users WHERE id = $1
