-- Grant programs: the referred users' payments that can be a conversion, up to the as-of ($2;
-- compared again in Rust, as instants). $1 as in grants_referrals.sql. $3: the statuses some
-- program counts, $4: the smallest minimum amount (each program filters again in Rust; "C":
-- exact, whatever the column's collation). Times as in referred.sql.
SELECT p.id::bigint, p.user_id::bigint, p.amount_cents::bigint, p.currency::text, p.status::text,
       CASE WHEN p.created_at = 'infinity' THEN 9223372036854775807 WHEN p.created_at = '-infinity' THEN -9223372036854775807
            WHEN p.created_at > '294247-01-10 04:00:54.775807' THEN '-9223372036854775808'::bigint
            ELSE (EXTRACT(EPOCH FROM p.created_at::timestamptz) * 1000000)::bigint END
FROM payments p
JOIN users u ON u.id = p.user_id
WHERE u.referred_by_user_id IS NOT NULL
  AND ($1::bigint[] IS NULL OR u.referred_by_user_id = ANY($1::bigint[]))
  AND p.created_at <= $2
  AND p.status::text COLLATE "C" = ANY($3::text[])
  AND p.amount_cents >= $4
