-- A shard run (reconcile --shard K/N) records its shard.
ALTER TABLE reward_runs ADD COLUMN shard TEXT;
