SELECT u.id, u.referred_by_user_id, u.created_at, u.is_active, u.is_verified,
       s.user_id IS NOT NULL, s.tier, s.status, s.started_at, s.expires_at, s.id
FROM users u
LEFT JOIN subscriptions s ON s.user_id = u.id
WHERE u.referred_by_user_id = $1
