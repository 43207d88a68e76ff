package jobs

import "github.com/riverqueue/river"

// Lifecycle is the common shape of every engine lifecycle job: the engine
// and the operation that a waiting request or GET /operations/{id} follows.
//
// Uniqueness is per operation: one job per operation, ever in flight. It is
// deliberately not per engine: an operation is done (committed by its job)
// a moment before River marks that job completed, so per-engine uniqueness
// would silently swallow the job of the next operation requested in that
// window. One-at-a-time per engine is the engine row's lease instead.
type Lifecycle struct {
	EngineID    string `json:"engine_id" river:"unique"`
	OperationID string `json:"operation_id" river:"unique"`
	Node        string `json:"node"`
}

func (l Lifecycle) opts() river.InsertOpts {
	return river.InsertOpts{Queue: NodeQueue(l.Node), UniqueOpts: uniqueInFlight(), MaxAttempts: 5}
}

// Provision creates and boots a new engine.
type Provision struct{ Lifecycle }

// Kind is the permanent wire name.
func (Provision) Kind() string { return "engine_provision" }

// InsertOpts routes to the engine's node, one job in flight per operation.
func (a Provision) InsertOpts() river.InsertOpts { return a.opts() }

// Start starts a stopped, sleeping or failed engine (also wake).
type Start struct {
	Lifecycle
	Wake bool `json:"wake,omitempty"` // audit as wake rather than start
}

// Kind is the permanent wire name.
func (Start) Kind() string { return "engine_start" }

// InsertOpts routes to the engine's node, one job in flight per operation.
func (a Start) InsertOpts() river.InsertOpts { return a.opts() }

// Stop stops an engine, keeping its volume.
type Stop struct {
	Lifecycle
	Sleep bool `json:"sleep,omitempty"` // idle sleep in stop mode: ends in sleeping, not stopped
}

// Kind is the permanent wire name.
func (Stop) Kind() string { return "engine_stop" }

// InsertOpts routes to the engine's node, one job in flight per operation.
func (a Stop) InsertOpts() river.InsertOpts { return a.opts() }

// Restart stops and starts an engine (manual, or an auto-restart attempt).
type Restart struct {
	Lifecycle
	Auto    bool `json:"auto,omitempty"`    // an auto-restart attempt after health failure
	Attempt int  `json:"attempt,omitempty"` // 1-based auto-restart attempt
}

// Kind is the permanent wire name.
func (Restart) Kind() string { return "engine_restart" }

// InsertOpts routes to the engine's node, one job in flight per operation.
func (a Restart) InsertOpts() river.InsertOpts { return a.opts() }

// RotateKey recreates the container with the new key hash (and the
// previous one for the overlap window).
type RotateKey struct{ Lifecycle }

// Kind is the permanent wire name.
func (RotateKey) Kind() string { return "engine_rotate_key" }

// InsertOpts routes to the engine's node, one job in flight per operation.
func (a RotateKey) InsertOpts() river.InsertOpts { return a.opts() }

// Upgrade recreates the container on a new image, same volume.
type Upgrade struct {
	Lifecycle
	FromVersion string `json:"from_version"`
}

// Kind is the permanent wire name.
func (Upgrade) Kind() string { return "engine_upgrade" }

// InsertOpts routes to the engine's node, one job in flight per operation.
func (a Upgrade) InsertOpts() river.InsertOpts { return a.opts() }

// Destroy removes container, volume, port and row.
type Destroy struct{ Lifecycle }

// Kind is the permanent wire name.
func (Destroy) Kind() string { return "engine_destroy" }

// InsertOpts routes to the engine's node, one job in flight per operation.
func (a Destroy) InsertOpts() river.InsertOpts { return a.opts() }
