-- Grant programs: the payments that can be a conversion, of every user; the referred users'
-- are kept in Rust (a join with users would cost a lookup per payment). $1: a JSON array of the
-- statuses some program counts, $2: the smallest minimum amount. Rows of another type than the
-- filter expects are read too, so that Rust names them. Times compared in Rust (text here).
SELECT p.id, p.user_id, p.amount_cents, p.currency, p.status, p.created_at
FROM payments p
WHERE (p.status IN (SELECT value FROM json_each($1)) OR typeof(p.status) <> 'text')
  AND (p.amount_cents >= $2 OR typeof(p.amount_cents) <> 'integer')
