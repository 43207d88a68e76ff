package lifecycle

import (
	"context"
	"time"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/metrics"
	"github.com/enginefleet/orchestrator/schema"
)

// waitPoll is how often a waiting request re-reads its operation without
// being notified.
const waitPoll = 2 * time.Second

// Wait blocks until the operation finishes or timeout, woken by NOTIFY on
// the operation (a slow poll only as a fallback); a failed operation is
// returned as its error code. Errors: the operation's own code,
// BOOT_TIMEOUT (a boot that did not finish in time) or BACKEND_TIMEOUT
// (anything else), SERVICE_UNAVAILABLE when this process stops waiting
// (StopWaiting), OPERATION_NOT_FOUND.
func (c *Core) Wait(ctx context.Context, productID, opID string, timeout time.Duration) error {
	ch, cancel := c.waiters.subscribe(opID)
	defer cancel()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	// NOTIFY wakes the wait; the slow poll is the safety net for a
	// notification that never arrives (a listener whose connection went
	// half-open, a NOTIFY lost in a reconnect).
	poll := time.NewTicker(waitPoll)
	defer poll.Stop()
	q := schema.New(c.pool)
	for waited := false; ; waited = true {
		op, err := q.GetOperation(ctx, productID, opID)
		var retry <-chan time.Time
		switch {
		case schema.Unreachable(err):
			// Ride out a database blip: the job goes on, and the
			// caller would rather have its outcome than a 503. NOTIFYs
			// sent meanwhile are lost, so look again shortly.
			retry = time.After(500 * time.Millisecond)
		case err != nil:
			return err
		case op.Status.Done():
			if waited {
				// The outcome's commit stamps updated_at (the
				// database's clock, on this host in most setups).
				c.cfg.Metrics.ObserveStep(metrics.StepWake, time.Since(op.UpdatedAt))
			}
			return opError(op)
		}
		select {
		case <-retry:
		case <-ch:
		case <-poll.C:
		case <-timer.C:
			// BOOT_TIMEOUT is the contract's code for an engine that did
			// not come up; other operations merely took too long.
			code := orch.CodeBackendTimeout
			if boots(op.Kind) {
				code = orch.CodeBootTimeout
			}
			return orch.Errorf(code, "the operation did not finish within %s; follow it with GET /operations/%s", timeout, opID)
		case <-c.stopWaits:
			return &orch.Error{Code: orch.CodeUnavailable, RetryAfter: 1,
				Message: "this replica is shutting down; the operation goes on: follow it with GET /operations/" + opID}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// boots reports whether an operation of kind boots an engine.
func boots(kind orch.OpKind) bool {
	switch kind {
	case orch.OpProvision, orch.OpStart, orch.OpWake, orch.OpRestart, orch.OpUpgrade, orch.OpRestore:
		return true
	}
	return false
}

// Await waits for an operation on e (WaitTimeout of its kind) and returns
// the engine as it ends; a destroyed engine is returned as it was (its row
// is gone). No operation (opID "") returns e at once.
func (c *Core) Await(ctx context.Context, productID string, e orch.Engine, opID string, kind orch.OpKind) (orch.Engine, error) {
	if opID == "" {
		return e, nil
	}
	if err := c.Wait(ctx, productID, opID, c.WaitTimeout(kind)); err != nil {
		return e, err
	}
	if kind == orch.OpDestroy {
		return e, nil
	}
	// The outcome is known: ride out a database blip for the engine's row
	// too (a pooled connection the outage broke fails its first query).
	for i := 0; ; i++ {
		got, err := schema.New(c.pool).EngineByID(ctx, e.ID)
		if !schema.Unreachable(err) || i == 20 || ctx.Err() != nil {
			return got, err
		}
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// WaitTimeout is how long a synchronous request waits for an operation of
// kind: the boot timeout, plus slack for the job to be picked up and for a
// stop's grace period; a restore may also roll back, a backup compress a
// large brain behind the night's others.
func (c *Core) WaitTimeout(kind orch.OpKind) time.Duration {
	switch kind {
	case orch.OpBackup:
		return 5 * time.Minute
	case orch.OpRestore:
		return 2*c.cfg.BootTimeout + 3*time.Minute
	case orch.OpStop, orch.OpRestart, orch.OpDestroy, orch.OpRotateKey, orch.OpUpgrade:
		return c.cfg.BootTimeout + 40*time.Second
	}
	return c.cfg.BootTimeout + 10*time.Second
}

// opError turns a failed operation into the error the contract names.
func opError(op orch.Operation) error {
	if op.Status == orch.OpFailed {
		code := op.ErrorCode
		if code == "" {
			code = orch.CodeInternal
		}
		return orch.Errorf(code, "%s", op.ErrorMessage)
	}
	return nil
}
