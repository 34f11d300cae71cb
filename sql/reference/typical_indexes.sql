-- The indexes a typical application has, and nothing referral-rewards recommends beyond them:
-- the benchmark's "typical" index set and the test that a snapshot reads the same rows on it
-- (README: "Recommended indexes"). Applied to a database that has the recommended ones; the
-- same statements on SQLite and PostgreSQL. The primary keys and UNIQUEs stay.
DROP INDEX IF EXISTS telemetry_events_registration;
DROP INDEX IF EXISTS payments_user_time;
-- users(referred_by_user_id) and telemetry_events(user_id, created_at) are typical too.
CREATE INDEX IF NOT EXISTS users_referred_by ON users (referred_by_user_id);
CREATE INDEX IF NOT EXISTS telemetry_events_user_time ON telemetry_events (user_id, created_at);
CREATE INDEX IF NOT EXISTS telemetry_events_user_event ON telemetry_events (user_id, event_name);
