-- $1: JSON array of [user, new credit_until text or null].
UPDATE users SET credit_until = (SELECT j.value ->> 1 FROM json_each($1) j WHERE j.value ->> 0 = users.id)
WHERE id IN (SELECT j.value ->> 0 FROM json_each($1) j)
