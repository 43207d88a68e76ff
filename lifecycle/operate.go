package lifecycle

import (
	"context"
	"errors"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

// This file is every request that changes an engine: each one validates
// against the row (locked), records its operation, changes the row and
// enqueues the job in one transaction. Commit = the work will happen.

// jobArgs builds the River job of an operation.
func jobArgs(kind orch.OpKind, l jobs.Lifecycle, fromVersion string) river.JobArgs {
	switch kind {
	case orch.OpProvision:
		return jobs.Provision{Lifecycle: l}
	case orch.OpStart:
		return jobs.Start{Lifecycle: l}
	case orch.OpWake:
		return jobs.Start{Lifecycle: l, Wake: true}
	case orch.OpStop:
		return jobs.Stop{Lifecycle: l}
	case orch.OpRestart:
		return jobs.Restart{Lifecycle: l}
	case orch.OpRotateKey:
		return jobs.RotateKey{Lifecycle: l}
	case orch.OpUpgrade:
		return jobs.Upgrade{Lifecycle: l, FromVersion: fromVersion}
	case orch.OpDestroy:
		return jobs.Destroy{Lifecycle: l}
	case orch.OpRestore:
		return jobs.Restore{Lifecycle: l}
	}
	panic("no job for operation kind " + string(kind))
}

// newOp is a pending operation of kind on e, requested by actor.
func (c *Core) newOp(productID string, e orch.Engine, kind orch.OpKind, actor string) orch.Operation {
	return orch.Operation{ID: uuid.NewString(), ProductID: productID, EngineID: e.ID, UserID: e.UserID, Kind: kind,
		Status: orch.OpPending, Actor: actor, Deadline: Deadline(nil, c.cfg.BootTimeout)}
}

// enqueue records op and inserts its job within tx.
func (c *Core) enqueue(ctx context.Context, tx pgx.Tx, e orch.Engine, op orch.Operation, payload schema.OpPayload) error {
	args := jobArgs(op.Kind, jobs.Lifecycle{EngineID: e.ID, OperationID: op.ID, Node: e.Node}, e.EngineVersion)
	return Enqueue(ctx, tx, c.river, op, payload, args, nil)
}

// Provisioned is what Provision hands back: the engine, the operation to
// wait on (empty when there is nothing to wait for) and, for the creator,
// the plaintext key it generated.
type Provisioned struct {
	Engine      orch.Engine
	OperationID string
	Key         string
}

// Provision creates the user's engine on image (default ORCH_ENGINE_IMAGE).
// With join, an existing engine is returned instead of
// ENGINE_ALREADY_EXISTS (admit's auto_provision), so any number of
// concurrent admits create exactly one engine. Errors: INVALID_REQUEST
// (image not allowed), ENGINE_ALREADY_EXISTS, QUOTA_EXCEEDED,
// PORT_EXHAUSTION.
func (c *Core) Provision(ctx context.Context, p orch.Product, userID, image string, join bool) (Provisioned, error) {
	if image == "" {
		image = c.cfg.DefaultImage
	}
	if err := c.AllowImage(image); err != nil {
		return Provisioned{}, err
	}
	var res Provisioned
	err := c.inTx(ctx, func(q *schema.Queries, tx pgx.Tx) error {
		// The product lock serializes this product's provisions: the quota
		// count and the existence check cannot race.
		if err := q.LockProduct(ctx, p.ID); err != nil {
			return err
		}
		if e, err := q.EngineByUser(ctx, p.ID, userID); err == nil {
			if !join {
				return orch.Errorf(orch.CodeEngineAlreadyExists, "an engine already exists for user %q", userID)
			}
			res = Provisioned{Engine: e}
			if e.Status == orch.StateProvisioning {
				res.OperationID = e.OperationID
			}
			return nil
		} else if !orch.IsCode(err, orch.CodeEngineNotFound) {
			return err
		}
		if p.Policy.MaxEngines != nil {
			n, err := q.CountEngines(ctx, p.ID)
			if err != nil {
				return err
			}
			if n >= *p.Policy.MaxEngines {
				return orch.Errorf(orch.CodeQuotaExceeded, "product has %d engines, its policy allows %d", n, *p.Policy.MaxEngines)
			}
		}
		port := 0
		if !c.cfg.NoHostPorts {
			var err error
			if port, err = q.FreePort(ctx, c.cfg.Node, c.cfg.PortMin, c.cfg.PortMax); err != nil {
				return err
			}
		}
		key := keys.Generate()
		enc, err := c.keyring.Encrypt(key)
		if err != nil {
			return err
		}
		deadline := time.Now().Add(2*c.cfg.BootTimeout + time.Minute)
		e := orch.Engine{ID: uuid.NewString(), ProductID: p.ID, UserID: userID, Status: orch.StateProvisioning,
			Node: c.cfg.Node, Port: port, EngineVersion: image, KeyHash: keys.Hash(key), KeyEnc: enc, StateDeadline: &deadline}
		op := c.newOp(p.ID, e, orch.OpProvision, p.Slug)
		e.OperationID = op.ID
		if err := q.InsertEngine(ctx, e); err != nil {
			return err
		}
		if err := c.enqueue(ctx, tx, e, op, schema.OpPayload{}); err != nil {
			return err
		}
		res = Provisioned{Engine: e, OperationID: op.ID, Key: key}
		return nil
	})
	return res, err
}

// Request is a lifecycle request on an existing engine.
type Request struct {
	Kind    orch.OpKind
	Check   func(e orch.Engine) error // refuses the request in the engine's current state
	Payload schema.OpPayload
	State   orch.State // the row's state while the operation runs ("" = unchanged)
	Actor   string     // who asks: the product's slug (default) or "admin"
}

// The requests products make. Each refuses what the contract refuses.
var (
	// Start starts a stopped, sleeping or failed engine
	// (ENGINE_ALREADY_RUNNING, OPERATION_IN_PROGRESS).
	Start = Request{Kind: orch.OpStart, Check: func(e orch.Engine) error {
		if e.Status == orch.StateRunning {
			return orch.Errorf(orch.CodeEngineAlreadyRunning, "engine is already running")
		}
		return NotTransitional(e)
	}}
	// Wake starts a sleeping or stopped engine for an admit.
	Wake = Request{Kind: orch.OpWake}
	// Stop stops an engine, keeping its brain (ENGINE_NOT_RUNNING,
	// OPERATION_IN_PROGRESS).
	Stop = Request{Kind: orch.OpStop, Check: func(e orch.Engine) error {
		if e.Status == orch.StateStopped {
			return orch.Errorf(orch.CodeEngineNotRunning, "engine is not running")
		}
		return NotTransitional(e)
	}}
	// Restart stops and starts an engine (OPERATION_IN_PROGRESS).
	Restart = Request{Kind: orch.OpRestart, Check: NotTransitional}
	// Destroy removes an engine whatever it is doing.
	Destroy = Request{Kind: orch.OpDestroy, State: orch.StateDestroying}
)

// Upgrade recreates a running engine on image, same brain
// (ENGINE_NOT_RUNNING).
func Upgrade(image string) Request {
	return Request{Kind: orch.OpUpgrade, Check: MustRun, Payload: schema.OpPayload{Image: image}}
}

// NotTransitional refuses an engine being created or destroyed
// (OPERATION_IN_PROGRESS).
func NotTransitional(e orch.Engine) error {
	if e.Status.Transitional() {
		return orch.Errorf(orch.CodeOperationInProgress, "engine is %s", e.Status)
	}
	return nil
}

// MustRun refuses an engine that is not running (ENGINE_NOT_RUNNING).
func MustRun(e orch.Engine) error {
	if e.Status != orch.StateRunning {
		return orch.Errorf(orch.CodeEngineNotRunning, "engine is %s, not running", e.Status)
	}
	return nil
}

// Operate starts an operation on the user's engine, or joins the same kind
// already in flight, and returns the engine and the operation to follow.
// Another kind in flight → OPERATION_IN_PROGRESS, except destroy, which
// always proceeds (and supersedes it); a pending auto-restart is replaced
// by a manual start, restart, stop or destroy. Errors: ENGINE_NOT_FOUND,
// OPERATION_IN_PROGRESS, and the request's own Check.
func (c *Core) Operate(ctx context.Context, p orch.Product, userID string, r Request) (orch.Engine, string, error) {
	if r.Actor == "" {
		r.Actor = p.Slug
	}
	var e orch.Engine
	var opID string
	err := c.inTx(ctx, func(q *schema.Queries, tx pgx.Tx) error {
		var err error
		e, err = q.EngineByUserForUpdate(ctx, p.ID, userID)
		if err != nil {
			return err
		}
		if e.OperationID != "" {
			cur, _, err := q.OperationByID(ctx, e.OperationID)
			if err != nil && !orch.IsCode(err, orch.CodeOperationNotFound) {
				return err
			}
			if err == nil && !cur.Status.Done() && isAutoRestart(cur) && cancelsAutoRestart(r.Kind) {
				joined, err := c.cancelAutoRestart(ctx, q, tx, cur, r.Kind)
				if err != nil {
					return err
				}
				if joined {
					opID = cur.ID
					return nil
				}
			} else if err == nil && !cur.Status.Done() {
				if cur.Kind == r.Kind || (cur.Kind == orch.OpStart && r.Kind == orch.OpWake) || (cur.Kind == orch.OpWake && r.Kind == orch.OpStart) {
					opID = cur.ID
					return nil
				}
				if r.Kind != orch.OpDestroy {
					return orch.Errorf(orch.CodeOperationInProgress, "a %s operation is in progress on this engine", cur.Kind)
				}
			}
		}
		if r.Check != nil {
			if err := r.Check(e); err != nil {
				return err
			}
		}
		op := c.newOp(p.ID, e, r.Kind, r.Actor)
		state := r.State
		if state == "" {
			state = e.Status
		}
		change := schema.EngineChange{Status: state, OperationID: &op.ID}
		if state.Transitional() {
			d := time.Now().Add(2*c.cfg.BootTimeout + time.Minute)
			change.Deadline = &d
		}
		if e, err = q.SetEngineState(ctx, e, change); err != nil {
			return err
		}
		opID = op.ID
		return c.enqueue(ctx, tx, e, op, r.Payload)
	})
	return e, opID, err
}

// isAutoRestart reports whether op is an auto-restart attempt.
func isAutoRestart(op orch.Operation) bool {
	return op.Kind == orch.OpRestart && op.Actor == orch.ActorSystem
}

// cancelsAutoRestart: a manual start, restart, stop or destroy replaces a
// pending auto-restart (a manual stop must never be undone by one).
func cancelsAutoRestart(kind orch.OpKind) bool {
	switch kind {
	case orch.OpStart, orch.OpWake, orch.OpRestart, orch.OpStop, orch.OpDestroy:
		return true
	}
	return false
}

// cancelAutoRestart cancels an auto-restart in flight within tx: its River
// job is locked (so no worker picks it up meanwhile) and cancelled, and its
// operation fails as superseded. A manual restart joins an attempt that is
// already running instead (it is doing what was asked); joined says so.
// An attempt already running when a stop, start or destroy comes is
// cancelled too: its outcome no longer applies, since the row points at
// the new operation.
func (c *Core) cancelAutoRestart(ctx context.Context, q *schema.Queries, tx pgx.Tx, op orch.Operation, kind orch.OpKind) (bool, error) {
	jobID, err := q.OperationJob(ctx, op.ID)
	if err != nil {
		return false, err
	}
	if jobID != 0 {
		state, err := q.LockJob(ctx, jobID)
		if err != nil {
			return false, err
		}
		if state == string(rivertype.JobStateRunning) && kind == orch.OpRestart {
			return true, nil
		}
		if state != "" {
			if _, err := c.river.JobCancelTx(ctx, tx, jobID); err != nil && !errors.Is(err, rivertype.ErrNotFound) {
				return false, &orch.Error{Code: orch.CodeInternal, Message: "could not cancel the pending auto-restart", Err: err}
			}
		}
	}
	return false, q.SetOperation(ctx, op.ID, orch.OpFailed, orch.CodeOperationInProgress,
		"superseded by a manual "+string(kind))
}

// RotateKey starts putting a new key in force on the user's running engine
// (or joins the rotation in flight) and returns the key that operation
// puts in force: the plaintext travels nowhere but back to the caller.
// Errors: those of Operate, ENGINE_NOT_RUNNING.
func (c *Core) RotateKey(ctx context.Context, p orch.Product, userID string) (orch.Engine, string, string, error) {
	key := keys.Generate()
	enc, err := c.keyring.Encrypt(key)
	if err != nil {
		return orch.Engine{}, "", "", err
	}
	e, opID, err := c.Operate(ctx, p, userID, Request{Kind: orch.OpRotateKey, Check: MustRun,
		Payload: schema.OpPayload{KeyHash: keys.Hash(key), KeyEnc: enc}})
	if err != nil {
		return e, opID, "", err
	}
	// Joined a rotation another request started: the key that will be in
	// force is the one in its payload, not ours.
	_, payload, err := schema.New(c.pool).OperationByID(ctx, opID)
	if err != nil {
		return e, opID, "", err
	}
	if payload.KeyHash != keys.Hash(key) {
		if key, err = c.Key(orch.Engine{KeyEnc: payload.KeyEnc}); err != nil {
			return e, opID, "", err
		}
	}
	return e, opID, key, nil
}

// TakeBackup records a backup operation on the user's engine and enqueues
// its job, or joins the one in flight; it returns the engine, the
// operation and the backup's id. It does not take the engine's operation
// slot: a start or stop requested meanwhile is not refused, it runs after
// the copy (the worker's lease on the engine serializes them). Errors:
// ENGINE_NOT_FOUND, OPERATION_IN_PROGRESS (engine being created or
// destroyed).
func (c *Core) TakeBackup(ctx context.Context, p orch.Product, userID, actor string) (orch.Engine, string, string, error) {
	if actor == "" {
		actor = p.Slug
	}
	var e orch.Engine
	var opID, backupID string
	err := c.inTx(ctx, func(q *schema.Queries, tx pgx.Tx) error {
		var err error
		if e, err = q.EngineByUserForUpdate(ctx, p.ID, userID); err != nil {
			return err
		}
		if err := NotTransitional(e); err != nil {
			return err
		}
		cur, err := q.InFlightOperation(ctx, e.ID, orch.OpBackup)
		if err == nil {
			_, payload, err := q.OperationByID(ctx, cur.ID)
			if err != nil {
				return err
			}
			opID, backupID = cur.ID, payload.BackupID
			return nil
		}
		if !orch.IsCode(err, orch.CodeOperationNotFound) {
			return err
		}
		op := c.newOp(p.ID, e, orch.OpBackup, actor)
		backupID = uuid.NewString()
		if err := Enqueue(ctx, tx, c.river, op, schema.OpPayload{BackupID: backupID},
			jobs.Backup{EngineID: e.ID, Node: e.Node, BackupID: backupID, OperationID: op.ID}, nil); err != nil {
			return err
		}
		opID = op.ID
		return nil
	})
	return e, opID, backupID, err
}

// Restore starts restoring backupID into the user's engine as an operation
// requested by actor (the product's slug by default, "admin" from the CLI
// and the console) and returns the engine and the operation to follow.
// Errors: ENGINE_NOT_FOUND, BACKUP_NOT_FOUND (unknown, or another user's),
// OPERATION_IN_PROGRESS.
func (c *Core) Restore(ctx context.Context, p orch.Product, userID, backupID, actor string) (orch.Engine, string, error) {
	if _, err := schema.New(c.pool).UserBackup(ctx, p.ID, userID, backupID); err != nil {
		return orch.Engine{}, "", err
	}
	e, opID, err := c.Operate(ctx, p, userID, Request{Kind: orch.OpRestore, Check: NotTransitional,
		Payload: schema.OpPayload{BackupID: backupID}, Actor: actor})
	if err != nil {
		return e, opID, err
	}
	// Operate joins a restore in flight: only if it restores the same backup.
	if _, payload, err := schema.New(c.pool).OperationByID(ctx, opID); err != nil {
		return e, opID, err
	} else if payload.BackupID != backupID {
		return e, opID, orch.Errorf(orch.CodeOperationInProgress, "a restore of backup %s is in progress on this engine", payload.BackupID)
	}
	return e, opID, nil
}
