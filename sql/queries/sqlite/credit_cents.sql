-- Relative balance writes: added to the value at write time ($1: JSON array of [user, cents]).
UPDATE users SET credit_cents = credit_cents + (SELECT j.value ->> 1 FROM json_each($1) j WHERE j.value ->> 0 = users.id)
WHERE id IN (SELECT j.value ->> 0 FROM json_each($1) j)
