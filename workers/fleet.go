package workers

import (
	"time"

	"github.com/riverqueue/river"
)

// Fleet upkeep (SPEC §6, §7): the scheduler enqueues health and idle
// sweeps; a health sweep fans out into batches on the engines' node
// queues; failures past the threshold make an engine failed and schedule
// an auto-restart (an engine_restart job with Auto set, as a "system"
// operation); crashes reported by the backend's event stream are checked
// at once (events.go). Files: health.go, restart.go, idle.go, events.go.

// fleetState is the per-process state of the fleet workers.
type fleetState struct {
	probes chan struct{} // at most ProbeConcurrency probes at once in this process
}

func newFleetState(cfg HealthConfig) fleetState {
	return fleetState{probes: make(chan struct{}, cfg.ProbeConcurrency)}
}

// HealthConfig configures health sweeps and auto-restart (SPEC §6).
type HealthConfig struct {
	Interval           time.Duration // sweep period (30 s); paces the sampled health_check rows
	MaxFailures        int           // consecutive failed probes before failed (3)
	BatchSize          int           // engines per health_sweep_batch job (100)
	ProbeConcurrency   int           // probes at once per worker process (50)
	AuditEvery         time.Duration // one sampled health_check row per engine per this (1 h)
	RestartBackoffBase time.Duration // first auto-restart delay; doubles per attempt (0 = at once)
	RestartBackoffMax  time.Duration // backoff cap (0 = no cap)
	RestartMaxAttempts int           // auto-restart attempts before giving up (0 = no auto-restart)
}

// withDefaults fills the zero health settings with SPEC §6 defaults.
// Zero restart settings keep their meaning (no delay, no cap, no
// auto-restart), so cmd passes them explicitly.
func (c HealthConfig) withDefaults() HealthConfig {
	if c.Interval <= 0 {
		c.Interval = 30 * time.Second
	}
	if c.MaxFailures <= 0 {
		c.MaxFailures = 3
	}
	if c.BatchSize <= 0 {
		c.BatchSize = 100
	}
	if c.ProbeConcurrency <= 0 {
		c.ProbeConcurrency = 50
	}
	if c.AuditEvery <= 0 {
		c.AuditEvery = time.Hour
	}
	return c
}

// IdleConfig configures idle sleep (SPEC §7).
type IdleConfig struct {
	After time.Duration // idle time before sleep (0 = never)
	Mode  string        // SleepMark (default) or SleepStop
}

func (c IdleConfig) withDefaults() IdleConfig {
	if c.Mode == "" {
		c.Mode = SleepMark
	}
	return c
}

// Sleep modes (ORCH_SLEEP_MODE).
const (
	SleepMark = "mark" // the container keeps running; only the row says sleeping
	SleepStop = "stop" // the container is stopped to free memory; wake starts it
)

// registerFleet adds the fleet-wide workers (health sweeps, crash checks,
// idle sweeps). Auto-restart is the engine_restart worker with Auto set.
func (w *Workers) registerFleet(ws *river.Workers) {
	river.AddWorker(ws, &healthSweepWorker{w: w})
	river.AddWorker(ws, &healthBatchWorker{w: w})
	river.AddWorker(ws, &runtimeEventWorker{w: w})
	river.AddWorker(ws, &idleSweepWorker{w: w})
}

// Backoff is the delay before auto-restart attempt n (1-based):
// min(base·2^(n-1), max), max 0 meaning no cap (SPEC §6).
func Backoff(base, maxDelay time.Duration, attempt int) time.Duration {
	if attempt < 1 {
		attempt = 1
	}
	d := base
	for i := 1; i < attempt; i++ {
		d *= 2
		if (maxDelay > 0 && d >= maxDelay) || d <= 0 || d > 24*time.Hour {
			break
		}
	}
	if maxDelay > 0 && d > maxDelay {
		d = maxDelay
	}
	return d
}
