-- The one-user variant of grants_payments.sql (decided sets of the user and of its referrer): $3 is
-- a JSON array of the referrers to read; everything is read, none of it shared with the slots part.
SELECT p.id, p.user_id, p.amount_cents, p.currency, p.status, p.created_at
FROM payments p
JOIN users u ON u.id = p.user_id
WHERE u.referred_by_user_id IN (SELECT value FROM json_each($3))
  AND (p.status IN (SELECT value FROM json_each($1)) OR typeof(p.status) <> 'text')
  AND (p.amount_cents >= $2 OR typeof(p.amount_cents) <> 'integer')
