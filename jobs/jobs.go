// Package jobs holds the River job argument types. Kinds are permanent wire
// names: a job enqueued by one version is worked by the next, so never
// rename a kind or remove a field.
package jobs

import (
	"regexp"
	"strings"

	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"
)

// NodeQueue is the River queue whose workers run engines on node. Lifecycle
// jobs go there so a later multi-host setup routes each to its host.
func NodeQueue(node string) string {
	return "node_" + queueSafe.ReplaceAllString(strings.ToLower(node), "_")
}

// QueueFleet serves fleet-wide jobs (sweep fan-out, exports).
const QueueFleet = "fleet"

var queueSafe = regexp.MustCompile(`[^a-z0-9]+`)

// inFlight are the states in which a job counts as "in flight" for
// uniqueness: completed, cancelled and discarded jobs do not block a new
// one (River's default ByState includes completed, which would block a
// second operation of the same kind for 24 h).
var inFlight = []rivertype.JobState{
	rivertype.JobStateAvailable, rivertype.JobStatePending, rivertype.JobStateRunning,
	rivertype.JobStateRetryable, rivertype.JobStateScheduled,
}

// uniqueInFlight makes at most one in-flight job of a kind with the same
// unique arguments (the fields tagged river:"unique"): one per operation
// for the lifecycle jobs, one per engine for runtime events.
func uniqueInFlight() river.UniqueOpts {
	return river.UniqueOpts{ByArgs: true, ByState: inFlight}
}
