-- Engine rows. Every query here returns whole rows (the dbsqlc.Engine
-- model), which engines.go turns into orch.Engine.

-- name: EngineByUser :one
-- Admit's one indexed read.
SELECT * FROM engines WHERE product_id = @product_id AND user_id = @user_id;

-- name: EngineByUserForUpdate :one
SELECT * FROM engines WHERE product_id = @product_id AND user_id = @user_id FOR UPDATE;

-- name: EngineByID :one
SELECT * FROM engines WHERE id = @id;

-- name: EngineByIDForUpdate :one
SELECT * FROM engines WHERE id = @id FOR UPDATE;

-- name: EnginesOnNode :many
SELECT * FROM engines WHERE node = @node;

-- name: ListEngines :many
SELECT * FROM engines
WHERE product_id = @product_id AND (@status::text = '' OR status = @status::text)
ORDER BY created_at DESC, id
LIMIT @lim OFFSET @off;

-- name: CountEnginesWithStatus :one
SELECT count(*) FROM engines WHERE product_id = @product_id AND (@status::text = '' OR status = @status::text);

-- name: CountEngines :one
SELECT count(*) FROM engines WHERE product_id = @product_id;

-- name: StatusCounts :many
SELECT status, count(*) AS n FROM engines WHERE product_id = @product_id GROUP BY status;

-- name: LockProduct :one
SELECT id FROM products WHERE id = @id FOR UPDATE;

-- name: LockPorts :exec
-- The node's port lock until the transaction ends (FreePort, MovePort).
SELECT pg_advisory_xact_lock(hashtext('orch_ports:' || @node::text));

-- name: FreePort :one
-- The lowest port of the range no engine on the node holds and the node
-- has not refused lately (port_blocks); 0 when none.
SELECT coalesce(min(p), 0)::int AS port FROM generate_series(@port_min::int, @port_max::int) AS p
WHERE NOT EXISTS (SELECT 1 FROM engines e WHERE e.node = @node AND e.port = p)
  AND NOT EXISTS (SELECT 1 FROM port_blocks b WHERE b.node = @node AND b.port = p AND b.blocked_until > now());

-- name: InsertEngine :exec
INSERT INTO engines (id, product_id, user_id, status, node, port, engine_version,
    engine_key_hash, engine_key_enc, state_deadline, operation_id, last_active_at)
VALUES (@id, @product_id, @user_id, @status, @node, @port, @engine_version,
    @engine_key_hash, @engine_key_enc, sqlc.narg(state_deadline), sqlc.narg(operation_id), now());

-- name: SetEngineState :one
-- A transition and the columns that change with it; a NULL argument leaves
-- its column alone, the clear_* flags empty theirs.
UPDATE engines SET
    status = @status,
    boot_duration_ms = coalesce(sqlc.narg(boot_duration_ms), boot_duration_ms),
    health_failures = CASE WHEN @reset_health::bool THEN 0 ELSE health_failures END,
    last_health_at = CASE WHEN @reset_health::bool THEN now() ELSE last_health_at END,
    restart_attempts = coalesce(sqlc.narg(restart_attempts), restart_attempts),
    engine_version = coalesce(sqlc.narg(engine_version), engine_version),
    engine_key_hash = coalesce(sqlc.narg(engine_key_hash), engine_key_hash),
    engine_key_enc = coalesce(sqlc.narg(engine_key_enc), engine_key_enc),
    prev_key_hash = CASE WHEN @clear_prev_key::bool THEN NULL ELSE coalesce(sqlc.narg(prev_key_hash), prev_key_hash) END,
    prev_key_expires_at = CASE WHEN @clear_prev_key::bool THEN NULL ELSE coalesce(sqlc.narg(prev_key_expires_at), prev_key_expires_at) END,
    sleep_reason = CASE WHEN @clear_sleep::bool THEN NULL ELSE coalesce(sqlc.narg(sleep_reason), sleep_reason) END,
    slept_at = CASE WHEN @clear_sleep::bool THEN NULL WHEN sqlc.narg(sleep_reason)::text IS NOT NULL THEN now() ELSE slept_at END,
    state_deadline = CASE WHEN @clear_deadline::bool THEN NULL ELSE coalesce(sqlc.narg(state_deadline), state_deadline) END,
    last_error = coalesce(sqlc.narg(last_error), last_error),
    operation_id = CASE WHEN @clear_operation::bool THEN NULL ELSE coalesce(sqlc.narg(operation_id), operation_id) END,
    updated_at = now()
WHERE id = @id
RETURNING *;

-- name: DeleteEngine :exec
DELETE FROM engines WHERE id = @id;

-- name: TouchActivity :exec
UPDATE engines SET last_active_at = now() WHERE id = @id;

-- name: MoveEnginePort :one
UPDATE engines SET port = @port, updated_at = now() WHERE id = @id RETURNING id;

-- name: BlockPort :exec
INSERT INTO port_blocks (node, port, reason, blocked_until) VALUES (@node, @port, @reason, @blocked_until)
ON CONFLICT (node, port) DO UPDATE SET reason = excluded.reason, blocked_until = excluded.blocked_until, created_at = now();

-- name: PortBlocks :many
SELECT * FROM port_blocks WHERE node = @node AND blocked_until > now() ORDER BY port;

-- name: IdleEngines :many
-- Running, quiet engines (no operation in flight, no live lease) whose
-- last activity (last admit or last state change) is before idle_before,
-- longest idle first.
SELECT * FROM engines
WHERE status = 'running'
  AND greatest(coalesce(last_active_at, created_at), updated_at) < @idle_before::timestamptz
  AND NOT EXISTS (SELECT 1 FROM operations o WHERE o.id = engines.operation_id AND o.status IN ('pending', 'running'))
  AND (lease_job_id IS NULL OR lease_until < now())
ORDER BY greatest(coalesce(last_active_at, created_at), updated_at)
LIMIT @lim;

-- name: MarkSleeping :many
-- Puts those of ids still running, quiet and idle since before idle_before
-- to sleep in place, in one statement.
UPDATE engines SET status = 'sleeping', sleep_reason = @reason::text, slept_at = now(), updated_at = now()
WHERE id = ANY(@ids::uuid[]) AND status = 'running'
  AND greatest(coalesce(last_active_at, created_at), updated_at) < @idle_before::timestamptz
  AND NOT EXISTS (SELECT 1 FROM operations o WHERE o.id = engines.operation_id AND o.status IN ('pending', 'running'))
  AND (lease_job_id IS NULL OR lease_until < now())
RETURNING *;

-- name: BackupCandidates :many
-- Every engine not being created or destroyed, after after_id (keyset).
SELECT * FROM engines
WHERE status NOT IN ('provisioning', 'destroying') AND id > @after_id
ORDER BY id LIMIT @lim;
