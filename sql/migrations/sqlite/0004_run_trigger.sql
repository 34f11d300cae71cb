-- What started a run: the command line, serve's schedule, or serve's HTTP API. Rows of runs
-- recorded before this column existed keep NULL (shown as unknown).
ALTER TABLE reward_runs ADD COLUMN trigger TEXT CHECK (trigger IN ('cli', 'schedule', 'http'));
