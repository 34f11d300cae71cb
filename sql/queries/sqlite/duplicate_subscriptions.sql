-- The subscription rows of users the snapshot read more than once ($1: a JSON array of their
-- ids), for the error that refuses them.
SELECT user_id, id FROM subscriptions
WHERE user_id IN (SELECT value FROM json_each($1))
ORDER BY user_id, id
