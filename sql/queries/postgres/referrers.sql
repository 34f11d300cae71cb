-- Referrers in scope: "a user is a referrer when invite_code IS NOT NULL".
SELECT id FROM users WHERE invite_code IS NOT NULL
