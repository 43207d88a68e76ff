package workers

import (
	"context"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/schema"
)

// isolateBatch bounds how many engines one reconcile pass moves off a
// network where engines can reach each other (each is restarted: a few
// seconds without its engine for that user); the next pass moves the next
// ones, so a fleet upgraded from an older version is isolated within hours
// without a storm of restarts.
const isolateBatch = 20

// isolate recreates a running engine whose container is Unisolated (on a
// network that lets containers reach each other, made by an older
// version): Ensure puts the new container on the engines' isolated
// network, on the same volume, and the engine must come back healthy. It
// takes the engine's lease, so no lifecycle job works it meanwhile, and
// reports whether it moved it; a failure is logged and tried again next
// pass (a crashed engine is the health sweep's). The row's state is not
// changed.
func (rec *Reconciler) isolate(ctx context.Context, e orch.Engine, rt orch.RuntimeInfo, lease schema.Lease) bool {
	if rt.State != orch.RuntimeRunning || (e.Status != orch.StateRunning && e.Status != orch.StateSleeping) {
		return false // a stopped engine moves when it next starts
	}
	q := schema.New(rec.pool)
	got, err := q.AcquireLease(ctx, e.ID, lease, leaseUntil(ctx, rec.jobTimeout()))
	if err != nil || !got {
		return false
	}
	defer rec.releaseLease(ctx, e.ID, lease)
	if _, err := rec.bootAndWait(ctx, e, rec.currentSpec(e)); err != nil {
		rec.log.Warn("move engine to the isolated network", "engine_id", e.ID, "error", err)
		return false
	}
	return true
}
