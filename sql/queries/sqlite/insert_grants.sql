-- The grants and reversals of a run ($1: JSON array of [program, R, U, party, kind, seq,
-- credited user, days, cents, payment]). A row whose key is already written (another run got
-- there first) is skipped, and only the rows written come back: their balances are applied.
INSERT INTO referral_grants (program, referrer_user_id, referred_user_id, party, kind, grant_seq,
                             credited_user_id, credit_days, credit_cents, payment_id, run_id, as_of)
SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3, j.value ->> 4, j.value ->> 5,
       j.value ->> 6, j.value ->> 7, j.value ->> 8, j.value ->> 9, $2, $3
FROM json_each($1) j
WHERE true
ON CONFLICT (program, referred_user_id, party, grant_seq, kind) DO NOTHING
RETURNING program, referred_user_id, party, kind, credited_user_id, credit_days, credit_cents
