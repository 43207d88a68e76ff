// Package workers holds the River workers: the only code that drives a
// backend. Each lifecycle job takes a lease on its engine row (so jobs of
// different kinds never work one engine at once, on any replica), does its
// idempotent backend work, then commits the state change, the audit row
// and the operation's outcome in one transaction, which also notifies the
// API requests waiting on it.
package workers

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/metrics"
)

// Config is what the workers need, one section per concept; cmd/orchestrator
// fills it. Zero values take the defaults each section names.
type Config struct {
	Node        string           // this process's node: its queues, its engines ("local")
	Concurrency int              // lifecycle jobs at once on the node's queue (50)
	Metrics     *metrics.Metrics // job durations, lifecycle counters, boot times (nil = none)

	Engines   EngineConfig    // how engines are run, booted and probed (runner.go)
	Health    HealthConfig    // health sweeps, crash checks, auto-restart (health.go)
	Idle      IdleConfig      // idle sleep (idle.go)
	Backups   BackupConfig    // brain backups and restores (backup.go)
	Audit     AuditConfig     // audit exports and purge (audit_export.go)
	Reconcile ReconcileConfig // drift repair (reconcile.go)
}

// EngineConfig is how a worker runs, boots and reaches its engines.
type EngineConfig struct {
	BootTimeout      time.Duration     // boot deadline of provision, start, restart… (no default)
	ProbeTimeout     time.Duration     // one /health probe (10 s)
	ProbeURLTemplate string            // how a worker reaches an engine ("http://127.0.0.1:{port}")
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

// Workers runs engine jobs against one backend.
type Workers struct {
	cfg     Config
	pool    *pgxpool.Pool
	backend orch.Backend
	log     *slog.Logger
	http    *http.Client
	fleet   fleetState
	session *session // liveness.go
}

// New builds the workers.
func New(cfg Config, pool *pgxpool.Pool, backend orch.Backend, log *slog.Logger) *Workers {
	if cfg.Node == "" {
		cfg.Node = "local"
	}
	if cfg.Concurrency == 0 {
		cfg.Concurrency = 50
	}
	cfg.Engines = cfg.Engines.withDefaults()
	cfg.Health = cfg.Health.withDefaults()
	cfg.Idle = cfg.Idle.withDefaults()
	cfg.Backups = cfg.Backups.withDefaults()
	cfg.Audit = cfg.Audit.withDefaults()
	cfg.Reconcile = cfg.Reconcile.withDefaults()
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = 2
	tr.IdleConnTimeout = 30 * time.Second
	return &Workers{cfg: cfg, pool: pool, backend: backend, log: log, http: &http.Client{Transport: tr},
		fleet: newFleetState(cfg.Health), session: newSession(cfg.Node)}
}

// jobTimeout bounds one lifecycle job: stop grace plus boot plus slack.
// It is above the boot timeout, as River's default 1 minute is not.
func (w *Workers) jobTimeout() time.Duration {
	return w.cfg.Engines.StopGrace + 2*w.cfg.Engines.BootTimeout + 30*time.Second
}

// restoreTimeout bounds a restore job: a whole restore plus a rollback's
// boot, all inside the job's own time (restore.go), so no attempt's work
// outlives its lease and overlaps its retry.
func (w *Workers) restoreTimeout() time.Duration {
	return w.jobTimeout() + w.cfg.Engines.BootTimeout + time.Minute
}

// Register adds every worker to ws.
func (w *Workers) Register(ws *river.Workers) {
	river.AddWorker(ws, &provisionWorker{lifecycleWorker[jobs.Provision]{w: w}})
	river.AddWorker(ws, &startWorker{lifecycleWorker[jobs.Start]{w: w}})
	river.AddWorker(ws, &stopWorker{lifecycleWorker[jobs.Stop]{w: w}})
	river.AddWorker(ws, &restartWorker{lifecycleWorker[jobs.Restart]{w: w}})
	river.AddWorker(ws, &rotateKeyWorker{lifecycleWorker[jobs.RotateKey]{w: w}})
	river.AddWorker(ws, &upgradeWorker{lifecycleWorker[jobs.Upgrade]{w: w}})
	river.AddWorker(ws, &destroyWorker{lifecycleWorker[jobs.Destroy]{w: w}})
	river.AddWorker(ws, &reconcileWorker{w: w})
	w.registerBackups(ws)
	w.registerFleet(ws)
}

// RiverConfig is the River client configuration of a worker process: its
// node's queue and the fleet queue, tuned for low pickup latency.
func (w *Workers) RiverConfig(log *slog.Logger) *river.Config {
	ws := river.NewWorkers()
	w.Register(ws)
	return &river.Config{
		ID:     w.session.id, // river_job.attempted_by names this process's liveness session
		Logger: log,
		Queues: map[string]river.QueueConfig{
			jobs.NodeQueue(w.cfg.Node):   {MaxWorkers: w.cfg.Concurrency},
			jobs.QueueFleet:              {MaxWorkers: 10},
			river.QueueDefault:           {MaxWorkers: 10},
			jobs.BackupQueue(w.cfg.Node): {MaxWorkers: w.cfg.Backups.Concurrency},
		},
		Workers:           ws,
		Middleware:        []rivertype.Middleware{river.WorkerMiddlewareFunc(w.observeJob)},
		FetchCooldown:     2 * time.Millisecond,
		FetchPollInterval: 200 * time.Millisecond,
		JobTimeout:        w.jobTimeout(),
		// A job whose worker process died is re-queued within seconds by
		// the liveness rescuer (liveness.go); River's own rescue is the
		// last resort for a live process stuck past every job's timeout
		// (restore's is the longest) and its lease's slack.
		RescueStuckJobsAfter: w.restoreTimeout() + time.Minute,
	}
}

// spec is the backend spec of an engine at image (SPEC §8 environment).
func (w *Workers) spec(e orch.Engine, image, keyHash, prevHash string, prevExpires *time.Time) orch.EngineSpec {
	env := map[string]string{}
	for k, v := range w.cfg.Engines.EnvPassthrough {
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
func (w *Workers) currentSpec(e orch.Engine) orch.EngineSpec {
	return w.spec(e, e.EngineVersion, e.KeyHash, e.PrevKeyHash, e.PrevKeyExpiresAt)
}

func (w *Workers) probeURL(e orch.Engine) string {
	r := strings.NewReplacer("{port}", strconv.Itoa(e.Port), "{container}", orch.ContainerName(e.ID),
		"{engine_id}", e.ID, "{node}", e.Node)
	return strings.TrimRight(r.Replace(w.cfg.Engines.ProbeURLTemplate), "/") + "/health"
}

// errBootTimeout is returned by bootAndWait when the engine never became healthy.
var errBootTimeout = orch.Errorf(orch.CodeBootTimeout, "engine did not become healthy in time")

// bootAndWait ensures the container for spec, starts it and waits until its
// /health is ok or the boot timeout passes. Returns the boot duration. A
// host port the host refuses moves the engine to a free port first (its
// row changes; see ports.go).
func (w *Workers) bootAndWait(ctx context.Context, e orch.Engine, spec orch.EngineSpec) (time.Duration, error) {
	start := time.Now()
	if err := w.backend.Ensure(ctx, spec); err != nil {
		if errors.Is(err, orch.ErrImageUnavailable) {
			return 0, &orch.Error{Code: orch.CodeBackendFailed, Err: err,
				Message: fmt.Sprintf("image %s is not available on node %s (not present, and it could not be pulled)", spec.Image, w.cfg.Node)}
		}
		return 0, backendErr("create engine", err)
	}
	e, _, err := w.startMovingPort(ctx, e, spec) // ports.go: a refused host port moves the engine
	if err != nil {
		return 0, err
	}
	if err := w.waitHealthy(ctx, e, start.Add(w.cfg.Engines.BootTimeout)); err != nil {
		return time.Since(start), err
	}
	return time.Since(start), nil
}

// waitHealthy polls the engine's /health until it is ok or deadline.
func (w *Workers) waitHealthy(ctx context.Context, e orch.Engine, deadline time.Time) error {
	url := w.probeURL(e)
	delay := 10 * time.Millisecond
	lastLook, restartPause := time.Now(), 500*time.Millisecond
	for {
		pctx, cancel := context.WithTimeout(ctx, min(w.cfg.Engines.ProbeTimeout, time.Until(deadline)+time.Millisecond))
		err := Probe(pctx, w.http, url)
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
			if info, ierr := w.backend.Inspect(ctx, e.ID); ierr == nil && info.State == orch.RuntimeExited {
				w.log.Warn("engine exited while booting; starting it again", "engine_id", e.ID, "exit_code", info.ExitCode)
				if err := w.backend.Start(ctx, e.ID); err != nil {
					return backendErr("restart engine while booting", err)
				}
				restartPause = min(2*restartPause, 4*time.Second)
			}
		}
		if time.Now().Add(delay).After(deadline) {
			return errBootTimeout
		}
		time.Sleep(delay)
		delay = min(delay*2, 250*time.Millisecond)
	}
}

func backendErr(what string, err error) error {
	return &orch.Error{Code: orch.CodeBackendFailed, Message: what + " failed", Err: err}
}

// observeJob times every job this process works, by kind and outcome, and
// lists it in the liveness heartbeat while it runs.
func (w *Workers) observeJob(ctx context.Context, job *rivertype.JobRow, doInner func(context.Context) error) error {
	start := time.Now()
	w.session.started(job.ID)
	err := doInner(ctx)
	w.session.finished(job.ID)
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
	w.cfg.Metrics.ObserveJob(job.Kind, outcome, time.Since(start))
	return err
}

// logJob writes the one log line per job.
func (w *Workers) logJob(kind string, engineID string, attempt int, start time.Time, outcome string, err error) {
	attrs := []any{"job_kind", kind, "engine_id", engineID, "attempt", attempt,
		"duration_ms", time.Since(start).Milliseconds(), "outcome", outcome}
	if err != nil {
		attrs = append(attrs, "error", err.Error())
		w.log.Warn("job", attrs...)
		return
	}
	w.log.Info("job", attrs...)
}

func inTx(ctx context.Context, pool *pgxpool.Pool, fn func(tx pgx.Tx) error) error {
	if err := pgx.BeginFunc(ctx, pool, fn); err != nil {
		return fmt.Errorf("transaction: %w", err)
	}
	return nil
}
