package schema

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"

	orch "github.com/enginefleet/orchestrator"
)

// WorkerLockSpace is the first key of every worker session's advisory lock
// (pg_advisory_lock(WorkerLockSpace, lock_key)); "orcw".
const WorkerLockSpace int32 = 0x6f726377

// WorkerSession is one worker process as the liveness table records it.
type WorkerSession struct {
	ID       string // the process's River client id
	Node     string
	LockKey  int32
	Hostname string
	PID      int
}

// LockWorkerSession takes the session's advisory lock on this connection
// (which must be dedicated to the session: the lock lives as long as the
// connection). False when another session holds the same key.
func (q *Queries) LockWorkerSession(ctx context.Context, key int32) (bool, error) {
	var got bool
	if err := q.db.QueryRow(ctx, `SELECT pg_try_advisory_lock($1, $2)`, WorkerLockSpace, key).Scan(&got); err != nil {
		return false, fmt.Errorf("lock worker session: %w", err)
	}
	return got, nil
}

// UpsertWorkerSession records (or refreshes) a worker session.
func (q *Queries) UpsertWorkerSession(ctx context.Context, s WorkerSession) error {
	_, err := q.db.Exec(ctx, `INSERT INTO worker_sessions (id, node, lock_key, hostname, pid)
		VALUES ($1, $2, $3, $4, $5)
		ON CONFLICT (id) DO UPDATE SET lock_key = EXCLUDED.lock_key, seen_at = now()`,
		s.ID, s.Node, s.LockKey, s.Hostname, s.PID)
	if err != nil {
		return fmt.Errorf("record worker session: %w", err)
	}
	return nil
}

// HeartbeatWorkerSession refreshes seen_at and the job ids the session is
// working. False when the row is gone (pruned): the caller records it again.
func (q *Queries) HeartbeatWorkerSession(ctx context.Context, id string, running []int64) (bool, error) {
	if running == nil {
		running = []int64{}
	}
	tag, err := q.db.Exec(ctx, `UPDATE worker_sessions SET seen_at = now(), running = $2 WHERE id = $1`, id, running)
	if err != nil {
		return false, fmt.Errorf("worker heartbeat: %w", err)
	}
	return tag.RowsAffected() == 1, nil
}

// DeleteWorkerSession removes a session that is shutting down cleanly.
func (q *Queries) DeleteWorkerSession(ctx context.Context, id string) error {
	if _, err := q.db.Exec(ctx, `DELETE FROM worker_sessions WHERE id = $1`, id); err != nil {
		return fmt.Errorf("delete worker session: %w", err)
	}
	return nil
}

// deadSessions selects the sessions whose process is gone: its advisory
// lock is free (its connection closed) and it has not been seen for $1
// seconds. Both, so that a session whose connection blips (a Postgres
// restart drops every lock at once) is not declared dead before it had
// the chance to come back.
var deadSessions = `SELECT s.id FROM worker_sessions s
	WHERE s.seen_at < now() - make_interval(secs => $1)
	AND NOT EXISTS (SELECT 1 FROM pg_locks l
		WHERE l.locktype = 'advisory' AND l.granted
		AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
		AND l.classid = ` + strconv.Itoa(int(WorkerLockSpace)) + `::oid AND l.objid = s.lock_key::oid AND l.objsubid = 2)`

// RescuedJob is a running job whose worker was gone, re-queued.
type RescuedJob struct {
	ID      int64
	Kind    string
	Session string
	Dead    bool // the session died (else: it lives but lost the job)
	State   string
}

// maxRescues bounds how often one job is re-queued because its worker
// vanished: a job that kills its worker every time must end, not loop.
const maxRescues = 10

// RescueLostJobs re-queues, at once, every running River job whose worker
// is gone: its session is dead (see deadSessions: stale > staleAfter), or
// the session lives but has not been working the job for a while (its
// heartbeat's running list, which also holds jobs finished in the last
// minute, has lacked it since orphanAfter after the attempt began). Such a
// re-queue does not consume an attempt (max_attempts grows with it, as
// River's snooze does); after maxRescues the job is discarded instead, and
// a job whose cancellation was requested is cancelled. Engine leases held
// by dead sessions or by the re-queued attempts are released in the same
// statement, so the next attempt can take its engine right away.
func (q *Queries) RescueLostJobs(ctx context.Context, staleAfter, orphanAfter time.Duration) ([]RescuedJob, error) {
	rows, err := q.db.Query(ctx, `WITH dead AS (`+deadSessions+`),
	lost AS (
		SELECT j.id, s.id AS session, s.id IN (SELECT id FROM dead) AS dead,
			CASE WHEN j.metadata ? 'cancel_attempted_at' THEN 'cancelled'
				WHEN coalesce((j.metadata->>'orch:rescues')::int, 0) >= $3 THEN 'discarded'
				ELSE 'available' END AS next
		FROM river_job j
		JOIN worker_sessions s ON s.id = j.attempted_by[array_length(j.attempted_by, 1)]
		WHERE j.state = 'running'
		AND (s.id IN (SELECT id FROM dead)
			OR (NOT j.id = ANY (s.running) AND j.attempted_at < s.seen_at - make_interval(secs => $2)))
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
	SELECT id, kind, session, dead, next FROM requeued`, staleAfter.Seconds(), orphanAfter.Seconds(), maxRescues)
	return collect(rows, err, "rescue lost jobs", func(r pgx.Row) (RescuedJob, error) {
		var j RescuedJob
		err := r.Scan(&j.ID, &j.Kind, &j.Session, &j.Dead, &j.State)
		return j, err
	})
}

// PruneWorkerSessions deletes sessions dead for longer than age (their
// jobs were re-queued long ago).
func (q *Queries) PruneWorkerSessions(ctx context.Context, age time.Duration) (int64, error) {
	tag, err := q.db.Exec(ctx, `DELETE FROM worker_sessions WHERE id IN (`+deadSessions+`)`, age.Seconds())
	if err != nil {
		return 0, fmt.Errorf("prune worker sessions: %w", err)
	}
	return tag.RowsAffected(), nil
}

// Lease names the job attempt and the worker session running it that
// works an engine; all three must match for a holder to be the same one.
// Job is negative for a reconcile pass and 0 for the operation sweep, which
// are not lifecycle jobs of the engine.
type Lease struct {
	Job     int64
	Attempt int
	Owner   string
}

// AcquireLease gives l exclusive work on an engine until `until`, unless
// another live attempt holds it: the same job's earlier attempt is another
// holder (fencing), and waits like any other. ENGINE_NOT_FOUND if the row
// is gone.
func (q *Queries) AcquireLease(ctx context.Context, engineID string, l Lease, until time.Time) (bool, error) {
	var exists, got bool
	err := q.db.QueryRow(ctx, `WITH u AS (UPDATE engines SET lease_job_id = $2, lease_attempt = $3, lease_owner = nullif($4, ''), lease_until = $5
			WHERE id = $1 AND (lease_job_id IS NULL OR lease_until < now()
				OR (lease_job_id = $2 AND lease_attempt IS NOT DISTINCT FROM $3 AND lease_owner IS NOT DISTINCT FROM nullif($4, '')))
			RETURNING 1)
		SELECT EXISTS (SELECT 1 FROM engines WHERE id = $1), EXISTS (SELECT 1 FROM u)`,
		engineID, l.Job, l.Attempt, l.Owner, until).Scan(&exists, &got)
	if err != nil {
		return false, fmt.Errorf("acquire engine lease: %w", err)
	}
	if !exists {
		return false, orch.Errorf(orch.CodeEngineNotFound, "engine not found")
	}
	return got, nil
}

// HoldsLease reports whether l still holds the engine's lease (false when
// the row is gone). Inside a transaction that locked the row, a true
// answer fences the commit: no other attempt can have taken over.
func (q *Queries) HoldsLease(ctx context.Context, engineID string, l Lease) (bool, error) {
	var holds bool
	err := q.db.QueryRow(ctx, `SELECT coalesce(lease_job_id = $2 AND lease_attempt IS NOT DISTINCT FROM $3
			AND lease_owner IS NOT DISTINCT FROM nullif($4, ''), false) FROM engines WHERE id = $1`,
		engineID, l.Job, l.Attempt, l.Owner).Scan(&holds)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("check engine lease: %w", err)
	}
	return holds, nil
}

// ReleaseLease gives up l's lease on an engine (if it still holds it).
func (q *Queries) ReleaseLease(ctx context.Context, engineID string, l Lease) error {
	if _, err := q.db.Exec(ctx, `UPDATE engines SET lease_job_id = NULL, lease_attempt = NULL, lease_owner = NULL, lease_until = NULL
		WHERE id = $1 AND lease_job_id = $2 AND lease_attempt IS NOT DISTINCT FROM $3 AND lease_owner IS NOT DISTINCT FROM nullif($4, '')`,
		engineID, l.Job, l.Attempt, l.Owner); err != nil {
		return fmt.Errorf("release engine lease: %w", err)
	}
	return nil
}
