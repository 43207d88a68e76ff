package jobs

import (
	"time"

	"github.com/riverqueue/river"
)

// RolloutDrive works one fleet rollout: each run settles the engines whose
// upgrade ended, applies the health gate, starts the next upgrades (or
// rollbacks) within the rollout's concurrency, moves to the next wave
// after its bake time, and snoozes until the next tick. Everything it
// knows is in the rollout's rows, so any attempt on any worker carries on
// where the last one stopped; the scheduler re-enqueues the job of an
// active rollout that has none (uniqueness keeps it one in flight).
type RolloutDrive struct {
	RolloutID string `json:"rollout_id" river:"unique"`
}

// Kind is the permanent wire name.
func (RolloutDrive) Kind() string { return "rollout_drive" }

// RolloutTick is how long a rollout's driver snoozes between ticks.
const RolloutTick = time.Second

// InsertOpts: on the fleet queue, one in flight per rollout, retried for
// long (a database outage must not end a rollout: its job comes back).
func (RolloutDrive) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: QueueFleet, MaxAttempts: 100, UniqueOpts: uniqueInFlight()}
}

// RolloutWatch makes sure every active rollout has its driver job: one
// that ran out of attempts or was removed by hand is enqueued again (the
// driver's uniqueness makes this a no-op for the others). The scheduler
// enqueues one a minute.
type RolloutWatch struct {
	Tick time.Time `json:"tick"`
}

// Kind is the permanent wire name.
func (RolloutWatch) Kind() string { return "rollout_watch" }

// InsertOpts: on the fleet queue, one try (the next minute watches again).
func (RolloutWatch) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: QueueFleet, MaxAttempts: 1}
}
