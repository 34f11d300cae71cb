-- Grant programs: the referred users' payments (times compared in Rust: text in SQLite).
SELECT p.id, p.user_id, p.amount_cents, p.currency, p.status, p.created_at
FROM payments p
JOIN users u ON u.id = p.user_id
WHERE u.referred_by_user_id IS NOT NULL
