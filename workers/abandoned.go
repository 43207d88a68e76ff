package workers

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/schema"
)

// The operation sweep: every operation ends, whatever happens to its job.
// An operation is abandoned when its job is cancelled (the job UI),
// discarded (its last attempt failed before committing, or was cut off),
// deleted, or completed without recording an outcome, or when its deadline
// passed while its job is not running. Each worker process sweeps its
// node's abandoned operations every couple of seconds and ends each one
// under the engine's lease (so never while an attempt still works it):
//
//   - destroy: the engine is removed as asked (container, volume, row) and
//     the operation succeeds; if the backend refuses, it is tried again on
//     the next sweep until the deadline, then the operation fails and the
//     engine stays destroying for reconcile;
//   - provision: the engine goes failed with the reason;
//   - anything else: the engine's runtime is brought back in line with its
//     row (a half-done rotate-key or upgrade left the container on the new
//     key or image while the row keeps the old one: recreate it from the
//     row), the operation fails with the reason, and an abandoned
//     auto-restart attempt counts as a failed one (the next is scheduled,
//     or the engine gives up).
//
// Each one is audited as reconcile (repair operation_abandoned).

const sweepOperationsEvery = 2 * time.Second

func (rec *Reconciler) sweepOperationsLoop(ctx context.Context, rc *river.Client[pgx.Tx]) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(sweepOperationsEvery):
		}
		if _, err := rec.SweepOperations(ctx, rc); err != nil && ctx.Err() == nil {
			rec.log.Warn("sweep operations", "error", err)
		}
	}
}

// SweepOperations ends this node's abandoned operations now; it returns
// how many it ended.
func (rec *Reconciler) SweepOperations(ctx context.Context, rc *river.Client[pgx.Tx]) (int, error) {
	ops, err := schema.New(rec.pool).AbandonedOperations(ctx, rec.node, 50)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, a := range ops {
		ended, err := rec.endAbandoned(ctx, rc, a)
		if err != nil {
			rec.log.Warn("end abandoned operation", "operation_id", a.ID, "engine_id", a.EngineID, "error", err)
			continue
		}
		if ended {
			n++
		}
	}
	return n, nil
}

// abandonReason says why nothing will finish a, as a stable word (audit
// and metric label), the code the operation fails with, and its message.
func abandonReason(a schema.AbandonedOperation) (string, orch.Code, string) {
	boots := a.Kind == orch.OpProvision || a.Kind == orch.OpStart || a.Kind == orch.OpWake ||
		a.Kind == orch.OpRestart || a.Kind == orch.OpUpgrade || a.Kind == orch.OpRestore
	switch {
	case a.JobID != 0 && a.JobState == "":
		return "job_deleted", orch.CodeBackendFailed, "the operation's job was deleted before it finished"
	case a.JobState == string(rivertype.JobStateCancelled):
		return "job_cancelled", orch.CodeBackendFailed, "the operation's job was cancelled before it finished"
	case a.JobState == string(rivertype.JobStateDiscarded):
		return "job_discarded", orch.CodeBackendFailed, "the operation's job gave up: its last attempt failed or was cut off before it finished"
	case a.JobState == string(rivertype.JobStateCompleted):
		return "job_completed", orch.CodeInternal, "the operation's job ended without recording an outcome"
	}
	code := orch.CodeBackendTimeout
	if boots {
		code = orch.CodeBootTimeout
	}
	return "deadline", code, "the operation did not finish before its deadline"
}

// inFlight reports whether a River job state may still run.
func jobInFlight(state string) bool {
	switch rivertype.JobState(state) {
	case rivertype.JobStateAvailable, rivertype.JobStatePending, rivertype.JobStateRetryable,
		rivertype.JobStateScheduled, rivertype.JobStateRunning:
		return true
	}
	return false
}

// endAbandoned ends one abandoned operation (see the top of this file).
// It reports false when it could not act now (an attempt holds the engine,
// or the backend refused a destroy before the deadline).
func (rec *Reconciler) endAbandoned(ctx context.Context, rc *river.Client[pgx.Tx], a schema.AbandonedOperation) (bool, error) {
	reason, code, msg := abandonReason(a)
	q := schema.New(rec.pool)
	lease := schema.Lease{Owner: rec.session.id}
	var e orch.Engine
	if !a.EngineGone {
		got, err := q.AcquireLease(ctx, a.EngineID, lease, time.Now().Add(rec.jobTimeout()))
		if err != nil && !orch.IsCode(err, orch.CodeEngineNotFound) {
			return false, err
		}
		if err == nil && !got {
			return false, nil // an attempt (or another sweep) works the engine
		}
		if err == nil {
			defer rec.releaseLease(ctx, a.EngineID, lease)
			if e, err = q.EngineByID(ctx, a.EngineID); err != nil && !orch.IsCode(err, orch.CodeEngineNotFound) {
				return false, err
			}
		}
	}
	owns := e.ID != "" && e.OperationID == a.ID
	out := outcome{action: orch.ActionReconcile, err: orch.Errorf(code, "%s", msg),
		meta: map[string]any{"repair": "operation_abandoned", "kind": string(a.Kind), "reason": reason}}
	switch {
	case e.ID == "":
		if a.Kind == orch.OpDestroy {
			out.err = nil // the engine is gone: what was asked happened
		}
		out.action = ""
	case !owns:
		out.action = "" // superseded by a later operation: nothing to repair
	case e.Status == orch.StateDestroying:
		rerr := rec.backend.RemoveContainer(ctx, e.ID)
		if rerr == nil {
			rerr = rec.backend.RemoveVolume(ctx, e.ID)
		}
		if rerr != nil {
			if time.Now().Before(a.Deadline) || a.Deadline.IsZero() {
				rec.log.Warn("abandoned destroy: backend refused; trying again", "engine_id", e.ID, "error", rerr)
				return false, nil
			}
			out.err = backendErr("remove engine", rerr)
			break
		}
		out = outcome{action: orch.ActionDestroy, delete: true,
			meta: map[string]any{"engine_version": e.EngineVersion, "port": e.Port, "repair": "operation_abandoned", "reason": reason}}
	case e.Status == orch.StateProvisioning:
		out.action = orch.ActionProvisionFailed
		out.change = &schema.EngineChange{Status: orch.StateFailed, ClearDeadline: true, OperationID: ptr(""), LastError: ptr(msg)}
	default:
		if err := rec.converge(ctx, e); err != nil {
			rec.log.Warn("abandoned operation: could not bring the runtime back in line with the row; health checks will",
				"engine_id", e.ID, "error", err)
			out.meta["converged"] = false
		}
		out.change = &schema.EngineChange{Status: e.Status, OperationID: ptr(""), ClearDeadline: true}
		if isAutoRestartOp(a.Operation) && e.Status == orch.StateFailed {
			n := e.RestartAttempts + 1
			out.change.RestartAttempts = &n
			out.after = func(ctx context.Context, q *schema.Queries, tx pgx.Tx) error {
				cur, err := q.EngineByIDForUpdate(ctx, e.ID)
				if err != nil {
					return err
				}
				return rec.nextAutoRestart(ctx, q, tx, rc, cur, n, out.err)
			}
		}
	}
	err := inTx(ctx, rec.pool, func(tx pgx.Tx) error {
		tq := schema.New(tx)
		if jobInFlight(a.JobState) && a.JobID != 0 {
			// Past its deadline and not running: it must not run later.
			if _, err := rc.JobCancelTx(ctx, tx, a.JobID); err != nil && !errors.Is(err, rivertype.ErrNotFound) {
				return err
			}
		}
		if e.ID == "" {
			if out.err != nil {
				return tq.SetOperation(ctx, a.ID, orch.OpFailed, orch.ErrorCode(out.err), errMessage(out.err))
			}
			return tq.SetOperation(ctx, a.ID, orch.OpSucceeded, "", "")
		}
		return rec.commitTx(ctx, tq, tx, e, a.Operation, lease, out)
	})
	if errors.Is(err, errLeaseLost) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	rec.metrics.OperationAbandoned(reason)
	rec.log.Warn("operation abandoned: ended by the operation sweep", "operation_id", a.ID, "engine_id", a.EngineID,
		"kind", a.Kind, "reason", reason, "job_id", a.JobID, "job_state", a.JobState)
	return true, nil
}

// converge brings an engine's runtime in line with its row after an
// operation was abandoned half-way: an engine that should serve runs from
// the row's spec (image, key hash, overlap), one that should not is
// stopped. A failed engine is left to auto-restart or its owner.
func (rec *Reconciler) converge(ctx context.Context, e orch.Engine) error {
	switch {
	case e.Status == orch.StateRunning || (e.Status == orch.StateSleeping && rec.sleepingRuns):
		if err := rec.backend.Ensure(ctx, rec.currentSpec(e)); err != nil {
			return backendErr("create engine", err)
		}
		if err := rec.backend.Start(ctx, e.ID); err != nil {
			return backendErr("start engine", err)
		}
	case e.Status == orch.StateStopped || e.Status == orch.StateSleeping:
		if err := rec.backend.Stop(ctx, e.ID, rec.eng.StopGrace); err != nil {
			return backendErr("stop engine", err)
		}
	}
	return nil
}

// isAutoRestartOp reports whether op is an auto-restart attempt.
func isAutoRestartOp(op orch.Operation) bool {
	return op.Kind == orch.OpRestart && op.Actor == orch.ActorSystem
}
