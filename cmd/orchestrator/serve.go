package main

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/api"
	"github.com/enginefleet/orchestrator/backend/docker"
	"github.com/enginefleet/orchestrator/backend/kubernetes"
	"github.com/enginefleet/orchestrator/backend/subprocess"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/lifecycle"
	"github.com/enginefleet/orchestrator/metrics"
	"github.com/enginefleet/orchestrator/scheduler"
	"github.com/enginefleet/orchestrator/schema"
	"github.com/enginefleet/orchestrator/server"
	"github.com/enginefleet/orchestrator/webhooks"
	"github.com/enginefleet/orchestrator/workers"
)

// serve runs the chosen roles until SIGTERM, then drains (server.Process):
// the API stops accepting and finishes in-flight requests, River
// soft-stops (running jobs finish) and hard-stops at the deadline (cut-off
// jobs are retried elsewhere), and the process exits 0.
func serve(ctx context.Context, cfg Config, r server.Roles, pool *pgxpool.Pool, log *slog.Logger) error {
	kr, err := keys.NewKeyring(cfg.MasterKey, cfg.MasterKeyPrev)
	if err != nil {
		return err
	}
	if err := server.UntilReachable(ctx, log, "check keyring", func() error { return checkKeyring(ctx, pool, kr) }); err != nil {
		return err
	}
	var be orch.Backend
	if r.Worker {
		var fleetID string
		if err := server.UntilReachable(ctx, log, "read fleet id", func() (err error) {
			fleetID, err = schema.New(pool).FleetID(ctx)
			return err
		}); err != nil {
			return err
		}
		if be, err = newBackend(ctx, cfg, fleetID, log); err != nil {
			return err
		}
		log.Info("engine backend ready", "node", cfg.Node, "fleet", fleetID, "backend", be.Name())
	}
	p, err := server.New(processConfig(cfg, r), pool, kr, be, log)
	if err != nil {
		return err
	}
	return p.Run(ctx)
}

// processConfig is the process's wiring from the environment.
func processConfig(cfg Config, r server.Roles) server.Config {
	return server.Config{Roles: r, ListenAddr: cfg.ListenAddr, MetricsAddr: cfg.MetricsAddr, ShutdownTimeout: cfg.ShutdownTimeout,
		Version: version, API: apiConfig(cfg), Core: coreConfig(cfg), Workers: workerConfig(cfg), Fleet: fleetConfig(cfg),
		Metrics: metrics.Config{PortMin: cfg.PortMin, PortMax: cfg.PortMax, Node: cfg.Node}, Webhooks: webhookConfig(cfg)}
}

// webhookConfig is where deliveries may go and how they are paced.
func webhookConfig(cfg Config) webhooks.Config {
	return webhooks.Config{Policy: webhooks.Policy{AllowNetworks: cfg.WebhookAllowNetworks, AllowHTTP: cfg.WebhookAllowHTTP},
		Concurrency: cfg.WebhookConcurrency, ProductConcurrency: cfg.WebhookProductConcurrency,
		Timeout: cfg.WebhookTimeout, RetryFor: cfg.WebhookRetryFor}
}

// coreConfig is the request side's: what engines are and where they go.
func coreConfig(cfg Config) lifecycle.Config {
	return lifecycle.Config{DefaultImage: cfg.EngineImage, Images: &cfg.Images, PortMin: cfg.PortMin, PortMax: cfg.PortMax,
		Node: cfg.Node, BootTimeout: cfg.BootTimeout, URLTemplate: cfg.URLTemplate,
		NoHostPorts: cfg.Backend == "kubernetes", Namespace: cfg.Kube.Namespace}
}

func apiConfig(cfg Config) api.Config {
	authFailures := float64(cfg.AuthFailuresPerSecond)
	if authFailures == 0 {
		authFailures = -1 // ORCH_AUTH_FAILURES_PER_S=0: no limit
	}
	return api.Config{AdminKey: cfg.AdminKey, PortMin: cfg.PortMin, PortMax: cfg.PortMax, Version: version,
		AuthFailuresPerSecond: authFailures, TrustedProxies: cfg.TrustedProxies}
}

func workerConfig(cfg Config) workers.Config {
	days := func(n int) time.Duration { return time.Duration(n) * 24 * time.Hour }
	portMin, portMax := cfg.PortMin, cfg.PortMax
	if cfg.Backend == "kubernetes" {
		portMin, portMax = 0, 0 // no host ports: an engine is never moved to another
	}
	return workers.Config{Node: cfg.Node, Concurrency: cfg.WorkerConcurrency,
		Engines: workers.EngineConfig{BootTimeout: cfg.BootTimeout, ProbeTimeout: cfg.HealthTimeout, ProbeURLTemplate: cfg.ProbeURLTemplate,
			Namespace: cfg.Kube.Namespace, EnvPassthrough: passthroughEnv(cfg.EnvPassthrough), KeyOverlap: cfg.KeyOverlap,
			PortMin: portMin, PortMax: portMax},
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
// what the Docker and kubernetes backends create.
func newBackend(ctx context.Context, cfg Config, fleetID string, log *slog.Logger) (orch.Backend, error) {
	switch cfg.Backend {
	case "kubernetes":
		kc := cfg.Kube
		kc.Fleet, kc.MemoryMB, kc.CPUs, kc.StartTimeout = fleetID, cfg.MemoryMB, cfg.CPUs, cfg.BootTimeout
		b, err := kubernetes.New(kc, log)
		if err != nil {
			return nil, fmt.Errorf("kubernetes backend (KUBECONFIG=%q, empty = in-cluster): %w", cfg.Kube.Kubeconfig, err)
		}
		pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if err := b.Ping(pctx); err != nil {
			b.Close() //nolint:errcheck
			return nil, fmt.Errorf("kubernetes backend: namespace %q: %w", kc.Namespace, err)
		}
		return b, nil
	case "subprocess":
		return subprocess.New(subprocess.Config{DataRoot: cfg.DataRootPath, EngineBinary: cfg.EngineBinary,
			CatalogMountPath: cfg.CatalogMountPath, Node: cfg.Node}, log)
	default:
		b, err := docker.New(docker.Config{Host: cfg.DockerHost, Network: cfg.Network, CatalogMountPath: cfg.CatalogMountPath,
			MemoryMB: cfg.MemoryMB, CPUs: cfg.CPUs, PidsLimit: cfg.Pids, User: cfg.EngineUser, Node: cfg.Node, Fleet: fleetID, HelperImage: cfg.EngineImage,
			DataRoot: cfg.DataRootPath}, log)
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
// engine key of the fleet.
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
