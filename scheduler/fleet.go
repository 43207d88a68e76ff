package scheduler

import (
	"time"

	"github.com/riverqueue/river"

	"github.com/enginefleet/orchestrator/jobs"
)

// FleetConfig is what the orchestrator's own schedules need.
type FleetConfig struct {
	Nodes           []string      // nodes to reconcile (default: "local")
	HealthInterval  time.Duration // ORCH_HEALTH_CHECK_INTERVAL_S (30 s)
	IdleAfter       time.Duration // ORCH_IDLE_AFTER_S; 0 = no idle sweeps
	IdleEvery       time.Duration // idle sweep period (1 min)
	ReconcileEvery  time.Duration // reconcile period (5 min)
	BackupCron      string        // ORCH_BACKUP_CRON: nightly brain backups ("" = none)
	AuditExportCron string        // ORCH_AUDIT_EXPORT_CRON: audit exports ("" = none)
}

// Fleet is the orchestrator's schedule list: health sweeps, idle sweeps,
// reconciles, the rollouts' watch, nightly backups, audit exports. A new
// periodic job is one more line here.
func Fleet(c FleetConfig) []Schedule {
	if len(c.Nodes) == 0 {
		c.Nodes = []string{"local"}
	}
	if c.HealthInterval <= 0 {
		c.HealthInterval = 30 * time.Second
	}
	if c.IdleEvery <= 0 {
		c.IdleEvery = time.Minute
	}
	if c.ReconcileEvery <= 0 {
		c.ReconcileEvery = 5 * time.Minute
	}
	s := []Schedule{
		Every("health_sweep", c.HealthInterval, func(t time.Time) river.JobArgs { return jobs.HealthSweep{Tick: t} }),
		{Name: "reconcile", Every: c.ReconcileEvery, Jobs: func(time.Time) []river.JobArgs { return reconciles(c.Nodes) }},
		Every("rollout_watch", time.Minute, func(t time.Time) river.JobArgs { return jobs.RolloutWatch{Tick: t} }),
	}
	if c.IdleAfter > 0 {
		s = append(s, Every("idle_sweep", c.IdleEvery, func(t time.Time) river.JobArgs { return jobs.IdleSweep{Tick: t} }))
	}
	if c.BackupCron != "" {
		s = append(s, Cron("backup", c.BackupCron, func(t time.Time) river.JobArgs { return jobs.BackupAll{Tick: t} }))
	}
	if c.AuditExportCron != "" {
		s = append(s, Cron("audit_export", c.AuditExportCron, func(t time.Time) river.JobArgs { return jobs.AuditExport{Tick: t} }))
	}
	return s
}

// reconciles is one reconcile job per node (each runs on its node's queue).
func reconciles(nodes []string) []river.JobArgs {
	out := make([]river.JobArgs, len(nodes))
	for i, n := range nodes {
		out[i] = jobs.Reconcile{Node: n}
	}
	return out
}
