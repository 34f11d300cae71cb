-- Grant programs: the ledger's grants of the referred users, each with whether a reversal
-- ends it.
SELECT g.program, g.referrer_user_id, g.referred_user_id, g.party, g.credited_user_id,
       g.credit_days, g.credit_cents, g.grant_seq, g.payment_id,
       EXISTS (SELECT 1 FROM referral_grants x
               WHERE x.kind = 'reversal' AND x.program = g.program
                 AND x.referred_user_id = g.referred_user_id AND x.party = g.party
                 AND x.grant_seq = g.grant_seq)
FROM referral_grants g
WHERE g.kind = 'grant'

