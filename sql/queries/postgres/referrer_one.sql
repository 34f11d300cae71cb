-- One user: does it exist, and is it a referrer?
SELECT invite_code IS NOT NULL FROM users WHERE id = $1
