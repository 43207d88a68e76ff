package workers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/google/uuid"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/schema"
)

// secretCause is what a backend's errors carry deep in their chain: the
// kind of detail that is the operators', never the products'.
const secretCause = "open /var/lib/docker/volumes/engine-data-x/_data/brain.sqlite: permission denied"

// failingBackend fails CopyDataOut and CopyDataIn (each while its counter
// is above zero; -1 = always) with an error chain holding secretCause.
type failingBackend struct {
	orch.Backend
	outFails, inFails atomic.Int64
}

func failing(n *atomic.Int64) bool {
	switch v := n.Load(); {
	case v < 0:
		return true
	case v > 0:
		n.Add(-1)
		return true
	}
	return false
}

func (b *failingBackend) CopyDataOut(ctx context.Context, id string, w io.Writer) error {
	if failing(&b.outFails) {
		return fmt.Errorf("copy data out: %w", errors.New(secretCause))
	}
	return b.Backend.CopyDataOut(ctx, id, w)
}

func (b *failingBackend) CopyDataIn(ctx context.Context, id, image string, r io.Reader) error {
	if failing(&b.inFails) {
		return fmt.Errorf("copy data in: copy to container: %w", errors.New(secretCause))
	}
	return b.Backend.CopyDataIn(ctx, id, image, r)
}

// Audit rows are the products': the rows of backups (taken, failed,
// pruned) and restores (failed and rolled back, failed and not even
// rolled back) say what happened in stable words, with no filesystem path
// and no error chain.
func TestAuditMetadataHasNoInternals(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	r := newRig(t, 5)
	fb := &failingBackend{Backend: r.sb}
	r.w.r.backend = fb
	bw := &backupWorker{bk: r.w.Backups}
	backup := func(attempt, max int) string {
		id := uuid.NewString()
		require.NoError(t, bw.Work(ctx, &river.Job[jobs.Backup]{JobRow: &rivertype.JobRow{ID: 700 + int64(attempt), Attempt: attempt, MaxAttempts: max, Kind: "engine_backup"},
			Args: jobs.Backup{EngineID: r.e.ID, Node: r.e.Node, BackupID: id}}))
		return id
	}

	// A good backup, and one whose copy fails (its last attempt).
	good := backup(1, 1)
	_, err := r.q.BackupByID(ctx, good)
	require.NoError(t, err)
	fb.outFails.Store(1)
	backup(1, 1)

	// A restore whose copy-in fails once: rolled back.
	var jobID int64 = 800
	restore := func() orch.Operation {
		op := orch.Operation{ID: uuid.NewString(), ProductID: r.p.ID, EngineID: r.e.ID, UserID: r.e.UserID, Kind: orch.OpRestore, Actor: "acme"}
		require.NoError(t, r.q.InsertOperation(ctx, op, schema.OpPayload{BackupID: good}, jobID))
		e, err := r.q.EngineByID(ctx, r.e.ID)
		require.NoError(t, err)
		_, err = r.q.SetEngineState(ctx, e, schema.EngineChange{Status: orch.StateRunning, OperationID: &op.ID})
		require.NoError(t, err)
		jobID++
		rw := &restoreWorker{bk: r.w.Backups}
		require.NoError(t, rw.Work(ctx, &river.Job[jobs.Restore]{JobRow: &rivertype.JobRow{ID: jobID, Attempt: 5, MaxAttempts: 5, Kind: "engine_restore"},
			Args: jobs.Restore{Lifecycle: jobs.Lifecycle{EngineID: r.e.ID, OperationID: op.ID, Node: r.e.Node}}}))
		got, _, err := r.q.OperationByID(ctx, op.ID)
		require.NoError(t, err)
		return got
	}
	fb.inFails.Store(1)
	op := restore()
	require.Equal(t, orch.OpFailed, op.Status)
	// And one whose rollback fails too: the safety copy is kept.
	fb.inFails.Store(-1)
	op = restore()
	require.Equal(t, orch.OpFailed, op.Status)

	rows, err := r.pool.Query(ctx, `SELECT action, metadata FROM audit_log WHERE engine_id = $1 ORDER BY id`, r.e.ID)
	require.NoError(t, err)
	defer rows.Close()
	seen := map[string]int{}
	for rows.Next() {
		var action string
		var raw []byte
		require.NoError(t, rows.Scan(&action, &raw))
		var meta map[string]any
		require.NoError(t, json.Unmarshal(raw, &meta))
		switch {
		case action == "backup" && meta["error"] != nil:
			seen["backup failed"]++
		case action == "backup":
			seen["backup"]++
		case action == "restore" && meta["safety_copy_kept"] == true:
			seen["rollback failed"]++
			require.Equal(t, false, meta["rolled_back"])
			require.Equal(t, string(orch.CodeBackendFailed), meta["rollback_error_code"])
		case action == "restore":
			seen["rolled back"]++
			require.Equal(t, true, meta["rolled_back"])
		}
		for k, v := range meta {
			s, ok := v.(string)
			if !ok {
				continue
			}
			require.NotContains(t, s, r.dir, "%s %s: a path of ORCH_BACKUP_DIR", action, k)
			require.NotContains(t, s, ".tar", "%s %s: a file name", action, k)
			require.False(t, strings.HasPrefix(s, "/"), "%s %s = %q: a path", action, k, s)
			require.NotContains(t, s, "permission denied", "%s %s = %q: an error's cause", action, k, s)
			require.NotContains(t, s, "copy to container", "%s %s = %q: an error chain", action, k, s)
			require.NotContains(t, s, "BACKEND_FAILED:", "%s %s = %q: an error's Error(), not its message", action, k, s)
		}
	}
	require.NoError(t, rows.Err())
	require.Equal(t, map[string]int{"backup": 1, "backup failed": 1, "rolled back": 1, "rollback failed": 1}, seen)
}
