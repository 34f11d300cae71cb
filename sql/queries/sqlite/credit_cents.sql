-- Relative balance writes: added to the value at write time ($1: JSON array of [user, cents],
-- one entry per user).
UPDATE users SET credit_cents = users.credit_cents + d.cents
FROM (SELECT j.value ->> 0 AS id, j.value ->> 1 AS cents FROM json_each($1) j) AS d
WHERE users.id = d.id
