-- Marks a run failed with its error, also over an `abandoned` mark another run made meanwhile
-- (the failing process knows better why it ended), never over `succeeded`: a commit that landed
-- stays landed (the caller sees no row changed and says so).
UPDATE reward_runs SET status = 'failed', finished_at = $1, error = $2
WHERE id = $3 AND status IN ('running', 'abandoned')
