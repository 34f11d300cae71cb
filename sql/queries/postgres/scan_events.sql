-- A full or shard snapshot's IP hashes inside the window [$1, $2] (both ends included), as one
-- sequential scan of every user's events: the job keeps the referrers' in memory and makes the
-- pairs distinct there (as referrer_events.sql's DISTINCT), where the database would join the
-- referrers and hash or sort the pairs (at 10M users, past work_mem: spilled to disk). $1 and
-- $2 are untyped UTC literals, read as the column's own type: a timestamptz bound would turn
-- each row's TIMESTAMP into a timestamptz through the session's time zone to compare it.
SELECT user_id, ip_hash
FROM telemetry_events
WHERE ip_hash IS NOT NULL AND created_at >= $1 AND created_at <= $2
