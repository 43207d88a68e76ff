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

func newFleetState(cfg Config) fleetState {
	return fleetState{probes: make(chan struct{}, cfg.ProbeConcurrency)}
}

// fleetDefaults fills the zero fleet settings with SPEC §6/§7 defaults.
// Zero restart settings keep their meaning (no delay, no cap, no
// auto-restart), so cmd passes them explicitly.
func fleetDefaults(cfg Config) Config {
	if cfg.HealthInterval <= 0 {
		cfg.HealthInterval = 30 * time.Second
	}
	if cfg.HealthMaxFailures <= 0 {
		cfg.HealthMaxFailures = 3
	}
	if cfg.HealthBatchSize <= 0 {
		cfg.HealthBatchSize = 100
	}
	if cfg.ProbeConcurrency <= 0 {
		cfg.ProbeConcurrency = 50
	}
	if cfg.HealthAuditEvery <= 0 {
		cfg.HealthAuditEvery = time.Hour
	}
	if cfg.SleepMode == "" {
		cfg.SleepMode = SleepMark
	}
	return cfg
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
