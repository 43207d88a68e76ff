-- Worker liveness and engine leases (liveness.go).

-- name: LockWorkerSession :one
-- 1869767543 is WorkerLockSpace ("orcw").
SELECT pg_try_advisory_lock(1869767543, @lock_key::int) AS got;

-- name: UpsertWorkerSession :exec
INSERT INTO worker_sessions (id, node, lock_key, hostname, pid)
VALUES (@id, @node, @lock_key, @hostname, @pid)
ON CONFLICT (id) DO UPDATE SET lock_key = EXCLUDED.lock_key, seen_at = now();

-- name: HeartbeatWorkerSession :execrows
UPDATE worker_sessions SET seen_at = now(), running = @running::bigint[] WHERE id = @id;

-- name: DeleteWorkerSession :exec
DELETE FROM worker_sessions WHERE id = @id;

-- name: RescueLostJobs :many
-- A session is dead when its advisory lock is free (its connection
-- closed) and it has not been seen for stale_after seconds: both, so that
-- a Postgres restart (every lock dropped at once) does not kill live ones.
WITH dead AS (
    SELECT s.id FROM worker_sessions s
    WHERE s.seen_at < now() - make_interval(secs => @stale_after::float8)
      AND NOT worker_session_locked(s.lock_key)
),
lost AS (
    SELECT j.id, s.id AS session, s.id IN (SELECT id FROM dead) AS dead,
        CASE WHEN j.metadata ? 'cancel_attempted_at' THEN 'cancelled'
             WHEN coalesce((j.metadata->>'orch:rescues')::int, 0) >= @max_rescues::int THEN 'discarded'
             ELSE 'available' END AS next
    FROM river_job j
    JOIN worker_sessions s ON s.id = j.attempted_by[array_length(j.attempted_by, 1)]
    WHERE j.state = 'running'
      AND (s.id IN (SELECT id FROM dead)
        OR (NOT j.id = ANY (s.running) AND j.attempted_at < s.seen_at - make_interval(secs => @orphan_after::float8)))
    FOR UPDATE OF j SKIP LOCKED
),
requeued AS (
    UPDATE river_job j SET
        state = lost.next::river_job_state,
        scheduled_at = now(),
        finalized_at = CASE WHEN lost.next = 'available' THEN NULL ELSE now() END,
        max_attempts = CASE WHEN lost.next = 'available' THEN j.max_attempts + 1 ELSE j.max_attempts END,
        errors = array_append(j.errors, jsonb_build_object('at', now(), 'attempt', j.attempt, 'trace', '',
            'error', CASE WHEN lost.dead THEN 'worker ' || lost.session || ' died; re-queued at once'
                ELSE 'worker ' || lost.session || ' lost the job; re-queued' END)),
        metadata = j.metadata || jsonb_build_object('orch:rescues', coalesce((j.metadata->>'orch:rescues')::int, 0) + 1)
    FROM lost WHERE j.id = lost.id
    RETURNING j.id, j.kind, lost.session, lost.dead, lost.next
),
freed AS (
    UPDATE engines e SET lease_job_id = NULL, lease_attempt = NULL, lease_owner = NULL, lease_until = NULL
    WHERE e.lease_owner IN (SELECT id FROM dead) OR abs(e.lease_job_id) IN (SELECT id FROM requeued)
    RETURNING e.id
)
SELECT requeued.id, requeued.kind, requeued.session::text AS session, requeued.dead::bool AS dead, requeued.next::text AS next
FROM requeued;

-- name: PruneWorkerSessions :execrows
DELETE FROM worker_sessions s
WHERE s.seen_at < now() - make_interval(secs => @age::float8)
  AND NOT worker_session_locked(s.lock_key);

-- name: AcquireLease :one
-- The lease is free, lapsed, or already this holder's (same job, attempt
-- and session); exists is false when the row is gone.
WITH u AS (
    UPDATE engines SET lease_job_id = @job::bigint, lease_attempt = @attempt::int, lease_owner = nullif(@owner::text, ''), lease_until = @until::timestamptz
    WHERE id = @id AND (lease_job_id IS NULL OR lease_until < now()
        OR (lease_job_id = @job::bigint AND lease_attempt IS NOT DISTINCT FROM @attempt::int
            AND lease_owner IS NOT DISTINCT FROM nullif(@owner::text, '')))
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM engines x WHERE x.id = @id)::bool AS found, EXISTS (SELECT 1 FROM u)::bool AS got;

-- name: ReleaseLease :exec
UPDATE engines SET lease_job_id = NULL, lease_attempt = NULL, lease_owner = NULL, lease_until = NULL
WHERE id = @id AND lease_job_id = @job::bigint AND lease_attempt IS NOT DISTINCT FROM @attempt::int
  AND lease_owner IS NOT DISTINCT FROM nullif(@owner::text, '');

-- name: TakeLease :one
-- AcquireLease returning the engine row it leased (no row: not taken, or
-- gone).
UPDATE engines SET lease_job_id = @job::bigint, lease_attempt = @attempt::int, lease_owner = nullif(@owner::text, ''),
    lease_until = @until::timestamptz
WHERE id = @id AND (lease_job_id IS NULL OR lease_until < now()
    OR (lease_job_id = @job::bigint AND lease_attempt IS NOT DISTINCT FROM @attempt::int
        AND lease_owner IS NOT DISTINCT FROM nullif(@owner::text, '')))
RETURNING *;

-- name: EngineExists :one
SELECT EXISTS (SELECT 1 FROM engines WHERE id = @id)::bool AS found;

-- name: LockLeasedEngine :one
-- The engine row, locked for the transaction, and whether the lease still
-- holds it: a commit's one read.
SELECT sqlc.embed(engines), coalesce(lease_job_id = @job::bigint AND lease_attempt IS NOT DISTINCT FROM @attempt::int
    AND lease_owner IS NOT DISTINCT FROM nullif(@owner::text, ''), false)::bool AS holds
FROM engines WHERE id = @id FOR UPDATE;
