package workers

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivertest"
	"github.com/riverqueue/river/rivertype"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/metrics"
	"github.com/enginefleet/orchestrator/schema"
)

// The run/commit skeleton's edge cases, on River's test worker (the job
// really runs through River's executor: timeouts, retries, completion)
// against a fake backend and a real database.

// An attempt whose engine lease was taken over meanwhile (it was presumed
// dead and its job re-queued) commits nothing: its outcome is not
// written, the operation stays with the attempt that holds the engine,
// and River retries the job.
func TestLeaseLostCommitsNothing(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	r := newFakeRig(t, nil)
	e := r.engine(t, "zoe", orch.StateRunning)
	op := r.operation(t, e, orch.OpStop, schema.OpPayload{}, true)
	r.be.on("Stop", func(ctx context.Context, id string) { r.stealLease(ctx, t, id) })

	tw, tx := testWorker(t, r, &stopWorker{lifecycleWorker[jobs.Stop]{l: r.w.lifecycle}})
	res, err := tw.Work(ctx, t, tx, jobs.Stop{Lifecycle: jobs.Lifecycle{EngineID: e.ID, OperationID: op.ID, Node: e.Node}}, nil)
	require.ErrorIs(t, err, errLeaseLost)
	requireRetried(t, res)
	require.Equal(t, 1, r.be.called("Stop"), "the step ran")
	require.Equal(t, orch.OpRunning, r.op(t, op.ID).Status, "no outcome committed")
	require.Equal(t, orch.StateRunning, r.row(t, e.ID).Status, "the row keeps its state")
	require.Empty(t, r.audits(t, e.ID, orch.ActionStop))
}

// Backend trouble (BACKEND_FAILED) before the last attempt is retried: the
// operation stays running and nothing is committed; the retry succeeds.
func TestRetryableBackendErrorIsRetried(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	r := newFakeRig(t, nil)
	e := r.engine(t, "zoe", orch.StateStopped)
	op := r.operation(t, e, orch.OpStart, schema.OpPayload{}, true)
	r.be.failNext("Start", errTransient)

	tw, tx := testWorker(t, r, &startWorker{lifecycleWorker[jobs.Start]{l: r.w.lifecycle}})
	res, err := tw.Work(ctx, t, tx, jobs.Start{Lifecycle: jobs.Lifecycle{EngineID: e.ID, OperationID: op.ID, Node: e.Node}}, nil)
	require.Error(t, err)
	require.Equal(t, orch.CodeBackendFailed, orch.ErrorCode(err))
	requireRetried(t, res)
	require.Equal(t, orch.OpRunning, r.op(t, op.ID).Status, "the operation waits for the retry")
	require.Equal(t, orch.StateStopped, r.row(t, e.ID).Status)
	require.Empty(t, r.audits(t, e.ID, orch.ActionStart))

	res, err = tw.WorkJob(ctx, t, tx, res.Job) // River's retry
	require.NoError(t, err)
	require.Equal(t, rivertype.JobStateCompleted, res.Job.State)
	require.Equal(t, orch.OpSucceeded, r.op(t, op.ID).Status)
	require.Equal(t, orch.StateRunning, r.row(t, e.ID).Status)
	require.Equal(t, orch.RuntimeRunning, r.be.state(e.ID))
	require.Len(t, r.audits(t, e.ID, orch.ActionStart), 1)
}

// The last attempt's failure is the operation's outcome: failed with the
// backend's code, the engine failed, audited.
func TestLastAttemptFailureFailsTheOperation(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	r := newFakeRig(t, nil)
	e := r.engine(t, "zoe", orch.StateStopped)
	op := r.operation(t, e, orch.OpStart, schema.OpPayload{}, true)
	r.be.failNext("Start", errTransient)

	tw, tx := testWorker(t, r, &startWorker{lifecycleWorker[jobs.Start]{l: r.w.lifecycle}})
	res, err := tw.Work(ctx, t, tx, jobs.Start{Lifecycle: jobs.Lifecycle{EngineID: e.ID, OperationID: op.ID, Node: e.Node}},
		&river.InsertOpts{MaxAttempts: 1})
	require.NoError(t, err, "the outcome is committed: nothing for River to retry")
	require.Equal(t, rivertype.JobStateCompleted, res.Job.State)
	got := r.op(t, op.ID)
	require.Equal(t, orch.OpFailed, got.Status)
	require.Equal(t, orch.CodeBackendFailed, got.ErrorCode)
	row := r.row(t, e.ID)
	require.Equal(t, orch.StateFailed, row.Status)
	require.Equal(t, "start engine failed", row.LastError)
	audits := r.audits(t, e.ID, orch.ActionStart)
	require.Len(t, audits, 1)
	require.Equal(t, string(orch.CodeBackendFailed), audits[0]["error_code"])
	require.Equal(t, op.ID, audits[0]["operation_id"])
}

// An operation whose engine a later operation has taken over (the row
// points at the later one) fails with OPERATION_IN_PROGRESS and never
// touches the backend.
func TestSupersededOperationFails(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	r := newFakeRig(t, nil)
	e := r.engine(t, "zoe", orch.StateRunning)
	stop := r.operation(t, e, orch.OpStop, schema.OpPayload{}, true)
	destroy := r.operation(t, e, orch.OpDestroy, schema.OpPayload{}, true)

	tw, tx := testWorker(t, r, &stopWorker{lifecycleWorker[jobs.Stop]{l: r.w.lifecycle}})
	res, err := tw.Work(ctx, t, tx, jobs.Stop{Lifecycle: jobs.Lifecycle{EngineID: e.ID, OperationID: stop.ID, Node: e.Node}}, nil)
	require.NoError(t, err)
	require.Equal(t, rivertype.JobStateCompleted, res.Job.State)
	got := r.op(t, stop.ID)
	require.Equal(t, orch.OpFailed, got.Status)
	require.Equal(t, orch.CodeOperationInProgress, got.ErrorCode)
	require.Zero(t, r.be.called("Stop"))
	row := r.row(t, e.ID)
	require.Equal(t, orch.StateRunning, row.Status)
	require.Equal(t, destroy.ID, row.OperationID, "the later operation keeps the engine")
	require.Equal(t, orch.OpPending, r.op(t, destroy.ID).Status)
}

// A restore whose backup's brain does not boot puts the previous brain
// back and brings the engine back as it was: the operation fails with
// BOOT_TIMEOUT, audited rolled_back, and the safety copy is gone.
func TestRestoreRollsBackWhenTheBootFails(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	r := newFakeRig(t, func(c *Config) { c.Engines.BootTimeout = 300 * time.Millisecond })
	e := r.engine(t, "zoe", orch.StateRunning)

	// A backup of a brain that will not boot.
	r.be.setVolume(t, e.ID, brokenBrain)
	backupID := uuid.NewString()
	f, err := r.w.Backups.WriteBackup(ctx, e, backupID)
	require.NoError(t, err)
	require.NoError(t, r.q.InsertBackup(ctx, schema.Backup{ID: backupID, EngineID: e.ID, ProductID: e.ProductID, UserID: e.UserID,
		Node: e.Node, Path: f.Path, SizeBytes: f.SizeBytes, SHA256: f.SHA256, EngineVersion: e.EngineVersion, Trigger: schema.BackupManual}))
	previous := r.be.setVolume(t, e.ID, "the brain of today")
	op := r.operation(t, e, orch.OpRestore, schema.OpPayload{BackupID: backupID}, true)

	tw, tx := testWorker(t, r, &restoreWorker{bk: r.w.Backups})
	res, err := tw.Work(ctx, t, tx, jobs.Restore{Lifecycle: jobs.Lifecycle{EngineID: e.ID, OperationID: op.ID, Node: e.Node}}, nil)
	require.NoError(t, err)
	require.Equal(t, rivertype.JobStateCompleted, res.Job.State)
	got := r.op(t, op.ID)
	require.Equal(t, orch.OpFailed, got.Status)
	require.Equal(t, orch.CodeBootTimeout, got.ErrorCode)
	require.Equal(t, previous, r.be.volume(e.ID), "the previous brain is back")
	require.Equal(t, orch.RuntimeRunning, r.be.state(e.ID), "and running, as it was")
	require.Equal(t, orch.StateRunning, r.row(t, e.ID).Status)
	audits := r.audits(t, e.ID, orch.ActionRestore)
	require.Len(t, audits, 1)
	require.Equal(t, true, audits[0]["rolled_back"])
	require.Equal(t, string(orch.CodeBootTimeout), audits[0]["error_code"])
	_, err = os.Stat(r.w.Backups.safetyPath(e, op))
	require.True(t, os.IsNotExist(err), "the safety copy is removed once the operation has an outcome")
}

// A backup job runs beside the engine's operation slot (a pending start
// keeps it) and records its row, its audit row and its operation's
// outcome in one transaction.
func TestBackupRecordsRowAuditAndOutcomeInOneCommit(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	r := newFakeRig(t, nil)
	e := r.engine(t, "zoe", orch.StateRunning)
	other := r.operation(t, e, orch.OpRestart, schema.OpPayload{}, true)
	backupID := uuid.NewString()
	op := r.operation(t, e, orch.OpBackup, schema.OpPayload{BackupID: backupID}, false)

	tw, tx := testWorker(t, r, &backupWorker{bk: r.w.Backups})
	res, err := tw.Work(ctx, t, tx, jobs.Backup{EngineID: e.ID, Node: e.Node, BackupID: backupID, OperationID: op.ID}, nil)
	require.NoError(t, err)
	require.Equal(t, rivertype.JobStateCompleted, res.Job.State)
	require.Equal(t, orch.OpSucceeded, r.op(t, op.ID).Status)
	b, err := r.q.BackupByID(ctx, backupID)
	require.NoError(t, err)
	require.Equal(t, op.ID, b.OperationID)
	sum, n, err := hashFile(filepath.Join(r.dir, b.Path))
	require.NoError(t, err)
	require.Equal(t, b.SHA256, sum)
	require.Equal(t, b.SizeBytes, n)
	audits := r.audits(t, e.ID, orch.ActionBackup)
	require.Len(t, audits, 1)
	require.Equal(t, backupID, audits[0]["backup_id"])
	require.Equal(t, op.ID, audits[0]["operation_id"])
	require.Equal(t, schema.BackupManual, audits[0]["trigger"])

	// One transaction wrote all three rows.
	var backupTx, auditTx, opTx string
	require.NoError(t, r.pool.QueryRow(ctx, `SELECT xmin::text FROM backups WHERE id = $1`, backupID).Scan(&backupTx))
	require.NoError(t, r.pool.QueryRow(ctx, `SELECT xmin::text FROM audit_log WHERE engine_id = $1 AND action = 'backup'`, e.ID).Scan(&auditTx))
	require.NoError(t, r.pool.QueryRow(ctx, `SELECT xmin::text FROM operations WHERE id = $1`, op.ID).Scan(&opTx))
	require.Equal(t, backupTx, auditTx)
	require.Equal(t, backupTx, opTx)

	row := r.row(t, e.ID)
	require.Equal(t, other.ID, row.OperationID, "the backup never took the engine's operation slot")
	require.Equal(t, orch.OpPending, r.op(t, other.ID).Status)
}

// A backup attempt that lost its engine's lease records nothing and
// leaves no file: River retries it.
func TestBackupLeaseLostLeavesNothing(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	r := newFakeRig(t, nil)
	e := r.engine(t, "zoe", orch.StateRunning)
	backupID := uuid.NewString()
	op := r.operation(t, e, orch.OpBackup, schema.OpPayload{BackupID: backupID}, false)
	r.be.on("Unpause", func(ctx context.Context, id string) { r.stealLease(ctx, t, id) })

	tw, tx := testWorker(t, r, &backupWorker{bk: r.w.Backups})
	res, err := tw.Work(ctx, t, tx, jobs.Backup{EngineID: e.ID, Node: e.Node, BackupID: backupID, OperationID: op.ID}, nil)
	require.ErrorIs(t, err, errLeaseLost)
	requireRetried(t, res)
	_, err = r.q.BackupByID(ctx, backupID)
	require.True(t, orch.IsCode(err, orch.CodeBackupNotFound))
	require.Empty(t, r.audits(t, e.ID, orch.ActionBackup))
	require.Equal(t, orch.OpRunning, r.op(t, op.ID).Status)
	require.Empty(t, backupFiles(t, r.dir), "the unrecorded file is removed")
}

// A failed backup attempt is audited (will_retry) and retried with its
// operation running; the last failure fails the operation, audited in the
// same transaction.
func TestBackupFailuresAuditedAndRetried(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	r := newFakeRig(t, nil)
	e := r.engine(t, "zoe", orch.StateRunning)
	backupID := uuid.NewString()
	op := r.operation(t, e, orch.OpBackup, schema.OpPayload{BackupID: backupID}, false)
	r.be.failNext("CopyDataOut", errTransient, errTransient)

	tw, tx := testWorker(t, r, &backupWorker{bk: r.w.Backups})
	res, err := tw.Work(ctx, t, tx, jobs.Backup{EngineID: e.ID, Node: e.Node, BackupID: backupID, OperationID: op.ID},
		&river.InsertOpts{MaxAttempts: 2})
	require.Error(t, err)
	requireRetried(t, res)
	require.Equal(t, orch.OpRunning, r.op(t, op.ID).Status)
	audits := r.audits(t, e.ID, orch.ActionBackup)
	require.Len(t, audits, 1)
	require.Equal(t, true, audits[0]["will_retry"])
	require.Equal(t, string(orch.CodeBackendFailed), audits[0]["error_code"])

	res, err = tw.WorkJob(ctx, t, tx, res.Job)
	require.NoError(t, err)
	require.Equal(t, rivertype.JobStateCompleted, res.Job.State)
	got := r.op(t, op.ID)
	require.Equal(t, orch.OpFailed, got.Status)
	require.Equal(t, orch.CodeBackendFailed, got.ErrorCode)
	audits = r.audits(t, e.ID, orch.ActionBackup)
	require.Len(t, audits, 2)
	require.Equal(t, false, audits[1]["will_retry"])
	var auditTx, opTx string
	require.NoError(t, r.pool.QueryRow(ctx, `SELECT xmin::text FROM audit_log WHERE engine_id = $1 AND action = 'backup'
		AND (metadata->>'will_retry')::bool = false`, e.ID).Scan(&auditTx))
	require.NoError(t, r.pool.QueryRow(ctx, `SELECT xmin::text FROM operations WHERE id = $1`, op.ID).Scan(&opTx))
	require.Equal(t, auditTx, opTx, "the last failure and the operation's outcome commit together")
	require.Equal(t, orch.RuntimeRunning, r.be.state(e.ID))
	require.Empty(t, backupFiles(t, r.dir))
}

// A scheduled backup whose day got recorded by another job while it was
// copying (two workers on one tick) completes without a second row, and
// removes its own file.
func TestScheduledBackupOfARecordedDay(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	r := newFakeRig(t, nil)
	e := r.engine(t, "zoe", orch.StateRunning)
	day := jobs.BackupDay(time.Now())
	d, err := time.Parse(time.DateOnly, day)
	require.NoError(t, err)
	winner := uuid.NewString()
	r.be.on("CopyDataOut", func(ctx context.Context, id string) {
		err := r.q.InsertBackup(context.WithoutCancel(ctx), schema.Backup{ID: winner, EngineID: e.ID, ProductID: e.ProductID,
			UserID: e.UserID, Node: e.Node, Path: "elsewhere.tar.gz", SHA256: strings.Repeat("0", 64), EngineVersion: e.EngineVersion,
			Trigger: schema.BackupScheduled, Day: &d})
		if err != nil {
			t.Errorf("record the other backup: %v", err)
		}
	})

	tw, tx := testWorker(t, r, &backupWorker{bk: r.w.Backups})
	res, err := tw.Work(ctx, t, tx, jobs.Backup{EngineID: e.ID, Node: e.Node, BackupID: uuid.NewString(), Day: day}, nil)
	require.NoError(t, err)
	require.Equal(t, rivertype.JobStateCompleted, res.Job.State)
	bs, total, err := r.q.ListUserBackups(ctx, e.ProductID, e.UserID, 10, 0)
	require.NoError(t, err)
	require.Equal(t, 1, total)
	require.Equal(t, winner, bs[0].ID)
	require.Empty(t, r.audits(t, e.ID, orch.ActionBackup))
	require.Empty(t, backupFiles(t, r.dir))

	// The next tick of the day finds it recorded and does nothing.
	res, err = tw.Work(ctx, t, tx, jobs.Backup{EngineID: e.ID, Node: e.Node, BackupID: uuid.NewString(), Day: day}, nil)
	require.NoError(t, err)
	require.Equal(t, rivertype.JobStateCompleted, res.Job.State)
	require.Equal(t, 1, r.be.called("CopyDataOut"))
}

// A sweep that takes an engine past the failure threshold makes it failed
// and schedules auto-restart attempt 1 as a system restart operation, its
// job on the engine's node queue after the backoff.
func TestSweepSchedulesAutoRestart(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	r := newFakeRig(t, func(c *Config) {
		c.Health = HealthConfig{MaxFailures: 1, RestartMaxAttempts: 3, RestartBackoffBase: time.Minute}
	})
	e := r.engine(t, "zoe", orch.StateRunning)
	r.be.setSick(e.ID, true)
	rc, err := river.NewClient(riverpgxv5.New(r.pool), &river.Config{Logger: r.w.r.log})
	require.NoError(t, err)

	res, err := r.w.Health.SweepNow(ctx, rc, "")
	require.NoError(t, err)
	require.Equal(t, 1, res.NowFailed)
	row := r.row(t, e.ID)
	require.Equal(t, orch.StateFailed, row.Status)
	require.NotEmpty(t, row.OperationID)
	op := r.op(t, row.OperationID)
	require.Equal(t, orch.OpRestart, op.Kind)
	require.Equal(t, orch.ActorSystem, op.Actor)
	require.Equal(t, orch.OpPending, op.Status)
	want := jobs.Restart{Lifecycle: jobs.Lifecycle{EngineID: e.ID, OperationID: op.ID, Node: e.Node}, Auto: true, Attempt: 1}
	job := rivertest.RequireInserted(ctx, t, riverpgxv5.New(r.pool), want,
		&rivertest.RequireInsertedOpts{Queue: jobs.NodeQueue(e.Node), State: rivertype.JobStateScheduled})
	require.Equal(t, want, job.Args)
	require.WithinDuration(t, time.Now().Add(time.Minute), job.ScheduledAt, 10*time.Second)
	audits := r.audits(t, e.ID, orch.ActionHealthFailed)
	require.Len(t, audits, 1)
	require.Equal(t, "health", audits[0]["reason"])
}

// backupFiles lists the backup files under dir (temporaries included).
func backupFiles(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	require.NoError(t, filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			out = append(out, p)
		}
		return err
	}))
	return out
}

// requireRetried: the attempt failed and River will run the job again
// (soon: a retry due within seconds is made available at once).
func requireRetried(t *testing.T, res *rivertest.WorkResult) {
	t.Helper()
	require.Equal(t, river.EventKindJobFailed, res.EventKind)
	require.Contains(t, []rivertype.JobState{rivertype.JobStateRetryable, rivertype.JobStateAvailable}, res.Job.State)
}

// A boot records its timeline: the job's pickup, the backend's ensure and
// start, the health wait and the outcome's commit, once each.
func TestBootRecordsItsSteps(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	m := metrics.New(metrics.Config{})
	r := newFakeRig(t, func(c *Config) { c.Metrics = m })
	e := r.engine(t, "zoe", orch.StateStopped)
	op := r.operation(t, e, orch.OpStart, schema.OpPayload{}, true)

	tw, tx := testWorker(t, r, &startWorker{lifecycleWorker[jobs.Start]{l: r.w.lifecycle}})
	_, err := tw.Work(ctx, t, tx, jobs.Start{Lifecycle: jobs.Lifecycle{EngineID: e.ID, OperationID: op.ID, Node: e.Node}}, nil)
	require.NoError(t, err)
	require.Equal(t, orch.OpSucceeded, r.op(t, op.ID).Status)
	for _, s := range []string{metrics.StepPickup, metrics.StepEnsure, metrics.StepStart, metrics.StepHealth, metrics.StepCommit} {
		got := testenv.GatherMetric(t, m.Gatherer(), "orchestrator_operation_step_duration_seconds", map[string]string{"step": s})
		require.NotNil(t, got, s)
		require.Equal(t, uint64(1), got.GetHistogram().GetSampleCount(), s)
	}
}

// A booting engine is probed every 10 ms for its first 3 s (most answer
// well within), every 50 ms until 15 s, then every 200 ms.
func TestHealthPollCadence(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ elapsed, want time.Duration }{
		{0, 10 * time.Millisecond}, {2999 * time.Millisecond, 10 * time.Millisecond},
		{3 * time.Second, 50 * time.Millisecond}, {14 * time.Second, 50 * time.Millisecond},
		{15 * time.Second, 200 * time.Millisecond}, {time.Hour, 200 * time.Millisecond},
	} {
		require.Equal(t, tc.want, healthPoll(tc.elapsed), "after %s", tc.elapsed)
	}
}
