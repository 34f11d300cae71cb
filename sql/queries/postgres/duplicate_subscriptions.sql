-- The subscription rows of users the snapshot read more than once ($1: their ids), for the
-- error that refuses them.
SELECT user_id::bigint, id::bigint FROM subscriptions
WHERE user_id = ANY($1::bigint[])
ORDER BY user_id, id
