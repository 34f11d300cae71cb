-- Job-owned tables of referral-rewards (SPEC section 4). No foreign keys to the host tables:
-- the host may delete users, and the ledger must outlive them.

CREATE TABLE reward_runs (
  id                  INTEGER PRIMARY KEY,
  mode                TEXT NOT NULL CHECK (mode IN ('full', 'referrer')),
  referrer_user_id    BIGINT,
  as_of               TEXT NOT NULL,
  started_at          TEXT NOT NULL,
  finished_at         TEXT,
  status              TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'abandoned')),
  referrers_processed BIGINT,
  rewards_up          BIGINT,
  rewards_down        BIGINT,
  bonus_delta         BIGINT,
  reward_rows_written BIGINT,
  host_values_written BIGINT,
  conflicts           BIGINT,
  outcome_counts      TEXT,          -- JSON object: outcome -> count
  digest              TEXT,
  error               TEXT
);
CREATE INDEX reward_runs_status ON reward_runs (status) WHERE status = 'running';

CREATE TABLE referral_rewards (
  referrer_user_id           BIGINT PRIMARY KEY,
  referred_users_total       BIGINT NOT NULL DEFAULT 0,
  qualified_referrals        BIGINT NOT NULL DEFAULT 0,
  disqualified_self_referral BIGINT NOT NULL DEFAULT 0,
  disqualified_cooldown      BIGINT NOT NULL DEFAULT 0,
  disqualified_missing_ip    BIGINT NOT NULL DEFAULT 0,
  disqualified_shared_ip     BIGINT NOT NULL DEFAULT 0,
  disqualified_duplicate_ip  BIGINT NOT NULL DEFAULT 0,
  bonus_slots                BIGINT NOT NULL DEFAULT 0,
  badge                      TEXT,
  last_run_id                BIGINT NOT NULL REFERENCES reward_runs (id),
  updated_at                 TEXT NOT NULL
);

-- Append-only: one row per changed value.
CREATE TABLE reward_changes (
  id               INTEGER PRIMARY KEY,
  run_id           BIGINT NOT NULL REFERENCES reward_runs (id),
  referrer_user_id BIGINT NOT NULL,
  field            TEXT NOT NULL,
  old_value        TEXT,
  new_value        TEXT
);
CREATE INDEX reward_changes_referrer ON reward_changes (referrer_user_id, run_id);
CREATE INDEX reward_changes_run ON reward_changes (run_id);
