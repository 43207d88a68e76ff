package lifecycle

import (
	"context"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/metrics"
	"github.com/enginefleet/orchestrator/schema"
)

// AdmitOptions are the admit request's switches.
type AdmitOptions struct {
	AutoProvision bool // provision an engine when the user has none
	AutoWake      bool // start a sleeping or stopped engine
	Async         bool // Prefer: respond-async: do not wait for the work started
}

// Admission is an admit's answer.
type Admission struct {
	Admitted    bool
	Engine      *orch.Engine     // nil when not admitted and nothing was started
	Key         string           // the engine's key, with Engine
	Reason      orch.AdmitReason // when not admitted
	OperationID string           // work started or joined, with Async
	// Path is how it was answered, for the latency histogram:
	// metrics.AdmitWarm, AdmitCold or AdmitWake ("" = denied).
	Path string
}

// Admit answers a product's admit for one user: the one call it makes per
// user request, idempotent. A running engine costs one indexed read (and a
// key decryption); a missing one is provisioned (AutoProvision), a
// sleeping or stopped one woken (AutoWake), a failed one answered
// engine_unhealthy unless a restart is already running; the work started
// is waited for unless Async. Denials are audited (admit_denied, bounded).
// Errors: QUOTA_EXCEEDED, PORT_EXHAUSTION, BOOT_TIMEOUT,
// OPERATION_IN_PROGRESS (engine being destroyed), and those of the work.
func (c *Core) Admit(ctx context.Context, p orch.Product, userID string, o AdmitOptions) (Admission, error) {
	e, err := schema.New(c.pool).EngineByUser(ctx, p.ID, userID)
	if orch.IsCode(err, orch.CodeEngineNotFound) {
		if !o.AutoProvision {
			return c.deny(p, userID, orch.ReasonEngineNotFound), nil
		}
		res, err := c.Provision(ctx, p, userID, "", true)
		if err != nil {
			if orch.IsCode(err, orch.CodeQuotaExceeded) {
				c.AuditDenied(p, userID, string(orch.CodeQuotaExceeded))
			}
			return Admission{}, err
		}
		if res.OperationID == "" && res.Engine.Status != orch.StateRunning {
			// Joined an engine that another admit created and that is no
			// longer provisioning: answer it as it stands now.
			return c.admitExisting(ctx, p, res.Engine, o)
		}
		return c.admitAfter(ctx, p, res.Engine, res.OperationID, res.Key, orch.OpProvision, o)
	}
	if err != nil {
		return Admission{}, err
	}
	return c.admitExisting(ctx, p, e, o)
}

func (c *Core) admitExisting(ctx context.Context, p orch.Product, e orch.Engine, o AdmitOptions) (Admission, error) {
	switch e.Status {
	case orch.StateRunning:
		c.touch(e)
		key, err := c.Key(e)
		if err != nil {
			return Admission{}, err
		}
		return Admission{Admitted: true, Engine: &e, Key: key, Path: metrics.AdmitWarm}, nil
	case orch.StateProvisioning:
		return c.admitAfter(ctx, p, e, e.OperationID, "", orch.OpProvision, o)
	case orch.StateSleeping, orch.StateStopped:
		if !o.AutoWake {
			return c.deny(p, e.UserID, orch.ReasonEngineSleeping), nil
		}
		e2, opID, err := c.Operate(ctx, p, e.UserID, Wake)
		if err != nil {
			return Admission{}, err
		}
		return c.admitAfter(ctx, p, e2, opID, "", orch.OpWake, o)
	case orch.StateFailed:
		// A restart already under way (a running auto-restart attempt or a
		// manual start) is waited for. An attempt still waiting for its
		// backoff may be minutes away: answer engine_unhealthy now rather
		// than hold the request past its budget.
		if e.OperationID != "" {
			op, _, err := schema.New(c.pool).OperationByID(ctx, e.OperationID)
			if err == nil && op.Status == orch.OpRunning {
				return c.admitAfter(ctx, p, e, op.ID, "", op.Kind, o)
			}
		}
		return c.deny(p, e.UserID, orch.ReasonEngineUnhealthy), nil
	default: // destroying
		return Admission{}, orch.Errorf(orch.CodeOperationInProgress, "engine is being destroyed")
	}
}

// admitAfter waits for the provision or wake an admit started or joined
// (key: the plaintext the provision generated, "" to decrypt the row's).
func (c *Core) admitAfter(ctx context.Context, p orch.Product, e orch.Engine, opID, key string, kind orch.OpKind, o AdmitOptions) (Admission, error) {
	path := metrics.AdmitWake
	if kind == orch.OpProvision {
		path = metrics.AdmitCold
	}
	withKey := func(a Admission) (Admission, error) {
		if a.Key == "" {
			var err error
			if a.Key, err = c.Key(*a.Engine); err != nil {
				return Admission{}, err
			}
		}
		return a, nil
	}
	if o.Async && opID != "" {
		return withKey(Admission{Engine: &e, Key: key, OperationID: opID, Path: path})
	}
	e, err := c.Await(ctx, p.ID, e, opID, kind)
	if err != nil {
		return Admission{}, err
	}
	if e.Status != orch.StateRunning {
		return Admission{Reason: orch.ReasonEngineUnhealthy, Path: path}, nil
	}
	return withKey(Admission{Admitted: true, Engine: &e, Key: key, Path: path})
}

func (c *Core) deny(p orch.Product, userID string, reason orch.AdmitReason) Admission {
	c.AuditDenied(p, userID, string(reason))
	return Admission{Reason: reason}
}

// AuditDenied records an admit denial (audit admit_denied with the reason:
// an admit reason or an error code), aggregated and bounded (denied.go):
// it never blocks the request.
func (c *Core) AuditDenied(p orch.Product, userID, reason string) {
	c.denied.add(p, userID, reason)
}
