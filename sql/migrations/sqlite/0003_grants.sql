-- Grant programs (docs/rules.md §7): per-program counts of a run, and the grants ledger.
ALTER TABLE reward_runs ADD COLUMN programs TEXT;  -- JSON array: one object per grant program

-- Append-only: one row per grant or reversal. A grant of (program, U, party) has the sequence
-- number one above any grant it had before; its reversal carries the same number. The unique
-- key makes a second live grant impossible, whatever runs race: two runs that read the same
-- ledger choose the same number, and only one of them can write it.
CREATE TABLE referral_grants (
  id               INTEGER PRIMARY KEY,
  program          TEXT NOT NULL,
  referrer_user_id BIGINT NOT NULL,
  referred_user_id BIGINT NOT NULL,
  party            TEXT NOT NULL CHECK (party IN ('referrer', 'referred')),
  kind             TEXT NOT NULL CHECK (kind IN ('grant', 'reversal')),
  grant_seq        BIGINT NOT NULL CHECK (grant_seq >= 1),
  credited_user_id BIGINT NOT NULL,
  credit_days      BIGINT,
  credit_cents     BIGINT,
  payment_id       BIGINT,
  run_id           BIGINT NOT NULL REFERENCES reward_runs (id),
  as_of            TEXT NOT NULL,
  CHECK ((credit_days IS NULL) <> (credit_cents IS NULL)),
  UNIQUE (program, referred_user_id, party, grant_seq, kind)
);
CREATE INDEX referral_grants_referrer ON referral_grants (referrer_user_id);
CREATE INDEX referral_grants_credited ON referral_grants (credited_user_id);
CREATE INDEX referral_grants_run ON referral_grants (run_id);
