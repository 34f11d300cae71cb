-- The reference host schema of SPEC section 2, for demos, tests and benchmarks only
-- (`migrate --with-reference-schema`). A real deployment maps its own tables onto these names.
-- Times are ISO-8601 text (SPEC section 2). Its indexes are in sqlite_indexes.sql.

CREATE TABLE IF NOT EXISTS users (
  id                  INTEGER PRIMARY KEY,
  email               TEXT,
  created_at          TEXT NOT NULL,
  is_active           INTEGER NOT NULL DEFAULT 1,
  is_verified         INTEGER NOT NULL DEFAULT 0,
  invite_code         TEXT UNIQUE,
  referred_by_user_id BIGINT REFERENCES users(id),
  -- Grant programs' balances (docs/rules.md §7): read and written only by them.
  credit_until        TEXT,
  credit_cents        BIGINT NOT NULL DEFAULT 0
);

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

-- Grant programs' conversions (docs/rules.md §7): read only when a grant program needs them.
CREATE TABLE IF NOT EXISTS payments (
  id           INTEGER PRIMARY KEY,
  user_id      BIGINT NOT NULL REFERENCES users(id),
  amount_cents BIGINT NOT NULL,
  currency     TEXT NOT NULL,
  status       TEXT NOT NULL,
  created_at   TEXT NOT NULL
);
