-- Grant programs: the distinct IP hashes of the referrers in $3, inside the
-- window [$1, $2]. $3 as $1 in grants_referrals.sql.
SELECT DISTINCT e.user_id::bigint, e.ip_hash::text COLLATE "C"
FROM telemetry_events e
WHERE e.ip_hash IS NOT NULL AND e.created_at >= $1 AND e.created_at <= $2
  AND e.user_id = ANY($3::bigint[])
