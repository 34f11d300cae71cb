-- The newest run of each kind (metrics, /healthz) without reading past every one-referrer run.
CREATE INDEX reward_runs_kind ON reward_runs (mode, status, id);
