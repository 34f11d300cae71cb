-- The referrers' IP hashes around the window. Times are text in more than one format, so the
-- filter here is by whole dates ($1 <= created_at < $2 as text: any time on a date sorts after
-- the bare date; the dates are a day wider on each side for UTC offsets), and anything that
-- does not start with a date (text, or a number or blob as text) goes to Rust too, where it is
-- a time or an error naming the event. The exact, inclusive window is applied in Rust.
SELECT e.user_id, e.ip_hash, e.created_at, e.id
FROM telemetry_events e
JOIN users r ON r.id = e.user_id
WHERE r.invite_code IS NOT NULL AND e.ip_hash IS NOT NULL
  AND ((e.created_at >= $1 AND e.created_at < $2) OR e.created_at NOT GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*')
