package jobs

import (
	"time"

	"github.com/riverqueue/river"
)

// HealthSweep is one health sweep of the fleet: it lists the
// running engines and fans them out as HealthSweepBatch jobs on their
// nodes' queues, so several workers share a large fleet. The scheduler
// enqueues one per ORCH_HEALTH_CHECK_INTERVAL_S, unique per period.
type HealthSweep struct {
	// Tick is the start of the scheduler period this sweep belongs to; it
	// also decides which engines get their sampled health_check audit row.
	Tick time.Time `json:"tick"`
	// Node limits the sweep to one node ("" = every node): a worker
	// catching up after its event stream broke sweeps its own node.
	Node string `json:"node,omitempty"`
	// Reason says why the sweep was enqueued out of schedule ("" = tick).
	Reason string `json:"reason,omitempty"`
}

// Kind is the permanent wire name.
func (HealthSweep) Kind() string { return "health_sweep" }

// InsertOpts: on the fleet queue, one try (the next period sweeps again).
func (HealthSweep) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: QueueFleet, MaxAttempts: 1}
}

// HealthSweepBatch probes a batch of one node's running engines and
// records the results with a few batched writes.
type HealthSweepBatch struct {
	Tick      time.Time `json:"tick"`
	Node      string    `json:"node"`
	EngineIDs []string  `json:"engine_ids"`
}

// Kind is the permanent wire name.
func (HealthSweepBatch) Kind() string { return "health_sweep_batch" }

// InsertOpts: on the engines' node queue (the workers that can reach
// them), one try (the next sweep probes again).
func (a HealthSweepBatch) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: NodeQueue(a.Node), MaxAttempts: 1}
}

// IdleSweep puts engines idle for ORCH_IDLE_AFTER_S to sleep.
type IdleSweep struct {
	Tick time.Time `json:"tick"`
}

// Kind is the permanent wire name.
func (IdleSweep) Kind() string { return "idle_sweep" }

// InsertOpts: on the fleet queue; a failed sweep is retried, once.
func (IdleSweep) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: QueueFleet, MaxAttempts: 2}
}

// RuntimeEvent is a crash (die, oom) the backend reported for an engine:
// a worker on its node checks it at once instead of waiting for the next
// sweep. At most one is in flight per engine (a die and an oom of one
// crash make one check).
type RuntimeEvent struct {
	EngineID string    `json:"engine_id" river:"unique"`
	Node     string    `json:"node"`
	Event    string    `json:"event"` // "die" or "oom"
	ExitCode int       `json:"exit_code"`
	At       time.Time `json:"at"`
}

// Kind is the permanent wire name.
func (RuntimeEvent) Kind() string { return "engine_runtime_event" }

// InsertOpts: on the engine's node queue, one in flight per engine.
func (a RuntimeEvent) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: NodeQueue(a.Node), MaxAttempts: 3, UniqueOpts: uniqueInFlight()}
}
