package workers

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/metrics"
	"github.com/enginefleet/orchestrator/schema"
)

// EngineConfig is how a worker runs, boots and reaches its engines.
type EngineConfig struct {
	BootTimeout      time.Duration // boot deadline of provision, start, restart… (no default)
	ProbeTimeout     time.Duration // one /health probe (10 s)
	ProbeURLTemplate string        // how a worker reaches an engine ("http://127.0.0.1:{port}")
	Namespace        string        // the kubernetes backend's engine namespace ({namespace} in ProbeURLTemplate)
	// Dial, when set, opens the workers' connections to engines (probes,
	// brain export and import) instead of the system dialer: tests stand
	// in for cluster DNS with it.
	Dial             func(ctx context.Context, network, addr string) (net.Conn, error)
	EnvPassthrough   map[string]string // copied into every engine
	KeyOverlap       time.Duration     // rotate-key: how long the previous key keeps working
	StopGrace        time.Duration     // SIGTERM → SIGKILL (30 s)
	PortMin, PortMax int               // the node's engine ports: where a refused port's engine moves (0 = never moved)
	PortBlockTTL     time.Duration     // how long a port the host refused is skipped (1 h)
}

func (c EngineConfig) withDefaults() EngineConfig {
	if c.StopGrace == 0 {
		c.StopGrace = 30 * time.Second
	}
	if c.ProbeTimeout == 0 {
		c.ProbeTimeout = 10 * time.Second
	}
	if c.ProbeURLTemplate == "" {
		c.ProbeURLTemplate = "http://127.0.0.1:{port}"
	}
	if c.PortBlockTTL <= 0 {
		c.PortBlockTTL = DefaultPortBlockTTL
	}
	return c
}

// runner is what every job shares: the database, the backend, this
// process's liveness session, and the engine mechanics (the run/commit
// skeleton with its lease, booting and probing engines, their specs).
type runner struct {
	node    string
	eng     EngineConfig
	pool    *pgxpool.Pool
	backend orch.Backend
	log     *slog.Logger
	metrics *metrics.Metrics
	http    *http.Client // probes
	session *session     // liveness.go
}

func newRunner(node string, eng EngineConfig, m *metrics.Metrics, pool *pgxpool.Pool, backend orch.Backend, log *slog.Logger) *runner {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = 2
	tr.IdleConnTimeout = 30 * time.Second
	if eng.Dial != nil {
		tr.DialContext = eng.Dial
	}
	return &runner{node: node, eng: eng, pool: pool, backend: backend, log: log, metrics: m,
		http: &http.Client{Transport: tr}, session: newSession(node)}
}

// jobTimeout bounds one lifecycle job: stop grace plus boot plus slack.
// It is above the boot timeout, as River's default 1 minute is not.
func (r *runner) jobTimeout() time.Duration {
	return r.eng.StopGrace + 2*r.eng.BootTimeout + 30*time.Second
}

// outcome is what a step decided; run commits it atomically.
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
	// record inserts what the step made (a backup's row) inside commit's
	// transaction, before the audit row, whoever owns the engine. An
	// outcome with a record is committed even when the job's context
	// ended after the step: what it records exists. errRecorded in its
	// chain: it was recorded already, the outcome is dropped.
	record func(ctx context.Context, q *schema.Queries) error
	// discard undoes what the step left outside the database (a backup's
	// file) when the outcome is not committed.
	discard func()
	// retryAudited: the failure may go away on retry whatever its code
	// (writing a backup), and each failed attempt is audited as it
	// happens, the operation staying running until the last.
	retryAudited bool
	logAs        string // the job log line's outcome, when not succeeded/failed
	logAttrs     []any  // more attributes for the job's log line
}

// step does one operation's backend work on a leased engine.
type step func(ctx context.Context, e orch.Engine, op orch.Operation, p schema.OpPayload, attempt int, lastAttempt bool) outcome

// leaseWait is how long a job snoozes while another job works its engine.
const leaseWait = 200 * time.Millisecond

// errLeaseLost: the attempt no longer holds its engine's lease (it was
// presumed dead and its job re-queued): its outcome must not be committed.
var errLeaseLost = errors.New("engine lease lost to another attempt; outcome not committed")

// leaseOf is the engine lease of a job's attempt in this process.
func (r *runner) leaseOf(job *rivertype.JobRow) schema.Lease {
	return schema.Lease{Job: job.ID, Attempt: job.Attempt, Owner: r.session.id}
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

// runOpts is how run treats one kind of job.
type runOpts struct {
	// aside: the job works the engine beside its operation slot, as a
	// backup does: the engine row's operation_id is not the job's
	// operation, so the job is never superseded (and its outcome's
	// change and after are never applied), and it may have no operation
	// at all (a scheduled backup).
	aside bool
}

// run is the shared skeleton of every job that works one engine: lease,
// load, mark the operation running, do the step, commit the outcome,
// release the lease. A step cut off (job timeout, shutdown) or failing
// transiently commits nothing: River retries the job, here or elsewhere,
// and the work is idempotent; if that was the last attempt, the operation
// sweep ends the operation (abandoned.go).
func (r *runner) run(ctx context.Context, job *rivertype.JobRow, a jobs.Lifecycle, o runOpts, do step) error {
	start := time.Now()
	if !o.aside && job.Attempt == 1 {
		// Queueing, River's fetch and the hand-over to this worker: a
		// retry's wait is its backoff, not pickup.
		r.metrics.ObserveStep(metrics.StepPickup, start.Sub(job.ScheduledAt))
	}
	q := schema.New(r.pool)
	lease := r.leaseOf(job)
	e, got, err := q.TakeLease(ctx, a.EngineID, lease, leaseUntil(ctx, r.jobTimeout())) // lease and read in one
	if orch.IsCode(err, orch.CodeEngineNotFound) {
		// Destroyed meanwhile: nothing to do but close the operation.
		r.finishOrphanOp(ctx, a.OperationID)
		r.logJob(job.Kind, a.EngineID, job.Attempt, start, "engine_gone", nil)
		return nil
	}
	if err != nil {
		return err
	}
	if !got {
		return river.JobSnooze(leaseWait)
	}
	defer r.releaseLease(ctx, a.EngineID, lease)

	var op orch.Operation
	var payload schema.OpPayload
	if a.OperationID != "" || !o.aside {
		op, payload, err = q.StartOperation(ctx, a.OperationID) // pending → running, in the read
		if err != nil {
			return err
		}
		if op.Status.Done() {
			return nil // a retry of a job whose outcome is already committed
		}
	}
	if !o.aside && e.OperationID != op.ID {
		// A later operation (e.g. destroy) superseded this one.
		err := orch.Errorf(orch.CodeOperationInProgress, "superseded by a later operation on this engine")
		r.commit(ctx, e, op, lease, outcome{err: err}) //nolint:errcheck
		r.logJob(job.Kind, e.ID, job.Attempt, start, "superseded", nil)
		return nil
	}
	last := job.Attempt >= job.MaxAttempts
	out := do(ctx, e, op, payload, job.Attempt, last)
	if ctx.Err() != nil && out.record == nil {
		r.auditRetry(ctx, e, op, out)
		if out.discard != nil {
			out.discard()
		}
		r.logJob(job.Kind, e.ID, job.Attempt, start, "interrupted", ctx.Err())
		return ctx.Err()
	}
	if out.err != nil && !last && (out.retryAudited || retryable(out.err)) {
		// Transient trouble: River retries; the operation stays running.
		r.auditRetry(ctx, e, op, out)
		if out.discard != nil {
			out.discard()
		}
		r.logJob(job.Kind, e.ID, job.Attempt, start, "retry", out.err)
		return out.err
	}
	committing := time.Now()
	err = r.commit(ctx, e, op, lease, out)
	if !o.aside {
		r.metrics.ObserveStep(metrics.StepCommit, time.Since(committing))
	}
	if err != nil {
		if out.discard != nil {
			out.discard()
		}
		if errors.Is(err, errRecorded) {
			r.logJob(job.Kind, e.ID, job.Attempt, start, "duplicate", nil)
			return nil
		}
		r.logJob(job.Kind, e.ID, job.Attempt, start, "not_committed", err)
		return err
	}
	result := out.logAs
	switch {
	case result != "":
	case out.err != nil:
		result = "failed"
	default:
		result = "succeeded"
	}
	r.logJob(job.Kind, e.ID, job.Attempt, start, result, out.err, out.logAttrs...)
	return nil
}

// errRecorded: what an outcome records is there already (a scheduled
// backup of that day, recorded by another job); run drops the outcome.
var errRecorded = errors.New("already recorded")

// auditRetry audits a failed attempt that commits nothing (retried or cut
// off) when its outcome asks for it (retryAudited).
func (r *runner) auditRetry(ctx context.Context, e orch.Engine, op orch.Operation, out outcome) {
	if !out.retryAudited || out.err == nil || out.action == "" {
		return
	}
	if err := schema.New(r.pool).InsertAudit(context.WithoutCancel(ctx), auditEntry(e, op, out)); err != nil {
		r.log.Warn("audit failed attempt", "engine_id", e.ID, "action", out.action, "error", err)
	}
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
func (r *runner) commit(ctx context.Context, e orch.Engine, op orch.Operation, lease schema.Lease, out outcome) error {
	ctx = context.WithoutCancel(ctx) // a finished step's outcome must land even during shutdown
	err := inTx(ctx, r.pool, func(tx pgx.Tx) error {
		return r.commitTx(ctx, schema.New(tx), tx, e, op, lease, out)
	})
	if err == nil {
		var boot time.Duration
		if out.change != nil && out.change.BootDurationMS != nil {
			boot = time.Duration(*out.change.BootDurationMS) * time.Millisecond
		}
		r.metrics.Lifecycle(out.action, out.err != nil, boot)
	}
	return err
}

// commitTx is commit's transaction body.
func (r *runner) commitTx(ctx context.Context, q *schema.Queries, tx pgx.Tx, e orch.Engine, op orch.Operation, lease schema.Lease, out outcome) error {
	cur, holds, err := q.LockLeasedEngine(ctx, e.ID, lease) // the row and the fence in one read
	if err != nil && !orch.IsCode(err, orch.CodeEngineNotFound) {
		return err
	}
	gone := err != nil
	if !gone && !holds {
		return errLeaseLost
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
	if out.record != nil {
		if err := out.record(ctx, q); err != nil {
			return err
		}
	}
	if out.action != "" {
		if err := q.InsertAudit(ctx, auditEntry(e, op, out)); err != nil {
			return err
		}
	}
	if out.after != nil && !gone && cur.OperationID == op.ID {
		if err := out.after(ctx, q, tx); err != nil {
			return err
		}
	}
	switch {
	case op.ID == "": // an aside job without an operation (a scheduled backup)
		return nil
	case out.err != nil:
		return q.SetOperation(ctx, op.ID, orch.OpFailed, orch.ErrorCode(out.err), errMessage(out.err))
	}
	return q.SetOperation(ctx, op.ID, orch.OpSucceeded, "", "")
}

// auditEntry is the audit row of an outcome: its action and meta, with
// the operation and, when it failed, the error's code and public words.
func auditEntry(e orch.Engine, op orch.Operation, out outcome) orch.AuditEntry {
	meta := out.meta
	if meta == nil {
		meta = map[string]any{}
	}
	if op.ID != "" {
		meta["operation_id"] = op.ID
	}
	if out.err != nil {
		meta["error_code"] = string(orch.ErrorCode(out.err))
		meta["error"] = publicError(out.err)
	}
	var dur *int64
	if out.duration > 0 {
		dur = ptr(out.duration.Milliseconds())
	}
	return orch.AuditEntry{ProductID: e.ProductID, UserID: e.UserID, EngineID: e.ID,
		Action: out.action, Actor: actorOf(op), Metadata: meta, DurationMS: dur}
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
func (r *runner) finishOrphanOp(ctx context.Context, opID string) {
	if opID == "" {
		return
	}
	q := schema.New(r.pool)
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

// releaseLease gives up an attempt's engine lease. If the database cannot
// be reached the release is retried with every heartbeat (liveness.go):
// the attempt has ended, and its retry (a new attempt, fenced from this
// one) must not wait for the lease to lapse.
func (r *runner) releaseLease(ctx context.Context, engineID string, l schema.Lease) {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := schema.New(r.pool).ReleaseLease(rctx, engineID, l); err != nil {
		r.session.mu.Lock()
		r.session.releases[leaseKey{engineID, l}] = true
		r.session.mu.Unlock()
	}
}

func ptr[T any](v T) *T { return &v }

// bootOutcome turns a boot attempt into the running-or-failed outcome that
// provision, start, wake, restart and auto-restart share.
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

// spec is the backend spec of an engine at image.
func (r *runner) spec(e orch.Engine, image, keyHash, prevHash string, prevExpires *time.Time) orch.EngineSpec {
	env := map[string]string{}
	for k, v := range r.eng.EnvPassthrough {
		env[k] = v
	}
	env["ENGINE_KEY_HASH"] = keyHash
	env["SQLITE_DB_PATH"] = "/data/brain.sqlite"
	env["CATALOG_DIR"] = "/catalog"
	if prevHash != "" && prevExpires != nil && time.Now().Before(*prevExpires) {
		env["ENGINE_KEY_HASH_PREVIOUS"] = prevHash
		env["ENGINE_KEY_PREVIOUS_EXPIRES_AT"] = prevExpires.UTC().Format(time.RFC3339)
	}
	return orch.EngineSpec{EngineID: e.ID, ProductID: e.ProductID, Node: e.Node, Image: image, HostPort: e.Port, Env: env}
}

// currentSpec is the spec of an engine as its row stands.
func (r *runner) currentSpec(e orch.Engine) orch.EngineSpec {
	return r.spec(e, e.EngineVersion, e.KeyHash, e.PrevKeyHash, e.PrevKeyExpiresAt)
}

func (r *runner) probeURL(e orch.Engine) string {
	return strings.TrimRight(orch.EngineURL(r.eng.ProbeURLTemplate, e, r.eng.Namespace), "/") + "/health"
}

// probeOnce checks e's /health once, within ProbeTimeout.
func (r *runner) probeOnce(ctx context.Context, e orch.Engine) error {
	pctx, cancel := context.WithTimeout(ctx, r.eng.ProbeTimeout)
	defer cancel()
	return Probe(pctx, r.http, r.probeURL(e))
}

// errBootTimeout is returned by bootAndWait when the engine never became healthy.
var errBootTimeout = orch.Errorf(orch.CodeBootTimeout, "engine did not become healthy in time")

// bootAndWait ensures the container for spec, starts it and waits until its
// /health is ok or the boot timeout passes. Returns the boot duration. A
// host port the host refuses moves the engine to a free port first (its
// row changes; see ports.go).
func (r *runner) bootAndWait(ctx context.Context, e orch.Engine, spec orch.EngineSpec) (time.Duration, error) {
	start := time.Now()
	if err := r.backend.Ensure(ctx, spec); err != nil {
		if errors.Is(err, orch.ErrImageUnavailable) {
			return 0, &orch.Error{Code: orch.CodeBackendFailed, Err: err,
				Message: fmt.Sprintf("image %s is not available on node %s (not present, and it could not be pulled)", spec.Image, r.node)}
		}
		return 0, backendErr("create engine", err)
	}
	ensured := time.Now()
	r.metrics.ObserveStep(metrics.StepEnsure, ensured.Sub(start))
	e, _, err := r.startMovingPort(ctx, e, spec) // ports.go: a refused host port moves the engine
	if err != nil {
		return 0, err
	}
	started := time.Now()
	r.metrics.ObserveStep(metrics.StepStart, started.Sub(ensured))
	if err := r.waitHealthy(ctx, e, start.Add(r.eng.BootTimeout)); err != nil {
		return time.Since(start), err
	}
	r.metrics.ObserveStep(metrics.StepHealth, time.Since(started))
	return time.Since(start), nil
}

// healthPoll is the pause between two probes of a booting engine that has
// been waited for since elapsed: an engine usually answers within a few
// hundred milliseconds of its start, and a request is waiting on it, so
// it is looked at often at first (a probe of a port nobody listens on
// costs a refused connection); one that takes longer is slow for a reason
// (a large brain, a loaded host) and is looked at less.
func healthPoll(elapsed time.Duration) time.Duration {
	switch {
	case elapsed < 3*time.Second:
		return 10 * time.Millisecond
	case elapsed < 15*time.Second:
		return 50 * time.Millisecond
	}
	return 200 * time.Millisecond
}

// waitHealthy polls the engine's /health until it is ok or deadline.
func (r *runner) waitHealthy(ctx context.Context, e orch.Engine, deadline time.Time) error {
	url := r.probeURL(e)
	began := time.Now()
	lastLook, restartPause := began, 500*time.Millisecond
	for {
		pctx, cancel := context.WithTimeout(ctx, min(r.eng.ProbeTimeout, time.Until(deadline)+time.Millisecond))
		err := Probe(pctx, r.http, url)
		cancel()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		// An engine that died while booting (a port briefly taken, a crash)
		// is started again until the deadline, as Docker's restart policy
		// would, with a growing pause; one that never comes up still ends
		// in BOOT_TIMEOUT, as the contract says.
		if time.Since(lastLook) >= restartPause {
			lastLook = time.Now()
			if info, ierr := r.backend.Inspect(ctx, e.ID); ierr == nil && info.State == orch.RuntimeExited {
				r.log.Warn("engine exited while booting; starting it again", "engine_id", e.ID, "exit_code", info.ExitCode)
				if err := r.backend.Start(ctx, e.ID); err != nil {
					return backendErr("restart engine while booting", err)
				}
				restartPause = min(2*restartPause, 4*time.Second)
			}
		}
		delay := healthPoll(time.Since(began))
		if time.Now().Add(delay).After(deadline) {
			return errBootTimeout
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(delay):
		}
	}
}

func backendErr(what string, err error) error {
	return &orch.Error{Code: orch.CodeBackendFailed, Message: what + " failed", Err: err}
}

// observeJob times every job this process works, by kind and outcome, and
// lists it in the liveness heartbeat while it runs.
func (r *runner) observeJob(ctx context.Context, job *rivertype.JobRow, doInner func(context.Context) error) error {
	start := time.Now()
	r.session.started(job.ID)
	err := doInner(ctx)
	r.session.finished(job.ID)
	outcome := "completed"
	var snooze *river.JobSnoozeError
	var cancel *river.JobCancelError
	switch {
	case err == nil:
	case errors.As(err, &snooze):
		outcome = "snoozed"
	case errors.As(err, &cancel):
		outcome = "cancelled"
	default:
		outcome = "failed"
	}
	r.metrics.ObserveJob(job.Kind, outcome, time.Since(start))
	return err
}

// logJob writes the one log line per job.
func (r *runner) logJob(kind string, engineID string, attempt int, start time.Time, outcome string, err error, more ...any) {
	attrs := append([]any{"job_kind", kind, "engine_id", engineID, "attempt", attempt,
		"duration_ms", time.Since(start).Milliseconds(), "outcome", outcome}, more...)
	if err != nil {
		attrs = append(attrs, "error", err.Error())
		r.log.Warn("job", attrs...)
		return
	}
	r.log.Info("job", attrs...)
}

func inTx(ctx context.Context, pool *pgxpool.Pool, fn func(tx pgx.Tx) error) error {
	if err := pgx.BeginFunc(ctx, pool, fn); err != nil {
		return fmt.Errorf("transaction: %w", err)
	}
	return nil
}
