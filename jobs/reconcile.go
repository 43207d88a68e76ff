package jobs

import (
	"time"

	"github.com/riverqueue/river"
)

// Reconcile compares one node's labelled containers and volumes with the
// engine rows and repairs drift.
type Reconcile struct {
	Node string `json:"node" river:"unique"`
}

// Kind is the permanent wire name.
func (Reconcile) Kind() string { return "engine_reconcile" }

// InsertOpts: on the node's queue; one per node per minute.
func (a Reconcile) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: NodeQueue(a.Node), MaxAttempts: 3,
		UniqueOpts: river.UniqueOpts{ByArgs: true, ByPeriod: time.Minute, ByState: inFlight}}
}
