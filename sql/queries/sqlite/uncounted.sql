-- Referrals that count for nobody in the slots program: (R, U) whose referrer R has no invite
-- code. Read only for the per-referral report, which lists them with their reason.
SELECT u.referred_by_user_id, u.id
FROM users u
JOIN users r ON r.id = u.referred_by_user_id AND r.invite_code IS NULL
