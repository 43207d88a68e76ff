// Package server is one orchestrator process: the roles it runs (api,
// worker, scheduler) wired on one database, started, and drained on the way
// out. cmd/orchestrator builds its configuration from the environment; the
// end-to-end tests build the very same process in-process, so what they
// test is what runs.
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/api"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/lifecycle"
	"github.com/enginefleet/orchestrator/metrics"
	"github.com/enginefleet/orchestrator/scheduler"
	"github.com/enginefleet/orchestrator/schema"
	"github.com/enginefleet/orchestrator/webhooks"
	"github.com/enginefleet/orchestrator/workers"
)

// Roles are what a process does.
type Roles struct {
	API       bool // the HTTP API (and the lifecycle core under it)
	Worker    bool // River workers driving the engine backend
	Scheduler bool // the leader-elected schedules
}

// String is the roles as --roles spells them.
func (r Roles) String() string {
	var out []string
	for _, x := range []struct {
		on   bool
		name string
	}{{r.API, "api"}, {r.Worker, "worker"}, {r.Scheduler, "scheduler"}} {
		if x.on {
			out = append(out, x.name)
		}
	}
	return strings.Join(out, ",")
}

// Config is one process's wiring. Each part is its component's own config.
type Config struct {
	Roles           Roles
	ListenAddr      string        // the API's address (Run)
	MetricsAddr     string        // Prometheus listener; "" = none
	ShutdownTimeout time.Duration // the drain budget on SIGTERM
	Version         string

	API       api.Config
	Core      lifecycle.Config
	Workers   workers.Config
	Fleet     scheduler.FleetConfig // the schedules
	Scheduler scheduler.Config      // the elector and tick polling
	Metrics   metrics.Config        // Log is filled here, and Source when nil
	Webhooks  webhooks.Config       // delivery (worker role) and the destination policy (api role too)

	// SkipRuntimeEvents leaves out crash detection from the backend's
	// event stream, for tests of the health sweep alone.
	SkipRuntimeEvents bool
}

// Process is a wired orchestrator process. The fields are its parts (nil
// when its role does not run them), for the tests and the CLI.
type Process struct {
	cfg  Config
	pool *pgxpool.Pool
	log  *slog.Logger

	Metrics   *metrics.Metrics
	River     *river.Client[pgx.Tx] // a worker's, or an insert-only one
	Core      *lifecycle.Core       // api role
	API       *api.Server           // api role
	Workers   *workers.Workers      // worker role
	Webhooks  *webhooks.Deliverer   // worker role: webhook delivery and its dispatcher
	Scheduler *scheduler.Scheduler  // scheduler role

	metricsLn  net.Listener
	httpSrv    *http.Server
	wg         sync.WaitGroup
	bg         context.Context // background work: ends after the workers stopped
	cancelBG   context.CancelFunc
	stopUpkeep context.CancelFunc // crash detection and schedules: stop first
	started    bool
}

// New wires the roles of cfg on pool; backend is the worker role's engine
// backend (nil without that role). It binds the metrics listener first, so
// a bad address stops the process before anything starts.
func New(cfg Config, pool *pgxpool.Pool, kr *keys.Keyring, backend orch.Backend, log *slog.Logger) (*Process, error) {
	p := &Process{cfg: cfg, pool: pool, log: log}
	mc := cfg.Metrics
	mc.Log = log
	if mc.Source == nil {
		mc.Source = schema.NewMetricsSource(pool)
	}
	if mc.Version == "" {
		mc.Version = cfg.Version
	}
	p.Metrics = metrics.New(mc)
	if cfg.MetricsAddr != "" {
		ln, err := net.Listen("tcp", cfg.MetricsAddr)
		if err != nil {
			return nil, fmt.Errorf("metrics listener (ORCH_METRICS_ADDR=%s): %w", cfg.MetricsAddr, err)
		}
		p.metricsLn = ln
	}
	var err error
	if cfg.Roles.Worker {
		if backend == nil {
			return nil, errors.New("the worker role needs an engine backend")
		}
		wc := cfg.Workers
		wc.Metrics = p.Metrics
		if wc.Backups.Keyring == nil {
			wc.Backups.Keyring = kr // backups through the engine's API authenticate with its key
		}
		p.Workers = workers.New(wc, pool, backend, log)
		rcfg := p.Workers.RiverConfig(log)
		// Webhooks have their own queue: a slow endpoint holds none of
		// the lifecycle queues' workers.
		p.Webhooks = webhooks.NewDeliverer(cfg.Webhooks, pool, kr, log)
		p.Webhooks.Register(rcfg)
		p.River, err = river.NewClient(riverpgxv5.New(pool), rcfg)
	} else {
		// Insert-only: the API and the scheduler enqueue, workers elsewhere run.
		p.River, err = river.NewClient(riverpgxv5.New(pool), &river.Config{Logger: log})
	}
	if err != nil {
		p.closeListeners()
		return nil, fmt.Errorf("river client: %w", err)
	}
	if cfg.Roles.API {
		cc := cfg.Core
		cc.Metrics = p.Metrics
		p.Core = lifecycle.New(cc, pool, p.River, kr, log)
		ac := cfg.API
		ac.Metrics, ac.Version = p.Metrics, cfg.Version
		ac.Webhooks = webhooks.NewEndpoints(cfg.Webhooks.Policy, pool, kr)
		p.API = api.New(ac, p.Core, pool, p.River, log)
	}
	if cfg.Roles.Scheduler {
		if p.Scheduler, err = scheduler.New(cfg.Scheduler, pool, p.River, log, scheduler.Fleet(cfg.Fleet)...); err != nil {
			p.closeListeners()
			return nil, err
		}
		p.Metrics.SchedulerLeaderFunc(p.Scheduler.Leader)
	}
	return p, nil
}

// Start starts every role's background work, but not the API's HTTP
// listener (Run serves it; the tests serve Handler themselves). River gets
// a context that outlives ctx: Stop stops it (soft, then hard) once the
// API has drained, so jobs finish instead of being cut at the first signal.
func (p *Process) Start(ctx context.Context) error {
	p.bg, p.cancelBG = context.WithCancel(context.WithoutCancel(ctx))
	upkeep, stop := context.WithCancel(p.bg)
	p.stopUpkeep = stop
	if p.metricsLn != nil {
		// Served until the very end, so a drain can be watched.
		p.log.Info("metrics listening", "addr", p.metricsLn.Addr().String())
		p.goRun(func() { p.Metrics.Serve(p.bg, p.metricsLn) }) //nolint:errcheck
	}
	if p.Workers != nil {
		if err := UntilReachable(ctx, p.log, "start river", func() error { return p.River.Start(p.bg) }); err != nil {
			return fmt.Errorf("start river: %w", err)
		}
		p.log.Info("worker started", "session", p.Workers.SessionID())
		if !p.cfg.SkipRuntimeEvents {
			p.goRun(func() { p.Workers.WatchEvents(upkeep, p.River) })
		}
		// Liveness lasts until River has stopped (bg ends after that):
		// while it runs, this process's jobs are its own.
		p.goRun(func() { p.Workers.RunLiveness(p.bg, p.River) })
		p.goRun(func() { p.Webhooks.Run(upkeep, p.River) })
	}
	if p.Core != nil {
		p.goRun(func() { p.Core.Run(p.bg) })
		p.goRun(func() { p.API.Run(p.bg) })
	}
	if p.Scheduler != nil {
		p.goRun(func() { p.Scheduler.Run(upkeep) }) //nolint:errcheck
	}
	p.started = true
	return nil
}

func (p *Process) goRun(f func()) {
	p.wg.Add(1)
	go func() { defer p.wg.Done(); f() }()
}

// MetricsAddr is where the Prometheus listener listens ("" = none).
func (p *Process) MetricsAddr() string {
	if p.metricsLn == nil {
		return ""
	}
	return p.metricsLn.Addr().String()
}

// Handler is the API's HTTP handler (nil without the api role).
func (p *Process) Handler() http.Handler {
	if p.API == nil {
		return nil
	}
	return p.API.Handler()
}

// Run starts the process, serves the API on ListenAddr until ctx ends (or
// the listener fails), then drains within ShutdownTimeout (Stop).
func (p *Process) Run(ctx context.Context) error {
	if err := p.Start(ctx); err != nil {
		p.Stop(context.Background()) //nolint:errcheck
		return err
	}
	errc := make(chan error, 1)
	if p.API != nil {
		p.httpSrv = p.API.HTTPServer(p.cfg.ListenAddr) // header, body and idle limits (api/httpserver.go)
		go func() {
			p.log.Info("api listening", "addr", p.cfg.ListenAddr)
			if err := p.httpSrv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("api listener: %w", err)
			}
		}()
	}
	select {
	case <-ctx.Done():
		p.log.Info("shutting down: draining", "timeout_s", p.cfg.ShutdownTimeout.Seconds())
	case err := <-errc:
		p.Stop(context.Background()) //nolint:errcheck
		return err
	}
	drain, cancel := context.WithTimeout(context.Background(), p.cfg.ShutdownTimeout)
	defer cancel()
	p.Stop(drain) //nolint:errcheck
	p.log.Info("stopped")
	return nil
}

// Stop drains within drain's deadline: crash detection and the schedules
// stop first (the scheduler hands leadership over), the API stops
// accepting and finishes in-flight requests (one still waiting for an
// operation near the end is answered 503 with the operation to follow),
// River soft-stops (running jobs finish) and hard-stops at the deadline
// (cut-off jobs are retried elsewhere), then the background work ends.
func (p *Process) Stop(drain context.Context) error {
	defer p.closeListeners()
	if !p.started {
		return nil
	}
	p.stopUpkeep()
	budget := p.cfg.ShutdownTimeout
	if d, ok := drain.Deadline(); ok {
		budget = time.Until(d)
	}
	if p.httpSrv != nil {
		// A request waiting for a long boot could outlast the budget:
		// shortly before it ends, answer it rather than cut its connection.
		answer := time.AfterFunc(max(budget-3*time.Second, budget/2), p.Core.StopWaiting)
		defer answer.Stop()
		if err := p.httpSrv.Shutdown(drain); err != nil {
			p.log.Warn("api drain incomplete", "error", err)
		}
	} else if p.Core != nil {
		p.Core.StopWaiting()
	}
	if p.Workers != nil {
		soft, cancelSoft := context.WithTimeout(drain, max(budget-5*time.Second, budget/2))
		if err := p.River.Stop(soft); err != nil {
			p.log.Warn("river soft stop incomplete; cancelling running jobs", "error", err)
			p.River.StopAndCancel(drain) //nolint:errcheck
		}
		cancelSoft()
	}
	p.cancelBG()
	p.wg.Wait()
	return nil
}

func (p *Process) closeListeners() {
	if p.metricsLn != nil {
		p.metricsLn.Close()
	}
}

// UntilReachable runs a start-up step again while Postgres cannot be
// reached (a restart or failover under a booting process), for up to a
// minute, so a process started at the wrong moment comes up instead of
// exiting.
func UntilReachable(ctx context.Context, log *slog.Logger, what string, step func() error) error {
	deadline := time.Now().Add(time.Minute)
	for {
		err := step()
		if err == nil || !schema.Unreachable(err) || time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		log.Warn("postgres not reachable during start-up; retrying", "step", what, "error", err)
		select {
		case <-ctx.Done():
			return err
		case <-time.After(time.Second):
		}
	}
}
