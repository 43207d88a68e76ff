package workers

import (
	"bufio"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/riverqueue/river"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/schema"
)

// Restore puts a backup back into a user's engine, any engine
// of that user: the one that took it, or the one provisioned after a
// destroy (disaster recovery). In order:
//
//  1. the backup's file is hashed and checked against the SHA-256 and
//     size recorded when it was taken: a mismatch is BACKUP_CORRUPT and
//     nothing has been touched;
//  2. the engine is stopped and its current brain copied out to a safety
//     copy (<ORCH_BACKUP_DIR>/.restore/<engine>-<operation>.tar, written
//     under a temporary name and renamed once complete);
//  3. the volume's contents are replaced by the backup's (CopyDataIn,
//     hashing the file again as it streams), and the engine is created
//     and started on it and must become healthy;
//  4. if 3 fails, the safety copy is put back the same way and the engine
//     is brought back as it was: the previous brain stays in place. The
//     safety copy is deleted once the operation has an outcome, and kept
//     only if even putting it back failed (the audit row says it was kept;
//     the error log line names it).
//
// Steps 1-3 must end a rollback's worth of time before the job's own
// deadline, so that step 4 too runs inside the attempt (and its engine
// lease): no rollback ever outlives its attempt and races the retry that
// depends on the safety copy. A retry after a worker died mid-way reuses a
// complete safety copy rather than copying the half-restored volume.
// Audited as restore (with rolled_back when step 4 ran).

// restoreTimeout bounds a restore job: a whole restore plus a rollback's
// boot, all inside the job's own time (restore.go), so no attempt's work
// outlives its lease and overlaps its retry.
func (bk *Backups) restoreTimeout() time.Duration {
	return bk.jobTimeout() + bk.eng.BootTimeout + time.Minute
}

type restoreWorker struct {
	river.WorkerDefaults[jobs.Restore]
	bk *Backups
}

func (r *restoreWorker) Timeout(*river.Job[jobs.Restore]) time.Duration { return r.bk.restoreTimeout() }
func (r *restoreWorker) NextRetry(j *river.Job[jobs.Restore]) time.Time {
	return time.Now().Add(time.Duration(j.Attempt) * time.Second)
}

func (r *restoreWorker) Work(ctx context.Context, j *river.Job[jobs.Restore]) error {
	return r.bk.run(ctx, j.JobRow, j.Args.Lifecycle, runOpts{}, r.bk.restore)
}

func (bk *Backups) restore(jobCtx context.Context, e orch.Engine, op orch.Operation, p schema.OpPayload, attempt int, last bool) outcome {
	start := time.Now()
	ctx := jobCtx
	if d, ok := jobCtx.Deadline(); ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(jobCtx, d.Add(-bk.rollbackReserve()))
		defer cancel()
	}
	meta := map[string]any{"backup_id": p.BackupID}
	fail := func(err error) outcome {
		return outcome{action: orch.ActionRestore, duration: time.Since(start), meta: meta, err: err}
	}
	// The previous brain ought to be running again after a failure.
	wantRunning := e.Status == orch.StateRunning || (e.Status == orch.StateSleeping && bk.sleepingRuns)
	safety := bk.safetyPath(e, op)
	// A retry after a worker died mid-restore finds the safety copy of its
	// first attempt: any failure from here on must put it back.
	_, err := os.Stat(safety)
	resumed := err == nil

	b, err := schema.New(bk.pool).UserBackup(ctx, e.ProductID, e.UserID, p.BackupID)
	if err != nil {
		if resumed {
			return bk.rollBack(jobCtx, e, safety, wantRunning, fail(err), last)
		}
		return fail(err)
	}
	meta["source_engine_id"] = b.EngineID
	meta["backup_created_at"] = b.CreatedAt.UTC().Format(time.RFC3339)
	meta["sha256"] = b.SHA256
	meta["size_bytes"] = b.SizeBytes

	// 1. Verify before touching anything.
	file := filepath.Join(bk.cfg.Dir, b.Path)
	if err := verifyBackupFile(file, b); err != nil {
		if resumed {
			return bk.rollBack(jobCtx, e, safety, wantRunning, fail(err), last)
		}
		return fail(err)
	}

	if bk.portable() {
		out := bk.restorePortable(ctx, jobCtx, e, b, safety, wantRunning, fail, last)
		for k, v := range meta {
			if _, ok := out.meta[k]; !ok {
				out.meta[k] = v
			}
		}
		out.duration = time.Since(start)
		return out
	}

	// 2. Stop, then a safety copy of the brain as it is now (unless an
	// earlier attempt of this operation already took it).
	if err := bk.safetyCopy(ctx, e, safety); err != nil {
		if wantRunning {
			bk.bootAndWait(ctx, e, bk.currentSpec(e)) //nolint:errcheck // back as it was
		}
		return fail(err)
	}

	// 3. Replace and boot.
	rerr := bk.copyBackupIn(ctx, e, file, b)
	var d time.Duration
	if rerr == nil {
		d, rerr = bk.bootAndWait(ctx, e, bk.currentSpec(e))
	}
	if rerr != nil {
		// 4. Put the previous brain back.
		return bk.rollBack(jobCtx, e, safety, wantRunning, fail(rerr), last)
	}
	os.Remove(safety) //nolint:errcheck
	ms := d.Milliseconds()
	meta["boot_ms"] = ms
	return outcome{action: orch.ActionRestore, duration: time.Since(start), meta: meta, change: &schema.EngineChange{
		Status: orch.StateRunning, BootDurationMS: &ms, ResetHealth: true, RestartAttempts: ptr(0),
		SleepReason: ptr(""), ClearDeadline: true, LastError: ptr("")}}
}

// rollbackReserve is the time a restore keeps for its rollback (copy the
// safety copy back, boot) before the job's deadline.
func (bk *Backups) rollbackReserve() time.Duration { return bk.eng.BootTimeout + time.Minute }

// rollBack puts the safety copy back as the engine's brain and brings the
// engine back as it was (running or just created), within the job's time
// (ctx is the job's context: the reserve restore kept is for this). out is
// the failed restore's outcome; it gains rolled_back. If even that fails
// the safety copy is kept (it is the user's previous brain), named in an
// error log line (the audit row says safety_copy_kept), and the engine is
// marked failed; a retry resumes from it.
func (bk *Backups) rollBack(ctx context.Context, e orch.Engine, safety string, wantRunning bool, out outcome, last bool) outcome {
	rctx := ctx
	rbErr := bk.copyTarIn(rctx, e, safety)
	if rbErr == nil {
		if wantRunning {
			_, rbErr = bk.bootAndWait(rctx, e, bk.currentSpec(e))
		} else if err := bk.backend.Ensure(rctx, bk.currentSpec(e)); err != nil {
			rbErr = backendErr("create engine", err)
		}
	}
	out.meta["rolled_back"] = rbErr == nil
	if rbErr != nil {
		// Products get stable words; the safety copy's path and the
		// error's detail are for the operator, in this log line.
		out.meta["safety_copy_kept"] = true
		out.meta["rollback_error_code"] = string(orch.ErrorCode(rbErr))
		out.meta["rollback_error"] = publicError(rbErr)
		bk.log.Error("restore rollback failed: previous brain kept in the safety copy", "engine_id", e.ID,
			"safety_copy", safety, "error", rbErr)
		out.change = &schema.EngineChange{Status: orch.StateFailed, LastError: ptr("restore failed and its rollback failed")}
		return out
	}
	os.Remove(safety) //nolint:errcheck
	if orch.ErrorCode(out.err) == orch.CodeBackendFailed && last {
		// Out of retries: say the previous brain is back.
		out.err = &orch.Error{Code: orch.CodeBackendFailed, Message: "restore failed; the previous brain was put back", Err: out.err}
	}
	// Transient backend trouble (BACKEND_FAILED) is retried by run with
	// the previous brain in place; a decided failure (the backup's brain
	// does not boot, a corrupt archive) is not.
	return out
}

// verifyBackupFile checks a backup file's size and SHA-256 against its
// record: BACKUP_CORRUPT when they differ or the file is gone.
func verifyBackupFile(path string, b schema.Backup) error {
	sum, n, err := hashFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return &orch.Error{Code: orch.CodeBackupCorrupt, Message: fmt.Sprintf("backup %s: its file is missing from ORCH_BACKUP_DIR", b.ID), Err: err}
	case err != nil:
		return &orch.Error{Code: orch.CodeBackupCorrupt, Message: fmt.Sprintf("backup %s: its file cannot be read", b.ID), Err: err}
	case n != b.SizeBytes || sum != b.SHA256:
		return orch.Errorf(orch.CodeBackupCorrupt, "backup %s is corrupt: its file's SHA-256 (%s, %d bytes) is not the one recorded when it was taken (%s, %d bytes); nothing was changed",
			b.ID, sum, n, b.SHA256, b.SizeBytes)
	}
	return nil
}

// safetyPath is where a restore operation keeps the engine's previous brain.
func (bk *Backups) safetyPath(e orch.Engine, op orch.Operation) string {
	return filepath.Join(bk.cfg.Dir, safetyDir, e.ID+"-"+op.ID+".tar")
}

// safetyCopy stops the engine and copies its volume to path, unless a
// complete safety copy is there from an earlier attempt.
func (bk *Backups) safetyCopy(ctx context.Context, e orch.Engine, path string) error {
	dir := filepath.Dir(path)
	if err := bk.backend.Stop(ctx, e.ID, bk.eng.StopGrace); err != nil {
		return backendErr("stop engine", err)
	}
	if _, err := os.Stat(path); err == nil {
		return nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create safety copy directory: %w", err)
	}
	tmp, err := os.CreateTemp(dir, ".tmp-"+e.ID+"-*.tar")
	if err != nil {
		return fmt.Errorf("create safety copy: %w", err)
	}
	defer func() { tmp.Close(); os.Remove(tmp.Name()) }() //nolint:errcheck
	bw := bufio.NewWriterSize(tmp, 1<<20)
	if err := bk.backend.CopyDataOut(ctx, e.ID, bw); err != nil {
		return backendErr("copy current brain out", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write safety copy: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("fsync safety copy: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("name safety copy: %w", err)
	}
	return nil
}

// copyBackupIn makes the volume the backup's contents, hashing the file
// again as it streams: a file changed since it was verified fails the
// restore (which then rolls back).
func (bk *Backups) copyBackupIn(ctx context.Context, e orch.Engine, path string, b schema.Backup) error {
	f, err := os.Open(path)
	if err != nil {
		return &orch.Error{Code: orch.CodeBackupCorrupt, Message: "backup file cannot be read", Err: err}
	}
	defer f.Close()
	h := sha256.New()
	hr := hashingReader{bufio.NewReaderSize(f, 1<<20), h}
	zr, err := gzip.NewReader(hr)
	if err != nil {
		return &orch.Error{Code: orch.CodeBackupCorrupt, Message: "backup file is not gzip", Err: err}
	}
	if err := bk.backend.CopyDataIn(ctx, e.ID, e.EngineVersion, zr); err != nil {
		if orch.IsCode(err, orch.CodeBackupCorrupt) {
			return err
		}
		return backendErr("copy backup in", err)
	}
	return verifyRest(hr, h, b)
}

// verifyRest reads what the archive reader left of the backup (the gzip
// trailer) and checks the whole file against the SHA-256 recorded when it
// was taken: a file changed under a restore is BACKUP_CORRUPT.
func verifyRest(hr io.Reader, h hash.Hash, b schema.Backup) error {
	if _, err := io.Copy(io.Discard, hr); err != nil {
		return fmt.Errorf("read backup: %w", err)
	}
	if hex.EncodeToString(h.Sum(nil)) != b.SHA256 {
		return orch.Errorf(orch.CodeBackupCorrupt, "backup %s changed while it was being restored", b.ID)
	}
	return nil
}

// copyTarIn makes the volume the contents of a plain tar file (a safety copy).
func (bk *Backups) copyTarIn(ctx context.Context, e orch.Engine, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open safety copy: %w", err)
	}
	defer f.Close()
	if err := bk.backend.CopyDataIn(ctx, e.ID, e.EngineVersion, bufio.NewReaderSize(f, 1<<20)); err != nil {
		return backendErr("put the previous brain back", err)
	}
	return nil
}
