-- The paid-access ends of the users a run credits with days ($1: JSON array of ids), read inside
-- the write transaction (which holds SQLite's write lock, so nobody writes in between).
SELECT id, credit_until FROM users WHERE id IN (SELECT value FROM json_each($1))
