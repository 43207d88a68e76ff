// Package workers holds the River workers: the only code that drives a
// backend. Every job that works an engine runs on one skeleton (runner.go):
// it takes a lease on the engine row (so jobs never work one engine at
// once, on any replica), marks its operation running, does its idempotent
// backend work, then commits the state change, the audit row and the
// operation's outcome in one transaction, fenced by the lease, which also
// notifies the API requests waiting on it.
//
// What lives where:
//
//   - workers.go: Workers, the assembly of one worker process (New,
//     Register, RiverConfig, RunLiveness, WatchEvents), and Config, one
//     section per concept;
//   - runner.go: runner, what every job shares (pool, backend, metrics,
//     the probe client, the liveness session), the run/commit skeleton,
//     booting, probing and the engine's spec (EngineConfig); ports.go: an
//     engine moved off a host port the host refuses;
//   - lifecycle.go: provision, start/wake, stop/sleep, restart, rotate-key,
//     upgrade, destroy;
//   - health.go, restart.go, events.go: Health, the health sweeps,
//     auto-restart, crash checks of the backend's runtime events
//     (HealthConfig);
//   - idle.go: Idle, idle sleep (IdleConfig);
//   - backup.go, restore.go: Backups, brain backups (on the skeleton,
//     beside the engine's operation), retention, restore (BackupConfig);
//   - audit_export.go: AuditExports, audit exports and purge (AuditConfig);
//   - reconcile.go, isolation.go, abandoned.go: Reconciler, drift repair,
//     moves to the isolated network, the abandoned-operation sweep
//     (ReconcileConfig);
//   - liveness.go: this process's liveness session and the rescuer of the
//     jobs of dead workers;
//   - probe.go, public.go: the /health probe and the public words of
//     errors in audit rows.
//
// Concepts depend on each other through small explicit hooks set by New
// (the restart job calls Health's autoRestart, the operation sweep its
// nextAutoRestart), never through the assembly.
package workers
