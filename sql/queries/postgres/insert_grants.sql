-- The grants and reversals of a run, one array per column. A row whose key is already written
-- (another run got there first: it waits for that run's commit, then skips) is skipped, and
-- only the rows written come back: their balances are applied.
INSERT INTO referral_grants (program, referrer_user_id, referred_user_id, party, kind, grant_seq,
                             credited_user_id, credit_days, credit_cents, payment_id, run_id, as_of)
SELECT g.program, g.r, g.u, g.party, g.kind, g.seq, g.credited, g.days, g.cents, g.payment, $11, $12
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::bigint[],
            $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[])
     AS g(program, r, u, party, kind, seq, credited, days, cents, payment)
ON CONFLICT (program, referred_user_id, party, grant_seq, kind) DO NOTHING
RETURNING program, referred_user_id, party, kind, credited_user_id, credit_days, credit_cents
