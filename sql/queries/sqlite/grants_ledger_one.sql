-- The one-user variant of grants_ledger.sql (decided sets of the user and of its referrer): $1 is
-- a JSON array of the referrers to read; everything is read, none of it shared with the slots part.
SELECT g.program, g.referrer_user_id, g.referred_user_id, g.party, g.credited_user_id,
       g.credit_days, g.credit_cents, g.grant_seq, g.payment_id, g.kind = 'reversal'
FROM referral_grants g
WHERE g.referred_user_id IN
       (SELECT u.id FROM users u WHERE u.referred_by_user_id IN (SELECT value FROM json_each($1)))
