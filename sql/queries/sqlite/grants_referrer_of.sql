-- A one-user run on $1 decides $1's referral set and its referrer's: who referred $1.
SELECT referred_by_user_id FROM users WHERE id = $1
