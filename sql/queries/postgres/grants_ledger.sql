-- Grant programs: the ledger's grants of the referred users, each with whether a reversal
-- ends it. $1 as in grants_referrals.sql.
SELECT g.program::text, g.referrer_user_id::bigint, g.referred_user_id::bigint, g.party::text, g.credited_user_id::bigint,
       g.credit_days::bigint, g.credit_cents::bigint, g.grant_seq::bigint, g.payment_id::bigint,
       EXISTS (SELECT 1 FROM referral_grants x
               WHERE x.kind = 'reversal' AND x.program = g.program
                 AND x.referred_user_id = g.referred_user_id AND x.party = g.party
                 AND x.grant_seq = g.grant_seq)
FROM referral_grants g
WHERE g.kind = 'grant'
  AND ($1::bigint[] IS NULL OR g.referred_user_id IN
       (SELECT u.id FROM users u WHERE u.referred_by_user_id = ANY($1::bigint[])))
