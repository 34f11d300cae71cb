-- $1: JSON array of [user, new credit_until text or null], one entry per user.
UPDATE users SET credit_until = d.until
FROM (SELECT j.value ->> 0 AS id, j.value ->> 1 AS until FROM json_each($1) j) AS d
WHERE users.id = d.id
