-- Grant programs: the distinct IP hashes of every user who referred someone, inside the
-- window [$1, $2]. $3 and $4 as $1 and $2 in grants_referrals.sql ($4: leave out invite-code
-- holders' events, which the slots snapshot read).
SELECT DISTINCT e.user_id::bigint, e.ip_hash::text COLLATE "C"
FROM telemetry_events e
WHERE e.ip_hash IS NOT NULL AND e.created_at >= $1 AND e.created_at <= $2
  AND e.user_id IN (SELECT referred_by_user_id FROM users WHERE referred_by_user_id IS NOT NULL)
  AND ($3::bigint[] IS NULL OR e.user_id = ANY($3::bigint[]))
  AND (NOT $4::boolean OR NOT EXISTS (SELECT 1 FROM users r WHERE r.id = e.user_id AND r.invite_code IS NOT NULL))
