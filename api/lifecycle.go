package api

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/lifecycle"
	"github.com/enginefleet/orchestrator/schema"
)

// This file is the request side of the engine lifecycle: each function
// validates against the row, records the operation, changes the row and
// enqueues the job in one transaction. Commit = the work will happen.

// engineURL renders ORCH_ENGINE_URL_TEMPLATE for an engine.
func (s *Server) engineURL(e orch.Engine) string {
	r := strings.NewReplacer("{port}", strconv.Itoa(e.Port), "{container}", orch.ContainerName(e.ID),
		"{engine_id}", e.ID, "{node}", e.Node)
	return r.Replace(s.cfg.URLTemplate)
}

// engineKey decrypts an engine's key for the responses that carry it.
func (s *Server) engineKey(e orch.Engine) (string, error) {
	k, err := s.keyring.Decrypt(e.KeyEnc)
	if err != nil {
		return "", &orch.Error{Code: orch.CodeInternal, Message: "engine key cannot be decrypted: was ORCH_MASTER_KEY changed without ORCH_MASTER_KEY_PREVIOUS?", Err: err}
	}
	return k, nil
}

// allowImage refuses an engine_version outside ORCH_ENGINE_IMAGE_ALLOWLIST.
func (s *Server) allowImage(image string) error {
	if !s.cfg.Images.Allows(image) {
		return orch.Errorf(orch.CodeInvalidRequest, "engine_version %q is not an image this orchestrator runs: ask the operator to allow it", image)
	}
	return nil
}

func (s *Server) inTx(ctx context.Context, fn func(q *schema.Queries, tx pgx.Tx) error) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error { return fn(schema.New(tx), tx) })
}

// lifecycleArgs builds the job for an operation kind.
func lifecycleArgs(kind orch.OpKind, l jobs.Lifecycle, fromVersion string) river.JobArgs {
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

// enqueue records op and inserts its job within tx.
func (s *Server) enqueue(ctx context.Context, tx pgx.Tx, e orch.Engine, op orch.Operation, payload schema.OpPayload) error {
	args := lifecycleArgs(op.Kind, jobs.Lifecycle{EngineID: e.ID, OperationID: op.ID, Node: e.Node}, e.EngineVersion)
	return lifecycle.Enqueue(ctx, tx, s.river, op, payload, args, nil)
}

func (s *Server) newOp(p orch.Product, e orch.Engine, kind orch.OpKind) orch.Operation {
	return orch.Operation{ID: uuid.NewString(), ProductID: p.ID, EngineID: e.ID, UserID: e.UserID, Kind: kind,
		Status: orch.OpPending, Actor: p.Slug, Deadline: lifecycle.Deadline(nil, s.cfg.BootTimeout)}
}

// provisionResult is what provision hands back: the engine, the operation to
// wait on (empty when there is nothing to wait for) and, for the creator,
// the plaintext key it generated.
type provisionResult struct {
	engine orch.Engine
	opID   string
	key    string
}

// provision creates the user's engine. With join, an existing engine is
// returned instead of ENGINE_ALREADY_EXISTS (admit's auto_provision), so
// any number of concurrent admits create exactly one engine.
func (s *Server) provision(ctx context.Context, p orch.Product, userID, image string, join bool) (provisionResult, error) {
	if image == "" {
		image = s.cfg.DefaultImage
	}
	if err := s.allowImage(image); err != nil {
		return provisionResult{}, err
	}
	var res provisionResult
	err := s.inTx(ctx, func(q *schema.Queries, tx pgx.Tx) error {
		// The product lock serializes this product's provisions: the quota
		// count and the existence check cannot race.
		if err := q.LockProduct(ctx, p.ID); err != nil {
			return err
		}
		if e, err := q.EngineByUser(ctx, p.ID, userID); err == nil {
			if !join {
				return orch.Errorf(orch.CodeEngineAlreadyExists, "an engine already exists for user %q", userID)
			}
			res = provisionResult{engine: e}
			if e.Status == orch.StateProvisioning {
				res.opID = e.OperationID
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
		port, err := q.FreePort(ctx, s.cfg.Node, s.cfg.PortMin, s.cfg.PortMax)
		if err != nil {
			return err
		}
		key := keys.Generate()
		enc, err := s.keyring.Encrypt(key)
		if err != nil {
			return err
		}
		deadline := time.Now().Add(2*s.cfg.BootTimeout + time.Minute)
		e := orch.Engine{ID: uuid.NewString(), ProductID: p.ID, UserID: userID, Status: orch.StateProvisioning,
			Node: s.cfg.Node, Port: port, EngineVersion: image, KeyHash: keys.Hash(key), KeyEnc: enc, StateDeadline: &deadline}
		op := s.newOp(p, e, orch.OpProvision)
		e.OperationID = op.ID
		if err := q.InsertEngine(ctx, e); err != nil {
			return err
		}
		if err := s.enqueue(ctx, tx, e, op, schema.OpPayload{}); err != nil {
			return err
		}
		res = provisionResult{engine: e, opID: op.ID, key: key}
		return nil
	})
	return res, err
}

// opRequest describes a lifecycle request on an existing engine.
type opRequest struct {
	kind    orch.OpKind
	check   func(e orch.Engine) error // refuses the request in the engine's current state
	payload schema.OpPayload
	state   orch.State // the row's state while the operation runs ("" = unchanged)
}

// operate starts an operation on the user's engine, or joins the same kind
// already in flight. Another kind in flight → OPERATION_IN_PROGRESS,
// except destroy, which always proceeds (and supersedes it).
func (s *Server) operate(ctx context.Context, p orch.Product, userID string, r opRequest) (orch.Engine, string, error) {
	var e orch.Engine
	var opID string
	err := s.inTx(ctx, func(q *schema.Queries, tx pgx.Tx) error {
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
			if err == nil && !cur.Status.Done() && isAutoRestart(cur) && cancelsAutoRestart(r.kind) {
				joined, err := s.cancelAutoRestart(ctx, q, tx, cur, r.kind)
				if err != nil {
					return err
				}
				if joined {
					opID = cur.ID
					return nil
				}
			} else if err == nil && !cur.Status.Done() {
				if cur.Kind == r.kind || (cur.Kind == orch.OpStart && r.kind == orch.OpWake) || (cur.Kind == orch.OpWake && r.kind == orch.OpStart) {
					opID = cur.ID
					return nil
				}
				if r.kind != orch.OpDestroy {
					return orch.Errorf(orch.CodeOperationInProgress, "a %s operation is in progress on this engine", cur.Kind)
				}
			}
		}
		if r.check != nil {
			if err := r.check(e); err != nil {
				return err
			}
		}
		op := s.newOp(p, e, r.kind)
		state := r.state
		if state == "" {
			state = e.Status
		}
		change := schema.EngineChange{Status: state, OperationID: &op.ID}
		if state.Transitional() {
			d := time.Now().Add(2*s.cfg.BootTimeout + time.Minute)
			change.Deadline = &d
		}
		if e, err = q.SetEngineState(ctx, e, change); err != nil {
			return err
		}
		opID = op.ID
		return s.enqueue(ctx, tx, e, op, r.payload)
	})
	return e, opID, err
}

// isAutoRestart reports whether op is an auto-restart attempt (SPEC §6).
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
func (s *Server) cancelAutoRestart(ctx context.Context, q *schema.Queries, tx pgx.Tx, op orch.Operation, kind orch.OpKind) (bool, error) {
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
			if _, err := s.river.JobCancelTx(ctx, tx, jobID); err != nil && !errors.Is(err, rivertype.ErrNotFound) {
				return false, &orch.Error{Code: orch.CodeInternal, Message: "could not cancel the pending auto-restart", Err: err}
			}
		}
	}
	return false, q.SetOperation(ctx, op.ID, orch.OpFailed, orch.CodeOperationInProgress,
		"superseded by a manual "+string(kind))
}

// wait blocks until the operation finishes or timeout, woken by NOTIFY on
// the operation (a slow poll only as a fallback); a failed operation is
// returned as its error code.
func (s *Server) wait(ctx context.Context, productID, opID string, timeout time.Duration) error {
	ch, cancel := s.waiters.subscribe(opID)
	defer cancel()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	// NOTIFY wakes the wait; the slow poll is the safety net for a
	// notification that never arrives (a listener whose connection went
	// half-open, a NOTIFY lost in a reconnect).
	poll := time.NewTicker(waitPoll)
	defer poll.Stop()
	q := schema.New(s.pool)
	for {
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
			switch op.Kind {
			case orch.OpProvision, orch.OpStart, orch.OpWake, orch.OpRestart, orch.OpUpgrade, orch.OpRestore:
				code = orch.CodeBootTimeout
			}
			return orch.Errorf(code, "the operation did not finish within %s; follow it with GET /operations/%s", timeout, opID)
		case <-s.stopWaits:
			return withRetryAfter(orch.Errorf(orch.CodeUnavailable, "this replica is shutting down; the operation goes on: follow it with GET /operations/%s", opID), 1)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// waitPoll is how often a waiting request re-reads its operation without
// being notified.
const waitPoll = 2 * time.Second

// waitTimeout is how long a synchronous request waits: the boot timeout,
// plus slack for the job to be picked up and for a stop's grace period.
func (s *Server) waitTimeout(kind orch.OpKind) time.Duration {
	d := s.cfg.BootTimeout + 10*time.Second
	switch kind {
	case orch.OpStop, orch.OpRestart, orch.OpDestroy, orch.OpRotateKey, orch.OpUpgrade:
		d += 30 * time.Second
	}
	return d
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

// activity throttles admit's activity writes to one per engine per
// minute. Bounded without scans: engines are spread over shards by hash,
// each with its own lock and two generations of "last written" times
// (generations.go); a shard starts a new generation every activityEvery,
// so a generation dropped whole only holds times at least that old, whose
// engines are due anyway. A shard holds at most 2×activityShardSize
// engines; past that it rotates early, at the cost of an extra write for
// some engine, never of a lost one.
type activity struct {
	shards [activityShards]activityShard
}

type activityShard struct {
	mu      sync.Mutex
	last    generations[string, time.Time]
	rotated time.Time
}

const (
	activityEvery     = time.Minute
	activityShards    = 16
	activityShardSize = 4096
)

func (a *activity) due(engineID string, now time.Time) bool {
	h := uint32(2166136261) // FNV-1a: engine ids are ours (UUIDs), not a client's
	for i := 0; i < len(engineID); i++ {
		h = (h ^ uint32(engineID[i])) * 16777619
	}
	sh := &a.shards[h%activityShards]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if sh.last.size == 0 {
		sh.last = newGenerations[string, time.Time](activityShardSize)
	}
	if now.Sub(sh.rotated) >= activityEvery {
		sh.last.rotate()
		sh.rotated = now
	}
	if t, ok := sh.last.get(engineID); ok && now.Sub(t) < activityEvery {
		return false
	}
	sh.last.put(engineID, now)
	return true
}

// touch records activity for idle detection, at most once a minute per engine.
func (s *Server) touch(e orch.Engine) {
	now := time.Now()
	if e.LastActiveAt != nil && now.Sub(*e.LastActiveAt) < activityEvery {
		return
	}
	if !s.activity.due(e.ID, now) {
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := schema.New(s.pool).TouchActivity(ctx, e.ID); err != nil {
			s.log.Warn("record activity", "engine_id", e.ID, "error", err)
		}
	}()
}
