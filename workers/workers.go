package workers

import (
	"context"
	"log/slog"
	"sync"
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
	Rollouts  RolloutConfig   // fleet rollouts' driver (rollout.go)
}

// Workers is the assembly of one worker process: the concept parts on
// one shared runner, their River workers and configuration, and the
// process's background loops (liveness, crash watching).
type Workers struct {
	Health    *Health       // health sweeps, crash checks, auto-restart
	Idle      *Idle         // idle sleep
	Backups   *Backups      // brain backups, their retention, restores
	Audit     *AuditExports // audit exports and their purge
	Reconcile *Reconciler   // drift repair, the operation sweep
	Rollouts  *Rollouts     // fleet rollouts

	cfg       Config
	r         *runner
	lifecycle *lifecycleJobs
	liveness  *liveness
}

// New builds the workers of one process on backend.
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
	r := newRunner(cfg.Node, cfg.Engines, cfg.Metrics, pool, backend, log)
	health := newHealth(r, cfg.Health)
	return &Workers{
		Health:    health,
		Idle:      &Idle{runner: r, cfg: cfg.Idle},
		Backups:   &Backups{runner: r, cfg: cfg.Backups, sleepingRuns: cfg.Idle.sleepingRuns()},
		Audit:     &AuditExports{runner: r, cfg: cfg.Audit},
		Reconcile: &Reconciler{runner: r, cfg: cfg.Reconcile, sleepingRuns: cfg.Idle.sleepingRuns(), nextAutoRestart: health.nextAutoRestart},
		Rollouts:  &Rollouts{runner: r, cfg: cfg.Rollouts},
		cfg:       cfg,
		r:         r,
		lifecycle: &lifecycleJobs{runner: r, autoRestart: health.autoRestart},
		liveness:  &liveness{runner: r},
	}
}

// Register adds every worker to ws.
func (w *Workers) Register(ws *river.Workers) {
	w.lifecycle.register(ws)
	w.Health.register(ws)
	w.Idle.register(ws)
	w.Backups.register(ws)
	w.Audit.register(ws)
	w.Reconcile.register(ws)
	w.Rollouts.register(ws)
}

// RiverConfig is the River client configuration of a worker process: its
// node's queue and the fleet queue, tuned for low pickup latency.
func (w *Workers) RiverConfig(log *slog.Logger) *river.Config {
	ws := river.NewWorkers()
	w.Register(ws)
	return &river.Config{
		ID:     w.r.session.id, // river_job.attempted_by names this process's liveness session
		Logger: log,
		Queues: map[string]river.QueueConfig{
			jobs.NodeQueue(w.cfg.Node):   {MaxWorkers: w.cfg.Concurrency},
			jobs.QueueFleet:              {MaxWorkers: 10},
			river.QueueDefault:           {MaxWorkers: 10},
			jobs.BackupQueue(w.cfg.Node): {MaxWorkers: w.cfg.Backups.Concurrency},
		},
		Workers:           ws,
		Middleware:        []rivertype.Middleware{river.WorkerMiddlewareFunc(w.r.observeJob)},
		FetchCooldown:     2 * time.Millisecond,
		FetchPollInterval: 200 * time.Millisecond,
		JobTimeout:        w.r.jobTimeout(),
		// A job whose worker process died is re-queued within seconds by
		// the liveness rescuer (liveness.go); River's own rescue is the
		// last resort for a live process stuck past every job's timeout
		// (restore's is the longest) and its lease's slack.
		RescueStuckJobsAfter: w.Backups.restoreTimeout() + time.Minute,
	}
}

// SessionID is this worker process's liveness session (and River client) id.
func (w *Workers) SessionID() string { return w.r.session.id }

// RunLiveness holds this process's liveness session, rescues the jobs of
// dead workers and ends abandoned operations (abandoned.go), until ctx
// ends; then it deletes the session (a clean exit). Start it with the
// River client and stop it after River has stopped: while it runs, this
// process counts as alive.
func (w *Workers) RunLiveness(ctx context.Context, rc *river.Client[pgx.Tx]) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); w.Reconcile.sweepOperationsLoop(ctx, rc) }()
	w.liveness.run(ctx)
	wg.Wait()
	w.liveness.end()
}

// WatchEvents runs the crash watcher (events.go) until ctx ends. rc
// enqueues the checks and the catch-up jobs.
func (w *Workers) WatchEvents(ctx context.Context, rc *river.Client[pgx.Tx]) {
	w.Health.watchEvents(ctx, rc)
}
