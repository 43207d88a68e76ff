package workers

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/schema"
)

// Auto-restart. When an engine goes failed (health.go, events.go)
// attempt 1 is scheduled as a "system" restart operation whose
// engine_restart job (Auto, Attempt n) runs after min(base·2^(n-1), max).
// An attempt audits auto_restart_start, then:
//
//   - probes first: an engine that is healthy again (Docker's restart
//     policy brought a crashed container back, or it recovered by itself)
//     is not restarted, just marked running;
//   - otherwise stops it (grace) and boots it again: Ensure recreates a
//     container that is gone, on the same volume;
//   - success: running, failure and attempt counters reset, audit
//     auto_restart_success;
//   - failure: audit auto_restart_failed, restart_attempts = n, and in the
//     same transaction either attempt n+1 is scheduled (this job completes
//     itself in that transaction, so the next one is not a duplicate of a
//     running job) or, after ORCH_RESTART_MAX_ATTEMPTS, auto_restart_gave_up
//     is audited and the engine stays failed (admit: engine_unhealthy).
//
// The row points at the pending attempt's operation, so a manual start,
// restart, stop or destroy finds it and cancels it (api operate); a
// superseded attempt changes nothing and schedules nothing.

func (h *Health) autoRestart(ctx context.Context, j *river.Job[jobs.Restart]) error {
	n := max(j.Args.Attempt, 1)
	maxN := h.cfg.RestartMaxAttempts
	return h.run(ctx, j.JobRow, j.Args.Lifecycle, runOpts{}, func(ctx context.Context, e orch.Engine, op orch.Operation, _ schema.OpPayload, try int, last bool) outcome {
		meta := map[string]any{"attempt": n, "max_attempts": maxN}
		if e.Status != orch.StateFailed {
			// Nothing to restart (the row moved on without this operation).
			return outcome{}
		}
		if try > 1 {
			meta["try"] = try
		}
		if err := schema.New(h.pool).InsertAudit(ctx, orch.AuditEntry{ProductID: e.ProductID, UserID: e.UserID, EngineID: e.ID,
			Action: orch.ActionAutoRestartStart, Actor: orch.ActorSystem,
			Metadata: map[string]any{"attempt": n, "max_attempts": maxN, "operation_id": op.ID, "last_error": e.LastError}}); err != nil {
			h.log.Warn("audit auto_restart_start", "engine_id", e.ID, "error", err)
		}
		start := time.Now()
		var out outcome
		perr := h.probeOnce(ctx, e)
		switch {
		case perr == nil:
			meta["already_healthy"] = true
			out = bootOutcome(orch.ActionAutoRestartSuccess, time.Since(start), nil, meta)
		default:
			if err := h.backend.Stop(ctx, e.ID, h.eng.StopGrace); err != nil {
				out = bootOutcome(orch.ActionAutoRestartFailed, time.Since(start), backendErr("stop engine", err), meta)
				break
			}
			d, err := h.bootAndWait(ctx, e, h.currentSpec(e))
			action := orch.ActionAutoRestartSuccess
			if err != nil {
				action = orch.ActionAutoRestartFailed
			}
			out = bootOutcome(action, d, err, meta)
		}
		out.duration = time.Since(start)
		if out.err == nil {
			return out
		}
		out.change.RestartAttempts = &n
		out.after = func(ctx context.Context, q *schema.Queries, tx pgx.Tx) error {
			cur, err := q.EngineByIDForUpdate(ctx, e.ID)
			if err != nil {
				return err
			}
			if n < maxN {
				// Complete this attempt's job with the commit, so the next
				// attempt is never queued beside a job still running.
				if _, err := river.JobCompleteTx[*riverpgxv5.Driver](ctx, tx, j); err != nil {
					return err
				}
			}
			return h.nextAutoRestart(ctx, q, tx, river.ClientFromContext[pgx.Tx](ctx), cur, n, out.err)
		}
		return out
	})
}

// nextAutoRestart follows failed auto-restart attempt n of a failed engine
// within tx: attempt n+1 is scheduled, or after ORCH_RESTART_MAX_ATTEMPTS
// auto_restart_gave_up is audited and the engine stays failed.
func (h *Health) nextAutoRestart(ctx context.Context, q *schema.Queries, tx pgx.Tx, rc *river.Client[pgx.Tx], e orch.Engine, n int, cause error) error {
	if n >= h.cfg.RestartMaxAttempts {
		return q.InsertAudit(ctx, orch.AuditEntry{ProductID: e.ProductID, UserID: e.UserID, EngineID: e.ID,
			Action: orch.ActionAutoRestartGaveUp, Actor: orch.ActorSystem,
			Metadata: map[string]any{"attempts": n, "error_code": string(orch.ErrorCode(cause)), "error": errMessage(cause)}})
	}
	return h.scheduleAutoRestart(ctx, q, tx, rc, e, n+1)
}

// Backoff is the delay before auto-restart attempt n (1-based):
// min(base·2^(n-1), max), max 0 meaning no cap.
func Backoff(base, maxDelay time.Duration, attempt int) time.Duration {
	if attempt < 1 {
		attempt = 1
	}
	d := base
	for i := 1; i < attempt; i++ {
		d *= 2
		if (maxDelay > 0 && d >= maxDelay) || d <= 0 || d > 24*time.Hour {
			break
		}
	}
	if maxDelay > 0 && d > maxDelay {
		d = maxDelay
	}
	return d
}
