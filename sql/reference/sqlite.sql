-- The reference host schema of SPEC section 2, for demos, tests and benchmarks only
-- (`migrate --with-reference-schema`). A real deployment maps its own tables onto these names.
-- Times are ISO-8601 text (SPEC section 2). The indexes are the ones referral-rewards relies on; README lists them for adopters.

CREATE TABLE IF NOT EXISTS users (
  id                  INTEGER PRIMARY KEY,
  email               TEXT,
  created_at          TEXT NOT NULL,
  is_active           INTEGER NOT NULL DEFAULT 1,
  is_verified         INTEGER NOT NULL DEFAULT 0,
  invite_code         TEXT UNIQUE,
  referred_by_user_id BIGINT REFERENCES users(id)
);
CREATE INDEX IF NOT EXISTS users_referred_by ON users (referred_by_user_id);

CREATE TABLE IF NOT EXISTS subscriptions (
  id                     INTEGER PRIMARY KEY,
  user_id                BIGINT NOT NULL UNIQUE REFERENCES users(id),
  tier                   TEXT NOT NULL,
  status                 TEXT NOT NULL,
  max_domains            INTEGER NOT NULL DEFAULT 5,
  referral_bonus_domains INTEGER NOT NULL DEFAULT 0,
  started_at             TEXT,
  expires_at             TEXT
);

CREATE TABLE IF NOT EXISTS telemetry_events (
  id         INTEGER PRIMARY KEY,
  user_id    BIGINT,
  event_name TEXT NOT NULL,
  ip_hash    TEXT,
  created_at TEXT NOT NULL
);
-- Signup IPs of a user, and a referrer's events in the IP window.
CREATE INDEX IF NOT EXISTS telemetry_events_registration
  ON telemetry_events (user_id) WHERE event_name = 'user_registered';
CREATE INDEX IF NOT EXISTS telemetry_events_user_time ON telemetry_events (user_id, created_at);
