-- The users referred by one user ($1) who holds no invite code (explain lists them).
SELECT id FROM users WHERE referred_by_user_id = $1
