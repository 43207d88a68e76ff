package lifecycle

import (
	"context"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/schema"
)

// This file is the request side of fleet rollouts: create one (rows, audit
// and its driver job in one transaction), pause, resume and abort it. The
// driver job (workers/rollout.go) does the rest.

// RolloutSpec is a rollout as asked for.
type RolloutSpec struct {
	ProductID     string // "" = every product's engines (admin only)
	Image         string
	Waves         []orch.WaveStep
	Bake          time.Duration
	FailureBudget int
	MaxConcurrent int
	InUse         time.Duration
	Actor         string // "admin" or the product's slug
}

// CreateRollout records a rollout over spec's engines and enqueues its
// driver. Errors: INVALID_REQUEST (settings, image not allowed),
// OPERATION_IN_PROGRESS (another rollout owns some of these engines).
func (c *Core) CreateRollout(ctx context.Context, spec RolloutSpec) (orch.Rollout, error) {
	r := orch.Rollout{ID: uuid.NewString(), ProductID: spec.ProductID, Image: spec.Image, Status: orch.RolloutRunning,
		Bake: spec.Bake, FailureBudget: spec.FailureBudget, MaxConcurrent: spec.MaxConcurrent, InUse: spec.InUse, Actor: spec.Actor}
	if err := r.Validate(); err != nil {
		return r, err
	}
	if err := c.AllowImage(spec.Image); err != nil {
		return r, err
	}
	if _, err := orch.ResolveWaves(spec.Waves, 100); err != nil { // settings check before any write
		return r, err
	}
	err := c.inTx(ctx, func(q *schema.Queries, tx pgx.Tx) error {
		// One rollout creation at a time: the ownership check and the
		// insert cannot interleave with another's (the unique index would
		// catch it, as a less helpful error).
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(7382938471)`); err != nil {
			return err
		}
		owners, err := q.RolloutOwners(ctx, spec.ProductID)
		if err != nil {
			return err
		}
		if len(owners) > 0 {
			return orch.Errorf(orch.CodeOperationInProgress, "rollout %s is running over some of these engines: pause is not enough, it must finish or be aborted first", owners[0])
		}
		r.Waves = []int{}
		if err := q.InsertRollout(ctx, r); err != nil {
			return err
		}
		waves, err := q.InsertRolloutEngines(ctx, r, func(n int) ([]int, error) { return orch.ResolveWaves(spec.Waves, n) })
		if err != nil {
			return err
		}
		r.Waves = waves
		total := 0
		for _, w := range waves {
			total += w
		}
		if err := q.InsertAudit(ctx, orch.AuditEntry{ProductID: r.ProductID, Action: orch.ActionRolloutCreate, Actor: r.Actor,
			Metadata: map[string]any{"rollout_id": r.ID, "image": r.Image, "engines": total, "waves": waves,
				"bake_seconds": int(r.Bake / time.Second), "failure_budget": r.FailureBudget, "max_concurrent": r.MaxConcurrent,
				"in_use_seconds": int(r.InUse / time.Second)}}); err != nil {
			return err
		}
		return c.enqueueDriver(ctx, tx, r.ID)
	})
	if err != nil {
		return r, err
	}
	return schema.New(c.pool).Rollout(ctx, r.ID, "")
}

func (c *Core) enqueueDriver(ctx context.Context, tx pgx.Tx, id string) error {
	if _, err := c.river.InsertTx(ctx, tx, jobs.RolloutDrive{RolloutID: id}, nil); err != nil {
		return &orch.Error{Code: orch.CodeInternal, Message: "could not enqueue the rollout's driver", Err: err}
	}
	return nil
}

// RolloutAction is what a human may do to a running rollout.
type RolloutAction string

// Rollout actions.
const (
	ActPause    RolloutAction = "pause"
	ActResume   RolloutAction = "resume"
	ActAbort    RolloutAction = "abort"    // stop here: upgraded engines stay upgraded
	ActRollback RolloutAction = "rollback" // stop and put every engine it upgraded back on its previous image
)

// ActOnRollout pauses, resumes, aborts or rolls back rollout id (of
// productID, "" = any) as actor, and returns it. Errors: NOT_FOUND,
// INVALID_STATE (the rollout is not in a state the action applies to).
func (c *Core) ActOnRollout(ctx context.Context, id, productID string, a RolloutAction, actor, reason string) (orch.Rollout, error) {
	if _, err := uuid.Parse(id); err != nil {
		return orch.Rollout{}, orch.Errorf(orch.CodeRolloutNotFound, "rollout not found")
	}
	err := c.inTx(ctx, func(q *schema.Queries, tx pgx.Tx) error {
		r, err := q.Rollout(ctx, id, productID)
		if err != nil {
			return err
		}
		if r, err = q.RolloutForUpdate(ctx, r.ID); err != nil {
			return err
		}
		var ch schema.RolloutChange
		var action orch.Action
		by := "by " + actor
		if reason != "" {
			by += ": " + reason
		}
		switch {
		case a == ActPause && r.Status == orch.RolloutRunning:
			ch, action = schema.RolloutChange{Status: orch.RolloutPaused, StopReason: ptr("paused " + by)}, orch.ActionRolloutPause
		case a == ActResume && r.Status == orch.RolloutPaused:
			ch, action = schema.RolloutChange{Status: orch.RolloutRunning, ClearReason: true, Progress: true}, orch.ActionRolloutResume
		case a == ActAbort && (r.Status == orch.RolloutRunning || r.Status == orch.RolloutPaused):
			ch, action = schema.RolloutChange{Status: orch.RolloutAborted, StopReason: ptr("aborted " + by), Finished: true}, orch.ActionRolloutAbort
		case a == ActRollback && (r.Status == orch.RolloutRunning || r.Status == orch.RolloutPaused || r.Status == orch.RolloutCompleted):
			ch, action = schema.RolloutChange{Status: orch.RolloutRollingBack, StopReason: ptr("rollback asked " + by), Progress: true}, orch.ActionRolloutAbort
		default:
			return orch.Errorf(orch.CodeInvalidState, "cannot %s a rollout that is %s", a, r.Status)
		}
		if r.Status == orch.RolloutCompleted && a == ActRollback {
			// A completed rollout released its engines: take back those it
			// upgraded (none may be owned by a newer rollout).
			if err := q.ReclaimRolloutEngines(ctx, r.ID); err != nil {
				return err
			}
		}
		if err := q.SetRollout(ctx, r.ID, ch); err != nil {
			return err
		}
		if err := q.InsertAudit(ctx, orch.AuditEntry{ProductID: r.ProductID, Action: action, Actor: actor,
			Metadata: map[string]any{"rollout_id": r.ID, "action": string(a), "from": string(r.Status), "reason": reason}}); err != nil {
			return err
		}
		return c.enqueueDriver(ctx, tx, r.ID)
	})
	if err != nil {
		return orch.Rollout{}, err
	}
	return schema.New(c.pool).Rollout(ctx, id, "")
}

func ptr[T any](v T) *T { return &v }
