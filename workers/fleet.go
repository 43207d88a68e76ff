package workers

import "github.com/riverqueue/river"

// registerFleet adds the fleet-wide workers (health sweeps, auto-restart,
// idle sweeps, reconcile).
func (w *Workers) registerFleet(ws *river.Workers) {}
