-- Grant programs: the ledger's grants and reversals of the referred users (a reversal ends the
-- grant of its program, referred user, party and grant_seq; matched in Rust rather than by a
-- lookup per grant). $1 as in grants_referrals.sql.
SELECT g.program::text, g.referrer_user_id::bigint, g.referred_user_id::bigint, g.party::text, g.credited_user_id::bigint,
       g.credit_days::bigint, g.credit_cents::bigint, g.grant_seq::bigint, g.payment_id::bigint,
       g.kind = 'reversal'
FROM referral_grants g
WHERE ($1::bigint[] IS NULL OR g.referred_user_id IN
       (SELECT u.id FROM users u WHERE u.referred_by_user_id = ANY($1::bigint[])))
