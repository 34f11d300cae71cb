-- Relative balance writes: added to the value at write time, so a host write in between is
-- kept ($1 users, $2 cents, one entry per user).
UPDATE users u SET credit_cents = u.credit_cents + d.cents
FROM unnest($1::bigint[], $2::bigint[]) AS d(id, cents)
WHERE u.id = d.id
