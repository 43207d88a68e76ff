-- Operations: what a waiting request or GET /operations/{id} follows.

-- name: InsertOperation :exec
INSERT INTO operations (id, product_id, engine_id, user_id, kind, status, actor, payload, job_id, deadline)
VALUES (@id, @product_id, @engine_id, @user_id, @kind, 'pending', @actor, @payload, @job_id, sqlc.narg(deadline));

-- name: ProductOperation :one
SELECT * FROM operations WHERE id = @id AND product_id = @product_id;

-- name: OperationByID :one
SELECT * FROM operations WHERE id = @id;

-- name: SetOperation :exec
-- A finished operation never changes again. updated_at is the statement's
-- time, not the transaction's: the outcome's commit ends with this, so it
-- tells a waiter how long the news took to reach it.
UPDATE operations SET status = @status, error_code = nullif(@error_code::text, ''),
    error_message = nullif(@error_message::text, ''), updated_at = clock_timestamp()
WHERE id = @id AND status IN ('pending', 'running');

-- name: StartOperation :one
-- Marks a pending operation running and returns it (a finished one is
-- returned as it is).
UPDATE operations SET status = CASE WHEN status = 'pending' THEN 'running' ELSE status END,
    updated_at = CASE WHEN status = 'pending' THEN now() ELSE updated_at END
WHERE id = @id
RETURNING *;

-- name: AbandonedOperations :many
-- Unfinished operations on a node's engines (or on engines that are gone)
-- that nothing will finish: their job is completed, cancelled, discarded
-- or deleted, or their deadline passed while the job is not running.
-- Operations recorded before jobs and deadlines were count after 15
-- minutes.
SELECT sqlc.embed(o), coalesce(j.state::text, '')::text AS job_state, (e.id IS NULL)::bool AS engine_gone
FROM operations o
LEFT JOIN river_job j ON j.id = o.job_id
LEFT JOIN engines e ON e.id = o.engine_id
WHERE o.status IN ('pending', 'running')
  AND (e.id IS NULL OR e.node = @node)
  AND ((o.job_id IS NOT NULL AND (j.id IS NULL OR j.state IN ('completed', 'cancelled', 'discarded')))
    OR (o.deadline < now() AND (j.id IS NULL OR j.state <> 'running'))
    OR (o.job_id IS NULL AND o.deadline IS NULL AND o.created_at < now() - interval '15 minutes'))
ORDER BY o.created_at
LIMIT @lim;

-- name: UnfinishedOperations :one
-- How many operations of a product are pending or running, counted up to
-- @up_to (the cost stays bounded however large a burst is).
SELECT count(*)::int FROM (
    SELECT 1 FROM operations WHERE product_id = @product_id AND status IN ('pending', 'running') LIMIT @up_to::int
) s;
