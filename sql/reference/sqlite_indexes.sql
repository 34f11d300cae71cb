-- The indexes referral-rewards relies on (README: "Recommended indexes"). Created after a bulk
-- load by demo-data, and by `migrate --with-reference-schema`.
-- A referrer's referred users.
CREATE INDEX IF NOT EXISTS users_referred_by ON users (referred_by_user_id);
-- Signup IPs of a user.
CREATE INDEX IF NOT EXISTS telemetry_events_registration
  ON telemetry_events (user_id) WHERE event_name = 'user_registered';
-- A referrer's events in the IP window.
CREATE INDEX IF NOT EXISTS telemetry_events_user_time ON telemetry_events (user_id, created_at);
-- A referred user's payments, earliest first (its conversion).
CREATE INDEX IF NOT EXISTS payments_user_time ON payments (user_id, created_at, id);
