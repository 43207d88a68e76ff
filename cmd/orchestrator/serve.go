package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/api"
	"github.com/enginefleet/orchestrator/backend/docker"
	"github.com/enginefleet/orchestrator/backend/subprocess"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/metrics"
	"github.com/enginefleet/orchestrator/scheduler"
	"github.com/enginefleet/orchestrator/schema"
	"github.com/enginefleet/orchestrator/workers"
)

// serve runs the chosen roles until SIGTERM, then drains: the API stops
// accepting and finishes in-flight requests, River soft-stops (running jobs
// finish) and hard-stops at the deadline (cut-off jobs are retried
// elsewhere), and the process exits 0.
func serve(ctx context.Context, cfg Config, r roles, pool *pgxpool.Pool, log *slog.Logger) error {
	kr, err := keys.NewKeyring(cfg.MasterKey, cfg.MasterKeyPrev)
	if err != nil {
		return err
	}
	if err := untilReachable(ctx, log, "check keyring", func() error { return checkKeyring(ctx, pool, kr) }); err != nil {
		return err
	}

	// Prometheus metrics on their own listener (never the API's: its
	// GET /metrics is the products' JSON). Bound first, so a bad
	// ORCH_METRICS_ADDR stops the process before anything starts.
	m := metrics.New(metrics.Config{Source: schema.NewMetricsSource(pool), PortMin: cfg.PortMin, PortMax: cfg.PortMax,
		Node: cfg.Node, Version: version, Log: log})
	var metricsLn net.Listener
	if cfg.MetricsAddr != "" {
		if metricsLn, err = net.Listen("tcp", cfg.MetricsAddr); err != nil {
			return fmt.Errorf("metrics listener (ORCH_METRICS_ADDR=%s): %w", cfg.MetricsAddr, err)
		}
		defer metricsLn.Close()
	}

	var rc *river.Client[pgx.Tx]
	var w *workers.Workers
	if r.worker {
		var fleetID string
		if err := untilReachable(ctx, log, "read fleet id", func() (err error) {
			fleetID, err = schema.New(pool).FleetID(ctx)
			return err
		}); err != nil {
			return err
		}
		be, err := newBackend(ctx, cfg, fleetID, log)
		if err != nil {
			return err
		}
		wcfg := workerConfig(cfg)
		wcfg.Metrics = m
		w = workers.New(wcfg, pool, be, log)
		rc, err = river.NewClient(riverpgxv5.New(pool), w.RiverConfig(log))
		if err != nil {
			return fmt.Errorf("river client: %w", err)
		}
		// River stops when its Start context ends, cancelling running jobs:
		// give it one that outlives SIGTERM, and stop it ourselves (soft,
		// then hard) once the API has drained.
		if err := untilReachable(ctx, log, "start river", func() error { return rc.Start(context.WithoutCancel(ctx)) }); err != nil {
			return fmt.Errorf("start river: %w", err)
		}
		log.Info("worker started", "node", cfg.Node, "fleet", fleetID, "backend", be.Name())
	} else {
		// Insert-only client: the API enqueues, workers elsewhere run.
		rc, err = river.NewClient(riverpgxv5.New(pool), &river.Config{Logger: log})
		if err != nil {
			return fmt.Errorf("river client: %w", err)
		}
	}

	var wg sync.WaitGroup
	var httpSrv *http.Server
	var apiSrv *api.Server
	errc := make(chan error, 1)
	bg, cancelBG := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelBG()
	if metricsLn != nil {
		// Served until the very end, so a drain can be watched.
		log.Info("metrics listening", "addr", metricsLn.Addr().String())
		wg.Add(1)
		go func() { defer wg.Done(); m.Serve(bg, metricsLn) }() //nolint:errcheck
	}
	if r.api {
		acfg := apiConfig(cfg)
		acfg.Metrics = m
		apiSrv = api.New(acfg, pool, rc, kr, log)
		wg.Add(1)
		go func() { defer wg.Done(); apiSrv.Run(bg) }()
		httpSrv = apiSrv.HTTPServer(cfg.ListenAddr) // header, body and idle limits (api/httpserver.go)
		go func() {
			log.Info("api listening", "addr", cfg.ListenAddr)
			if err := httpSrv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("api listener: %w", err)
			}
		}()
	}

	// Fleet upkeep: crash detection on workers, schedules on schedulers.
	// Both stop first on shutdown (the scheduler hands leadership over).
	upkeep, stopUpkeep := context.WithCancel(bg)
	defer stopUpkeep()
	if r.worker {
		wg.Add(2)
		go func() { defer wg.Done(); w.WatchEvents(upkeep, rc) }()
		// Liveness lasts until River has stopped (bg ends after that):
		// while it runs, this process's jobs are its own.
		go func() { defer wg.Done(); w.RunLiveness(bg, rc) }()
	}
	if r.scheduler {
		sch, err := scheduler.New(scheduler.Config{}, pool, rc, log, scheduler.Fleet(fleetConfig(cfg))...)
		if err != nil {
			return err
		}
		wg.Add(1)
		m.SchedulerLeaderFunc(sch.Leader)
		go func() { defer wg.Done(); sch.Run(upkeep) }() //nolint:errcheck
	}

	select {
	case <-ctx.Done():
		log.Info("shutting down: draining", "timeout_s", cfg.ShutdownTimeout.Seconds())
	case err := <-errc:
		return err
	}
	stopUpkeep()
	drain, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	if httpSrv != nil {
		// A request waiting for a long boot could outlast the budget:
		// shortly before it ends, answer it (503 + the operation to
		// follow) rather than cut its connection.
		answer := time.AfterFunc(max(cfg.ShutdownTimeout-3*time.Second, cfg.ShutdownTimeout/2), apiSrv.StopWaiting)
		defer answer.Stop()
		if err := httpSrv.Shutdown(drain); err != nil {
			log.Warn("api drain incomplete", "error", err)
		}
	}
	if r.worker {
		soft, cancelSoft := context.WithTimeout(drain, cfg.ShutdownTimeout-5*time.Second)
		if err := rc.Stop(soft); err != nil {
			log.Warn("river soft stop incomplete; cancelling running jobs", "error", err)
			rc.StopAndCancel(drain) //nolint:errcheck
		}
		cancelSoft()
	}
	cancelBG()
	wg.Wait()
	log.Info("stopped")
	return nil
}

func apiConfig(cfg Config) api.Config {
	authFailures := float64(cfg.AuthFailuresPerSecond)
	if authFailures == 0 {
		authFailures = -1 // ORCH_AUTH_FAILURES_PER_S=0: no limit
	}
	return api.Config{AdminKey: cfg.AdminKey, DefaultImage: cfg.EngineImage, Images: &cfg.Images, PortMin: cfg.PortMin, PortMax: cfg.PortMax,
		Node: cfg.Node, BootTimeout: cfg.BootTimeout, URLTemplate: cfg.URLTemplate, KeyOverlap: cfg.KeyOverlap, Version: version,
		AuthFailuresPerSecond: authFailures, TrustedProxies: cfg.TrustedProxies}
}

func workerConfig(cfg Config) workers.Config {
	days := func(n int) time.Duration { return time.Duration(n) * 24 * time.Hour }
	return workers.Config{Node: cfg.Node, Concurrency: cfg.WorkerConcurrency,
		Engines: workers.EngineConfig{BootTimeout: cfg.BootTimeout, ProbeTimeout: cfg.HealthTimeout, ProbeURLTemplate: cfg.ProbeURLTemplate,
			EnvPassthrough: passthroughEnv(cfg.EnvPassthrough), KeyOverlap: cfg.KeyOverlap, PortMin: cfg.PortMin, PortMax: cfg.PortMax},
		Health: workers.HealthConfig{Interval: cfg.HealthInterval, MaxFailures: cfg.HealthMaxFailures,
			RestartBackoffBase: cfg.RestartBackoffBase, RestartBackoffMax: cfg.RestartBackoffMax, RestartMaxAttempts: cfg.RestartMaxAttempts},
		Idle:    workers.IdleConfig{After: cfg.IdleAfter, Mode: cfg.SleepMode},
		Backups: workers.BackupConfig{Dir: cfg.BackupDir, Retention: days(cfg.BackupRetentionDays)},
		Audit:   workers.AuditConfig{ExportDir: cfg.AuditExportDir, Retention: days(cfg.AuditRetentionDays)}}
}

// fleetConfig is the scheduler's view of the configuration: the sweeps'
// periods, this deployment's node(s), the backup and export schedules.
func fleetConfig(cfg Config) scheduler.FleetConfig {
	return scheduler.FleetConfig{Nodes: []string{cfg.Node}, HealthInterval: cfg.HealthInterval, IdleAfter: cfg.IdleAfter,
		BackupCron: cfg.BackupCron, AuditExportCron: cfg.AuditExportCron}
}

// newBackend builds the configured backend; fleetID (the database's) labels
// what the Docker backend creates.
func newBackend(ctx context.Context, cfg Config, fleetID string, log *slog.Logger) (orch.Backend, error) {
	switch cfg.Backend {
	case "subprocess":
		return subprocess.New(subprocess.Config{DataRoot: cfg.DataRootPath, EngineBinary: cfg.EngineBinary,
			CatalogMountPath: cfg.CatalogMountPath, Node: cfg.Node}, log)
	default:
		b, err := docker.New(docker.Config{Host: cfg.DockerHost, Network: cfg.Network, CatalogMountPath: cfg.CatalogMountPath,
			MemoryMB: cfg.MemoryMB, CPUs: cfg.CPUs, PidsLimit: cfg.Pids, User: cfg.EngineUser, Node: cfg.Node, Fleet: fleetID, HelperImage: cfg.EngineImage}, log)
		if err != nil {
			return nil, fmt.Errorf("docker backend (is the Docker socket reachable? DOCKER_HOST=%q): %w", cfg.DockerHost, err)
		}
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if err := b.Ping(pctx); err != nil {
			return nil, fmt.Errorf("docker backend: daemon not reachable (no Docker socket?): %w", err)
		}
		if err := b.Prepare(pctx); err != nil {
			return nil, fmt.Errorf("docker backend: %w", err)
		}
		return b, nil
	}
}

// checkKeyring refuses to start when the master keyring opens none of a
// sample of stored engine keys: starting anyway would silently lose every
// engine key of the fleet (SPEC §2).
func checkKeyring(ctx context.Context, pool *pgxpool.Pool, kr *keys.Keyring) error {
	toks, err := schema.New(pool).SampleEngineKeyTokens(ctx, 20)
	if err != nil {
		return err
	}
	n, bad := len(toks), 0
	for _, tok := range toks {
		if _, err := kr.Decrypt(tok); err != nil {
			bad++
		}
	}
	if n > 0 && bad > 0 {
		return fmt.Errorf("ORCH_MASTER_KEY cannot decrypt %d of %d sampled engine keys: refusing to start. "+
			"If you are rotating the master key, put the old key in ORCH_MASTER_KEY_PREVIOUS and run `orchestrator keys rotate-master`", bad, n)
	}
	return nil
}
