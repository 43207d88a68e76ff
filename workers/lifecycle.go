package workers

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/schema"
)

// outcome is what a lifecycle step decided; run commits it atomically.
type outcome struct {
	change   *schema.EngineChange // nil: the row's state is left alone
	delete   bool                 // destroy: remove the row
	action   orch.Action          // audit action ("" = none)
	meta     map[string]any
	duration time.Duration
	err      error // the operation failed with this (its code is reported)
	// after runs inside commit's transaction, after the change and the
	// audit row, when this operation still owns the engine (auto-restart
	// schedules its next attempt or gives up here).
	after func(ctx context.Context, q *schema.Queries, tx pgx.Tx) error
}

// step does one operation's backend work on a leased engine.
type step func(ctx context.Context, e orch.Engine, op orch.Operation, p schema.OpPayload, attempt int, lastAttempt bool) outcome

// leaseWait is how long a job snoozes while another job works its engine.
const leaseWait = 200 * time.Millisecond

// errLeaseLost: the attempt no longer holds its engine's lease (it was
// presumed dead and its job re-queued): its outcome must not be committed.
var errLeaseLost = errors.New("engine lease lost to another attempt; outcome not committed")

// leaseOf is the engine lease of a job's attempt in this process.
func (w *Workers) leaseOf(job *rivertype.JobRow) schema.Lease {
	return schema.Lease{Job: job.ID, Attempt: job.Attempt, Owner: w.session.id}
}

// leaseUntil is when an attempt's lease lapses by itself: past the
// attempt's own deadline (River cancels its context then), so a live
// attempt never loses its engine to a retry of itself.
func leaseUntil(ctx context.Context, fallback time.Duration) time.Time {
	if d, ok := ctx.Deadline(); ok {
		return d.Add(30 * time.Second)
	}
	return time.Now().Add(fallback + 30*time.Second)
}

// run is the shared skeleton of every lifecycle job: lease, load, mark the
// operation running, do the step, commit the outcome, release the lease.
// A step cut off (job timeout, shutdown) or failing transiently commits
// nothing: River retries the job, here or elsewhere, and the work is
// idempotent; if that was the last attempt, the operation sweep ends the
// operation (abandoned.go).
func (w *Workers) run(ctx context.Context, job *rivertype.JobRow, a jobs.Lifecycle, do step) error {
	start := time.Now()
	q := schema.New(w.pool)
	lease := w.leaseOf(job)
	got, err := q.AcquireLease(ctx, a.EngineID, lease, leaseUntil(ctx, w.jobTimeout()))
	if orch.IsCode(err, orch.CodeEngineNotFound) {
		// Destroyed meanwhile: nothing to do but close the operation.
		w.finishOrphanOp(ctx, a.OperationID)
		w.logJob(job.Kind, a.EngineID, job.Attempt, start, "engine_gone", nil)
		return nil
	}
	if err != nil {
		return err
	}
	if !got {
		return river.JobSnooze(leaseWait)
	}
	defer w.releaseLease(ctx, a.EngineID, lease)

	e, err := q.EngineByID(ctx, a.EngineID)
	if err != nil {
		return err
	}
	op, payload, err := q.StartOperation(ctx, a.OperationID) // pending → running, in the read
	if err != nil {
		return err
	}
	if op.Status.Done() {
		return nil // a retry of a job whose outcome is already committed
	}
	if e.OperationID != op.ID {
		// A later operation (e.g. destroy) superseded this one.
		err := orch.Errorf(orch.CodeOperationInProgress, "superseded by a later operation on this engine")
		w.commit(ctx, e, op, lease, outcome{err: err}) //nolint:errcheck
		w.logJob(job.Kind, e.ID, job.Attempt, start, "superseded", nil)
		return nil
	}
	last := job.Attempt >= job.MaxAttempts
	out := do(ctx, e, op, payload, job.Attempt, last)
	if ctx.Err() != nil {
		w.logJob(job.Kind, e.ID, job.Attempt, start, "interrupted", ctx.Err())
		return ctx.Err()
	}
	if out.err != nil && !last && retryable(out.err) {
		// Transient backend trouble: River retries; the operation stays running.
		w.logJob(job.Kind, e.ID, job.Attempt, start, "retry", out.err)
		return out.err
	}
	if err := w.commit(ctx, e, op, lease, out); err != nil {
		w.logJob(job.Kind, e.ID, job.Attempt, start, "not_committed", err)
		return err
	}
	result := "succeeded"
	if out.err != nil {
		result = "failed"
	}
	w.logJob(job.Kind, e.ID, job.Attempt, start, result, out.err)
	return nil
}

// retryable reports whether an error may go away on retry (backend
// trouble), as opposed to a decided outcome like BOOT_TIMEOUT or an image
// that is not there.
func retryable(err error) bool {
	return orch.ErrorCode(err) == orch.CodeBackendFailed && !errors.Is(err, orch.ErrImageUnavailable)
}

// commit applies an outcome in one transaction: state change, audit row,
// operation result (which notifies waiters), provided lease still holds
// the engine (errLeaseLost otherwise: another attempt took over).
func (w *Workers) commit(ctx context.Context, e orch.Engine, op orch.Operation, lease schema.Lease, out outcome) error {
	ctx = context.WithoutCancel(ctx) // a finished step's outcome must land even during shutdown
	err := inTx(ctx, w.pool, func(tx pgx.Tx) error {
		return w.commitTx(ctx, schema.New(tx), tx, e, op, lease, out)
	})
	if err == nil {
		var boot time.Duration
		if out.change != nil && out.change.BootDurationMS != nil {
			boot = time.Duration(*out.change.BootDurationMS) * time.Millisecond
		}
		w.cfg.Metrics.Lifecycle(out.action, out.err != nil, boot)
	}
	return err
}

// commitTx is commit's transaction body.
func (w *Workers) commitTx(ctx context.Context, q *schema.Queries, tx pgx.Tx, e orch.Engine, op orch.Operation, lease schema.Lease, out outcome) error {
	cur, err := q.EngineByIDForUpdate(ctx, e.ID)
	if err != nil && !orch.IsCode(err, orch.CodeEngineNotFound) {
		return err
	}
	gone := err != nil
	if !gone {
		holds, err := q.HoldsLease(ctx, e.ID, lease)
		if err != nil {
			return err
		}
		if !holds {
			return errLeaseLost
		}
	}
	switch {
	case gone:
	case out.delete:
		if err := q.DeleteEngine(ctx, e.ID); err != nil {
			return err
		}
	case out.change != nil:
		if cur.OperationID == op.ID || out.change.Status == orch.StateDestroying {
			if _, err := q.SetEngineState(ctx, cur, *out.change); err != nil {
				return err
			}
		}
	}
	if out.action != "" {
		meta := out.meta
		if meta == nil {
			meta = map[string]any{}
		}
		meta["operation_id"] = op.ID
		if out.err != nil {
			meta["error_code"] = string(orch.ErrorCode(out.err))
			meta["error"] = errMessage(out.err)
		}
		var dur *int64
		if out.duration > 0 {
			d := out.duration.Milliseconds()
			dur = &d
		}
		if err := q.InsertAudit(ctx, orch.AuditEntry{ProductID: e.ProductID, UserID: e.UserID, EngineID: e.ID,
			Action: out.action, Actor: actorOf(op), Metadata: meta, DurationMS: dur}); err != nil {
			return err
		}
	}
	if out.after != nil && !gone && cur.OperationID == op.ID {
		if err := out.after(ctx, q, tx); err != nil {
			return err
		}
	}
	if out.err != nil {
		return q.SetOperation(ctx, op.ID, orch.OpFailed, orch.ErrorCode(out.err), errMessage(out.err))
	}
	return q.SetOperation(ctx, op.ID, orch.OpSucceeded, "", "")
}

// errMessage is the caller-safe message of an error.
func errMessage(err error) string {
	var de *orch.Error
	if errors.As(err, &de) {
		return de.Message
	}
	return "internal error"
}

func actorOf(op orch.Operation) string {
	if op.Actor != "" {
		return op.Actor
	}
	return orch.ActorSystem
}

// finishOrphanOp ends an operation whose engine no longer exists: a
// destroy succeeded, anything else failed.
func (w *Workers) finishOrphanOp(ctx context.Context, opID string) {
	if opID == "" {
		return
	}
	q := schema.New(w.pool)
	op, _, err := q.OperationByID(ctx, opID)
	if err != nil || op.Status.Done() {
		return
	}
	code, msg := orch.CodeEngineNotFound, "engine not found"
	if op.Kind == orch.OpDestroy {
		q.SetOperation(ctx, opID, orch.OpSucceeded, "", "") //nolint:errcheck
		return
	}
	q.SetOperation(ctx, opID, orch.OpFailed, code, msg) //nolint:errcheck
}

func ptr[T any](v T) *T { return &v }

// bootOutcome turns a boot attempt into the running-or-failed outcome that
// provision, start, wake and restart share.
func bootOutcome(action orch.Action, d time.Duration, err error, extra map[string]any) outcome {
	if err != nil {
		return outcome{action: action, duration: d, meta: extra, err: err,
			change: &schema.EngineChange{Status: orch.StateFailed, ClearDeadline: true, LastError: ptr(errMessage(err))}}
	}
	ms := d.Milliseconds()
	return outcome{action: action, duration: d, meta: extra, change: &schema.EngineChange{
		Status: orch.StateRunning, BootDurationMS: &ms, ResetHealth: true, RestartAttempts: ptr(0),
		SleepReason: ptr(""), ClearDeadline: true, LastError: ptr("")}}
}

// lifecycleWorker is what every lifecycle worker shares: a timeout above
// the boot timeout (River's default minute is not) and quick retries, as
// a waiting request is on the other end.
type lifecycleWorker[T river.JobArgs] struct {
	river.WorkerDefaults[T]
	w *Workers
}

func (l *lifecycleWorker[T]) Timeout(*river.Job[T]) time.Duration { return l.w.jobTimeout() }
func (l *lifecycleWorker[T]) NextRetry(j *river.Job[T]) time.Time {
	return time.Now().Add(time.Duration(j.Attempt) * time.Second)
}

type provisionWorker struct {
	lifecycleWorker[jobs.Provision]
}

func (p *provisionWorker) Work(ctx context.Context, j *river.Job[jobs.Provision]) error {
	return p.w.run(ctx, j.JobRow, j.Args.Lifecycle, func(ctx context.Context, e orch.Engine, op orch.Operation, _ schema.OpPayload, attempt int, last bool) outcome {
		d, err := p.w.bootAndWait(ctx, e, p.w.currentSpec(e))
		action := orch.ActionProvision
		if err != nil {
			action = orch.ActionProvisionFailed
		}
		return bootOutcome(action, d, err, map[string]any{"engine_version": e.EngineVersion, "port": e.Port})
	})
}

type startWorker struct{ lifecycleWorker[jobs.Start] }

func (s *startWorker) Work(ctx context.Context, j *river.Job[jobs.Start]) error {
	return s.w.run(ctx, j.JobRow, j.Args.Lifecycle, func(ctx context.Context, e orch.Engine, op orch.Operation, _ schema.OpPayload, attempt int, last bool) outcome {
		action := orch.ActionStart
		if j.Args.Wake {
			action = orch.ActionWake
		}
		meta := map[string]any{"from": string(e.Status)}
		if e.SleepReason != "" {
			meta["sleep_reason"] = e.SleepReason
		}
		wakeMeta(e, meta) // idle.go
		d, err := s.w.bootAndWait(ctx, e, s.w.currentSpec(e))
		return bootOutcome(action, d, err, meta)
	})
}

type stopWorker struct{ lifecycleWorker[jobs.Stop] }

func (s *stopWorker) Work(ctx context.Context, j *river.Job[jobs.Stop]) error {
	return s.w.run(ctx, j.JobRow, j.Args.Lifecycle, func(ctx context.Context, e orch.Engine, op orch.Operation, _ schema.OpPayload, attempt int, last bool) outcome {
		start := time.Now()
		if err := s.w.backend.Stop(ctx, e.ID, s.w.cfg.Engines.StopGrace); err != nil {
			return outcome{err: backendErr("stop engine", err), action: orch.ActionStop}
		}
		if j.Args.Sleep {
			return outcome{action: orch.ActionSleep, duration: time.Since(start), meta: sleepMeta(e, SleepStop),
				change: &schema.EngineChange{Status: orch.StateSleeping, SleepReason: ptr("idle")}}
		}
		return outcome{action: orch.ActionStop, duration: time.Since(start), meta: map[string]any{"from": string(e.Status)},
			change: &schema.EngineChange{Status: orch.StateStopped, SleepReason: ptr("")}}
	})
}

type restartWorker struct{ lifecycleWorker[jobs.Restart] }

func (r *restartWorker) Work(ctx context.Context, j *river.Job[jobs.Restart]) error {
	if j.Args.Auto {
		return r.w.autoRestart(ctx, j) // restart.go
	}
	return r.w.run(ctx, j.JobRow, j.Args.Lifecycle, func(ctx context.Context, e orch.Engine, op orch.Operation, _ schema.OpPayload, attempt int, last bool) outcome {
		start := time.Now()
		if err := r.w.backend.Stop(ctx, e.ID, r.w.cfg.Engines.StopGrace); err != nil {
			return outcome{err: backendErr("stop engine", err), action: orch.ActionRestart}
		}
		d, err := r.w.bootAndWait(ctx, e, r.w.currentSpec(e))
		out := bootOutcome(orch.ActionRestart, d, err, map[string]any{"from": string(e.Status)})
		out.duration = time.Since(start)
		return out
	})
}

type rotateKeyWorker struct {
	lifecycleWorker[jobs.RotateKey]
}

// Work recreates the container with the new key hash, and the old one as
// ENGINE_KEY_HASH_PREVIOUS until the overlap ends (SPEC §8 [ours]). The
// row takes the new key only once the engine is healthy with it.
func (r *rotateKeyWorker) Work(ctx context.Context, j *river.Job[jobs.RotateKey]) error {
	return r.w.run(ctx, j.JobRow, j.Args.Lifecycle, func(ctx context.Context, e orch.Engine, op orch.Operation, p schema.OpPayload, attempt int, last bool) outcome {
		expires := time.Now().Add(r.w.cfg.Engines.KeyOverlap).Truncate(time.Second)
		prev := e.KeyHash
		if r.w.cfg.Engines.KeyOverlap <= 0 {
			prev = ""
		}
		spec := r.w.spec(e, e.EngineVersion, p.KeyHash, prev, &expires)
		d, err := r.w.bootAndWait(ctx, e, spec)
		if err != nil {
			// Put the old key back in force, so a failed rotation changes nothing.
			r.w.bootAndWait(ctx, e, r.w.currentSpec(e)) //nolint:errcheck
			return outcome{action: orch.ActionRotateKey, duration: d, err: err}
		}
		return outcome{action: orch.ActionRotateKey, duration: d, meta: map[string]any{"overlap_until": expires.UTC().Format(time.RFC3339)},
			change: &schema.EngineChange{Status: orch.StateRunning, KeyHash: &p.KeyHash, KeyEnc: &p.KeyEnc,
				PrevKeyHash: ptr(prev), PrevKeyExpires: &expires, ResetHealth: true}}
	})
}

type upgradeWorker struct{ lifecycleWorker[jobs.Upgrade] }

// Work recreates the container on the new image with the same volume; if
// the new version does not become healthy it rolls back to the old image.
func (u *upgradeWorker) Work(ctx context.Context, j *river.Job[jobs.Upgrade]) error {
	return u.w.run(ctx, j.JobRow, j.Args.Lifecycle, func(ctx context.Context, e orch.Engine, op orch.Operation, p schema.OpPayload, attempt int, last bool) outcome {
		meta := map[string]any{"from_version": e.EngineVersion, "to_version": p.Image}
		spec := u.w.spec(e, p.Image, e.KeyHash, e.PrevKeyHash, e.PrevKeyExpiresAt)
		d, err := u.w.bootAndWait(ctx, e, spec)
		if err != nil {
			_, rbErr := u.w.bootAndWait(ctx, e, u.w.currentSpec(e))
			meta["rolled_back"] = rbErr == nil
			out := outcome{action: orch.ActionUpgrade, duration: d, meta: meta, err: err}
			if rbErr != nil {
				out.change = &schema.EngineChange{Status: orch.StateFailed, LastError: ptr(errMessage(err))}
			}
			return out
		}
		ms := d.Milliseconds()
		return outcome{action: orch.ActionUpgrade, duration: d, meta: meta, change: &schema.EngineChange{
			Status: orch.StateRunning, EngineVersion: &p.Image, BootDurationMS: &ms, ResetHealth: true, SleepReason: ptr("")}}
	})
}

type destroyWorker struct{ lifecycleWorker[jobs.Destroy] }

// Work removes container and volume, then the row (which frees the port).
func (d *destroyWorker) Work(ctx context.Context, j *river.Job[jobs.Destroy]) error {
	return d.w.run(ctx, j.JobRow, j.Args.Lifecycle, func(ctx context.Context, e orch.Engine, op orch.Operation, _ schema.OpPayload, attempt int, last bool) outcome {
		start := time.Now()
		if err := d.w.backend.RemoveContainer(ctx, e.ID); err != nil {
			return outcome{err: backendErr("remove container", err), action: orch.ActionDestroy}
		}
		if err := d.w.backend.RemoveVolume(ctx, e.ID); err != nil {
			return outcome{err: backendErr("remove volume", err), action: orch.ActionDestroy}
		}
		return outcome{action: orch.ActionDestroy, duration: time.Since(start), delete: true,
			meta: map[string]any{"engine_version": e.EngineVersion, "port": e.Port}}
	})
}
