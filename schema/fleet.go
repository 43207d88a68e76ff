package schema

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	orch "github.com/enginefleet/orchestrator"
)

// This file holds the fleet upkeep queries: health sweeps, auto-restart,
// idle sleep and the scheduler's leader lock and tick bookkeeping. They are
// written for large fleets: a sweep batch costs one read and a couple of
// batched writes, never one write per healthy engine.

// quiet is true for an engine no operation or lease is working on: a
// sweep or a crash check must not judge an engine that a stop, restart or
// reconcile is in the middle of.
const quiet = `NOT EXISTS (SELECT 1 FROM operations o WHERE o.id = engines.operation_id AND o.status IN ('pending', 'running'))
	AND (engines.lease_job_id IS NULL OR engines.lease_until < now())`

// NodeEngine is an engine id and the node it lives on.
type NodeEngine struct {
	Node string
	ID   string
}

// RunningEngines lists every running engine (of one node, or of all when
// node is ""), ordered by node then id: what a health sweep fans out.
func (q *Queries) RunningEngines(ctx context.Context, node string) ([]NodeEngine, error) {
	rows, err := q.db.Query(ctx, `SELECT node, id::text FROM engines
		WHERE status = 'running' AND ($1 = '' OR node = $1) ORDER BY node, id`, node)
	if err != nil {
		return nil, fmt.Errorf("list running engines: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (NodeEngine, error) {
		var ne NodeEngine
		err := r.Scan(&ne.Node, &ne.ID)
		return ne, err
	})
	if err != nil {
		return nil, fmt.Errorf("list running engines: %w", err)
	}
	return out, nil
}

// ProbeTargets returns those of ids that are running on node and quiet
// (no operation in flight, no live lease): the engines a sweep batch may
// judge. Only the fields a probe needs are filled.
func (q *Queries) ProbeTargets(ctx context.Context, node string, ids []string) ([]orch.Engine, error) {
	rows, err := q.db.Query(ctx, `SELECT id::text, product_id::text, user_id, node, port, health_failures, last_health_at
		FROM engines WHERE id = ANY($1::uuid[]) AND node = $2 AND status = 'running' AND `+quiet+` ORDER BY id`, ids, node)
	if err != nil {
		return nil, fmt.Errorf("load probe targets: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (orch.Engine, error) {
		e := orch.Engine{Status: orch.StateRunning}
		err := r.Scan(&e.ID, &e.ProductID, &e.UserID, &e.Node, &e.Port, &e.HealthFailures, &e.LastHealthAt)
		return e, err
	})
	if err != nil {
		return nil, fmt.Errorf("load probe targets: %w", err)
	}
	return out, nil
}

// MarkHealthy records a successful probe of every engine in ids with one
// statement: last_health_at = now, failure count reset. Engines that left
// running meanwhile are skipped. Returns the rows updated.
func (q *Queries) MarkHealthy(ctx context.Context, ids []string) (int64, error) {
	if len(ids) == 0 {
		return 0, nil
	}
	tag, err := q.db.Exec(ctx, `UPDATE engines SET last_health_at = now(), health_failures = 0
		WHERE id = ANY($1::uuid[]) AND status = 'running'`, ids)
	if err != nil {
		return 0, fmt.Errorf("mark engines healthy: %w", err)
	}
	return tag.RowsAffected(), nil
}

// FailureCount is an engine's consecutive failed probes after a sweep.
type FailureCount struct {
	ID       string
	Failures int
}

// CountFailures adds one failed probe to every engine in ids that is still
// running and quiet, with one statement, and returns the new counts.
func (q *Queries) CountFailures(ctx context.Context, ids []string) ([]FailureCount, error) {
	if len(ids) == 0 {
		return nil, nil
	}
	rows, err := q.db.Query(ctx, `UPDATE engines SET health_failures = health_failures + 1
		WHERE id = ANY($1::uuid[]) AND status = 'running' AND `+quiet+`
		RETURNING id::text, health_failures`, ids)
	if err != nil {
		return nil, fmt.Errorf("count health failures: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (FailureCount, error) {
		var fc FailureCount
		err := r.Scan(&fc.ID, &fc.Failures)
		return fc, err
	})
	if err != nil {
		return nil, fmt.Errorf("count health failures: %w", err)
	}
	return out, nil
}

// InsertAudits appends many audit rows with one statement.
func (q *Queries) InsertAudits(ctx context.Context, es []orch.AuditEntry) error {
	if len(es) == 0 {
		return nil
	}
	n := len(es)
	products, users, engines := make([]*string, n), make([]*string, n), make([]*string, n)
	actions, actors, metas := make([]string, n), make([]string, n), make([]string, n)
	durations := make([]*int64, n)
	for i, e := range es {
		md := e.Metadata
		if md == nil {
			md = map[string]any{}
		}
		b, err := json.Marshal(md)
		if err != nil {
			return fmt.Errorf("encode audit metadata: %w", err)
		}
		products[i], users[i], engines[i] = nullUUID(e.ProductID), nullText(e.UserID), nullUUID(e.EngineID)
		actions[i], actors[i], metas[i], durations[i] = string(e.Action), e.Actor, string(b), e.DurationMS
	}
	_, err := q.db.Exec(ctx, `INSERT INTO audit_log (product_id, user_id, engine_id, action, actor, metadata, duration_ms)
		SELECT p, u, e, a, ac, m::jsonb, d
		FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::bigint[]) AS t(p, u, e, a, ac, m, d)`,
		products, users, engines, actions, actors, metas, durations)
	if err != nil {
		return fmt.Errorf("insert %d audit rows: %w", n, err)
	}
	return nil
}

// SetOperationJob records which River job works an operation.
func (q *Queries) SetOperationJob(ctx context.Context, opID string, jobID int64) error {
	if _, err := q.db.Exec(ctx, `UPDATE operations SET job_id = $2 WHERE id = $1`, opID, jobID); err != nil {
		return fmt.Errorf("record operation job: %w", err)
	}
	return nil
}

// OperationJob returns the River job recorded for an operation (0 if none).
func (q *Queries) OperationJob(ctx context.Context, opID string) (int64, error) {
	var id *int64
	err := q.db.QueryRow(ctx, `SELECT job_id FROM operations WHERE id = $1`, opID).Scan(&id)
	if errors.Is(err, pgx.ErrNoRows) || (err == nil && id == nil) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read operation job: %w", err)
	}
	return *id, nil
}

// LockJob locks a River job row until the transaction ends, so no worker
// can pick it up meanwhile (River fetches with SKIP LOCKED), and returns
// its state ("" when the job is gone).
func (q *Queries) LockJob(ctx context.Context, jobID int64) (string, error) {
	var state string
	err := q.db.QueryRow(ctx, `SELECT state::text FROM river_job WHERE id = $1 FOR UPDATE`, jobID).Scan(&state)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("lock job: %w", err)
	}
	return state, nil
}

// TryLeaderLock tries to take the session-level advisory lock key on this
// connection; true when this session holds it (now or already).
func (q *Queries) TryLeaderLock(ctx context.Context, key int64) (bool, error) {
	var got bool
	if err := q.db.QueryRow(ctx, `SELECT pg_try_advisory_lock($1)`, key).Scan(&got); err != nil {
		return false, fmt.Errorf("try leader lock: %w", err)
	}
	return got, nil
}

// ReleaseLeaderLock releases the session-level advisory lock key.
func (q *Queries) ReleaseLeaderLock(ctx context.Context, key int64) error {
	if _, err := q.db.Exec(ctx, `SELECT pg_advisory_unlock($1)`, key); err != nil {
		return fmt.Errorf("release leader lock: %w", err)
	}
	return nil
}

// Ping checks that the connection still works.
func (q *Queries) Ping(ctx context.Context) error {
	if _, err := q.db.Exec(ctx, `SELECT 1`); err != nil {
		return fmt.Errorf("ping: %w", err)
	}
	return nil
}

// SessionKeepalives makes the server notice a dead client within about
// idle+interval·count seconds, so a vanished leader's lock is released.
func (q *Queries) SessionKeepalives(ctx context.Context, idle, interval, count int) error {
	_, err := q.db.Exec(ctx, fmt.Sprintf(`SET tcp_keepalives_idle = %d; SET tcp_keepalives_interval = %d; SET tcp_keepalives_count = %d`,
		idle, interval, count))
	if err != nil {
		return fmt.Errorf("set keepalives: %w", err)
	}
	return nil
}

// LastTicks returns the last tick each schedule enqueued.
func (q *Queries) LastTicks(ctx context.Context) (map[string]time.Time, error) {
	rows, err := q.db.Query(ctx, `SELECT schedule, last_tick FROM scheduler_ticks`)
	if err != nil {
		return nil, fmt.Errorf("read scheduler ticks: %w", err)
	}
	defer rows.Close()
	out := map[string]time.Time{}
	for rows.Next() {
		var name string
		var t time.Time
		if err := rows.Scan(&name, &t); err != nil {
			return nil, fmt.Errorf("read scheduler ticks: %w", err)
		}
		out[name] = t
	}
	return out, rows.Err()
}

// RecordTick notes that schedule enqueued tick (kept monotonic).
func (q *Queries) RecordTick(ctx context.Context, schedule string, tick time.Time, leader string) error {
	_, err := q.db.Exec(ctx, `INSERT INTO scheduler_ticks (schedule, last_tick, leader) VALUES ($1, $2, $3)
		ON CONFLICT (schedule) DO UPDATE SET last_tick = greatest(scheduler_ticks.last_tick, excluded.last_tick),
			leader = excluded.leader, updated_at = now()`, schedule, tick, leader)
	if err != nil {
		return fmt.Errorf("record scheduler tick: %w", err)
	}
	return nil
}

// EngineQuiet reports whether no operation is in flight on the engine and
// no live lease is held on it (false when the row is gone).
func (q *Queries) EngineQuiet(ctx context.Context, id string) (bool, error) {
	_, ok, err := q.EngineRunningQuiet(ctx, id)
	return ok, err
}

// EngineRunningQuiet returns the engine's status and whether it is quiet
// (see EngineQuiet); "" when the row is gone.
func (q *Queries) EngineRunningQuiet(ctx context.Context, id string) (orch.State, bool, error) {
	var status string
	var ok bool
	err := q.db.QueryRow(ctx, `SELECT status, `+quiet+` FROM engines WHERE id = $1`, id).Scan(&status, &ok)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", false, nil
	}
	if err != nil {
		return "", false, fmt.Errorf("check engine quiet: %w", err)
	}
	return orch.State(status), ok, nil
}
