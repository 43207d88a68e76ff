package workers

import (
	"archive/tar"
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/uuid"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/schema"
)

// A worker that died in the middle of a restore (safety copy taken, volume
// half replaced, engine down) is followed by River's retry: it finds the
// safety copy and either finishes the restore or, when the backup is no
// longer good, puts the previous brain back. Never the half-restored one.
func TestRestoreResumedAfterCrash(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	r := newRig(t, 40)
	atBackup := r.export(t)
	backupID := uuid.NewString()
	f, err := r.w.Backups.WriteBackup(ctx, r.e, backupID)
	require.NoError(t, err)
	require.NoError(t, r.q.InsertBackup(ctx, schema.Backup{ID: backupID, EngineID: r.e.ID, ProductID: r.p.ID, UserID: r.e.UserID,
		Node: r.e.Node, Path: f.Path, SizeBytes: f.SizeBytes, SHA256: f.SHA256, EngineVersion: r.e.EngineVersion, Trigger: schema.BackupManual}))
	r.addMemories(t, 40, 10)
	previous := r.export(t)
	require.NotEqual(t, atBackup, previous)

	var jobID int64 = 900
	// crashMidRestore records a restore operation and leaves the engine as
	// a worker killed half-way through it would.
	crashMidRestore := func() orch.Operation {
		op := orch.Operation{ID: uuid.NewString(), ProductID: r.p.ID, EngineID: r.e.ID, UserID: r.e.UserID, Kind: orch.OpRestore, Actor: "acme"}
		require.NoError(t, r.q.InsertOperation(ctx, op, schema.OpPayload{BackupID: backupID}, jobID))
		e, err := r.q.EngineByID(ctx, r.e.ID)
		require.NoError(t, err)
		_, err = r.q.SetEngineState(ctx, e, schema.EngineChange{Status: orch.StateRunning, OperationID: &op.ID})
		require.NoError(t, err)
		require.NoError(t, r.w.Backups.safetyCopy(ctx, e, r.w.Backups.safetyPath(e, op)))
		var half bytes.Buffer
		tw := tar.NewWriter(&half)
		junk := []byte("half of a brain")
		require.NoError(t, tw.WriteHeader(&tar.Header{Name: "brain.sqlite", Mode: 0o600, Size: int64(len(junk)), Typeflag: tar.TypeReg}))
		tw.Write(junk) //nolint:errcheck
		tw.Close()     //nolint:errcheck
		require.NoError(t, r.sb.CopyDataIn(ctx, e.ID, e.EngineVersion, &half))
		return op
	}
	retry := func(op orch.Operation) orch.Operation {
		jobID++
		rw := &restoreWorker{bk: r.w.Backups}
		err := rw.Work(ctx, &river.Job[jobs.Restore]{JobRow: &rivertype.JobRow{ID: jobID, Attempt: 2, MaxAttempts: 5, Kind: "engine_restore"},
			Args: jobs.Restore{Lifecycle: jobs.Lifecycle{EngineID: r.e.ID, OperationID: op.ID, Node: r.e.Node}}})
		require.NoError(t, err)
		got, _, err := r.q.OperationByID(ctx, op.ID)
		require.NoError(t, err)
		_, err = os.Stat(r.w.Backups.safetyPath(r.e, op))
		require.True(t, os.IsNotExist(err), "the safety copy is gone once the operation has an outcome")
		return got
	}

	// The backup went bad meanwhile: the retry puts the previous brain back.
	b, err := os.ReadFile(filepath.Join(r.dir, f.Path))
	require.NoError(t, err)
	bad := bytes.Clone(b)
	bad[len(bad)/3] ^= 0xff
	require.NoError(t, os.WriteFile(filepath.Join(r.dir, f.Path), bad, 0o600))
	op := retry(crashMidRestore())
	require.Equal(t, orch.OpFailed, op.Status)
	require.Equal(t, orch.CodeBackupCorrupt, op.ErrorCode)
	require.Equal(t, previous, r.export(t), "the previous brain is back, running")
	var rolled bool
	require.NoError(t, r.pool.QueryRow(ctx, `SELECT (metadata->>'rolled_back')::bool FROM audit_log WHERE metadata->>'operation_id' = $1`, op.ID).Scan(&rolled))
	require.True(t, rolled)

	// The backup is good: the retry finishes the restore.
	require.NoError(t, os.WriteFile(filepath.Join(r.dir, f.Path), b, 0o600))
	op = retry(crashMidRestore())
	require.Equal(t, orch.OpSucceeded, op.Status, "%s: %s", op.ErrorCode, op.ErrorMessage)
	require.Equal(t, atBackup, r.export(t))
	e, err := r.q.EngineByID(ctx, r.e.ID)
	require.NoError(t, err)
	require.Equal(t, orch.StateRunning, e.Status)
}
