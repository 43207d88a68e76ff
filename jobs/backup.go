package jobs

import (
	"time"

	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"
)

// Backup takes one consistent copy of an engine's brain into
// ORCH_BACKUP_DIR, on its node's backup queue. Manual backups
// (POST /engines/{user_id}/backups) carry the operation a request follows
// (the API joins a second request to the backup in flight, under the
// engine row's lock); scheduled ones carry their UTC day and are unique
// per engine per day, completed ones included, so however often the
// schedule fires an engine gets one backup a day. BackupID is chosen by whoever
// enqueues, so a retried job records the same backup.
type Backup struct {
	EngineID    string `json:"engine_id" river:"unique"`
	Node        string `json:"node"`
	BackupID    string `json:"backup_id"`
	OperationID string `json:"operation_id,omitempty"`
	Day         string `json:"day,omitempty" river:"unique"` // scheduled: YYYY-MM-DD (UTC)
}

// Kind is the permanent wire name.
func (Backup) Kind() string { return "engine_backup" }

// InsertOpts routes to the engine's node's backup queue; see Backup for
// uniqueness.
func (a Backup) InsertOpts() river.InsertOpts {
	o := river.InsertOpts{Queue: BackupQueue(a.Node), MaxAttempts: 5}
	if a.Day != "" {
		// Completed ones included: a second fan-out the same day is a no-op.
		o.UniqueOpts = river.UniqueOpts{ByArgs: true, ByState: rivertype.UniqueOptsByStateDefault()}
	}
	return o
}

// BackupQueue is the River queue of a node's backups: its own queue, so a
// worker process runs only a few at once (compression is CPU work) and
// lifecycle jobs never wait behind a night of backups.
func BackupQueue(node string) string { return "backup_" + NodeQueue(node)[len("node_"):] }

// BackupDay is the day string of a scheduled backup at t.
func BackupDay(t time.Time) string { return t.UTC().Format(time.DateOnly) }

// BackupAll is the nightly backup tick (ORCH_BACKUP_CRON): it enqueues one
// Backup per engine on its node's queue, then applies the retention
// (ORCH_BACKUP_RETENTION_DAYS). Unique per tick (the scheduler's period).
type BackupAll struct {
	Tick time.Time `json:"tick"`
}

// Kind is the permanent wire name.
func (BackupAll) Kind() string { return "backup_all" }

// InsertOpts: on the fleet queue, retried a few times.
func (BackupAll) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: QueueFleet, MaxAttempts: 3}
}

// Restore puts a backup back into an engine: a lifecycle operation whose
// payload names the backup (schema.OpPayload.BackupID).
type Restore struct{ Lifecycle }

// Kind is the permanent wire name.
func (Restore) Kind() string { return "engine_restore" }

// InsertOpts routes to the engine's node. Not unique in River: the
// engine row (one operation in flight, under its lock) and the worker's
// lease already make restores one at a time, and River marks a finished
// job completed only a moment after its operation is done, so a unique
// key would drop a restore requested right after the previous one.
func (a Restore) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: NodeQueue(a.Node), MaxAttempts: 5}
}
