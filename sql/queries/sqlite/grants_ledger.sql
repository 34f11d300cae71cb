-- Grant programs: the ledger, grants and reversals (a reversal ends the grant of its program,
-- referred user, party and grant_seq; matched in Rust rather than by a lookup per grant).
SELECT g.program, g.referrer_user_id, g.referred_user_id, g.party, g.credited_user_id,
       g.credit_days, g.credit_cents, g.grant_seq, g.payment_id, g.kind = 'reversal'
FROM referral_grants g
