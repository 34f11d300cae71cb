-- Relative paid-access writes ($1 users, $2 days reversed, $3 days granted; one entry per
-- user): reversals first (a NULL stays NULL), then the grants from the later of the as-of ($4)
-- and the current end. Days of 24 hours. The transaction runs in UTC, so a TIMESTAMP column
-- reads and writes the same instants as a TIMESTAMPTZ one.
UPDATE users u SET credit_until = CASE
    WHEN d.granted > 0 THEN
      GREATEST($4::timestamptz, COALESCE(u.credit_until::timestamptz - d.reversed * interval '24 hours', $4::timestamptz))
        + d.granted * interval '24 hours'
    ELSE u.credit_until::timestamptz - d.reversed * interval '24 hours'
  END
FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS d(id, reversed, granted)
WHERE u.id = d.id
