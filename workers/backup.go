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
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/atomicfile"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

// Brain backups.
//
// A backup is a consistent copy of the engine's volume, whatever the
// engine image: the container is paused (cgroup freezer; SIGSTOP on the
// subprocess backend), the volume is copied out as a tar into a temporary
// file next to the final one, and the container is unpaused at once; only
// then is the tar compressed and hashed. Every process writing the brain is
// frozen during the copy, so SQLite's database, -wal and -shm files are
// copied at one instant: the copy is what a power cut at that instant
// would leave, which SQLite recovers from (crash-consistent; the WAL is
// replayed on the next open). The pause lasts as long as the raw copy,
// which is bounded by disk speed, not by compression.
//
// Files are <ORCH_BACKUP_DIR>/<product_id>/<user_id>/<UTC timestamp>.tar.gz,
// written under a temporary name in the same directory, fsynced and then
// hard-linked to the final name (which never exists half-written, and is
// never overwritten), and recorded with their size and SHA-256 in the
// backups table together with the audit row, in one transaction.
//
// Retention (ORCH_BACKUP_RETENTION_DAYS) runs after each nightly fan-out:
// rows older than the retention go first, then their files. The newest
// backup of a user who has an engine is never pruned, however old (their
// only copy stays); backups of users without an engine (destroyed) expire
// like the others, which bounds how long a destroyed user's brain can
// still be restored. Files that no row records (a worker killed between
// writing and committing) and temporary files older than an hour are
// removed by the same sweep.

// backupCompression is the gzip level of backups: BestSpeed compresses a
// brain about 2× faster than the default level for files ~10 % larger.
const backupCompression = gzip.BestSpeed

// strayAge is how old an unrecorded backup file or temporary file must be
// before the retention sweep removes it (no live job is that slow to commit).
const strayAge = time.Hour

// safetyDir holds restore safety copies, under ORCH_BACKUP_DIR.
const safetyDir = ".restore"

// BackupConfig configures brain backups and restores.
type BackupConfig struct {
	Dir         string        // ORCH_BACKUP_DIR ("" = backups refused)
	Retention   time.Duration // ORCH_BACKUP_RETENTION_DAYS (7 days)
	Concurrency int           // backups at once per worker process (2)
	// Keyring opens engine keys, for backends whose backups go through
	// the engine's API (portable.go); server.New sets the process's.
	Keyring *keys.Keyring
}

func (c BackupConfig) withDefaults() BackupConfig {
	if c.Retention <= 0 {
		c.Retention = 7 * 24 * time.Hour
	}
	if c.Concurrency <= 0 {
		c.Concurrency = 2
	}
	return c
}

// Backups takes brain backups (one engine, or the nightly fan-out),
// applies their retention, and restores them (restore.go).
type Backups struct {
	*runner
	cfg          BackupConfig
	sleepingRuns bool // a sleeping engine keeps running (IdleConfig): a failed restore brings it back running
}

func (bk *Backups) register(ws *river.Workers) {
	river.AddWorker(ws, &backupWorker{bk: bk})
	river.AddWorker(ws, &backupAllWorker{bk: bk})
	river.AddWorker(ws, &restoreWorker{bk: bk})
}

// BackupFile is a backup written to disk, not yet recorded.
type BackupFile struct {
	Path      string // relative to ORCH_BACKUP_DIR
	SizeBytes int64
	SHA256    string
	Paused    time.Duration // how long the engine was frozen
	Copy      time.Duration // pause + copy out + unpause
	Total     time.Duration
}

type backupWorker struct {
	river.WorkerDefaults[jobs.Backup]
	bk *Backups
}

func (b *backupWorker) Timeout(*river.Job[jobs.Backup]) time.Duration { return b.bk.jobTimeout() }
func (b *backupWorker) NextRetry(j *river.Job[jobs.Backup]) time.Time {
	return time.Now().Add(time.Duration(j.Attempt*j.Attempt) * time.Second)
}

// Work takes one backup on the run/commit skeleton, beside the engine's
// operation slot (other operations go on; the lease keeps lifecycle jobs
// off the engine meanwhile): copy, then record the backup's row, its audit
// row and the operation's outcome in one transaction. A failed attempt is
// audited and retried; the last failure fails the operation. A file that
// is not recorded is removed.
func (b *backupWorker) Work(ctx context.Context, j *river.Job[jobs.Backup]) error {
	a := j.Args
	return b.bk.run(ctx, j.JobRow, jobs.Lifecycle{EngineID: a.EngineID, OperationID: a.OperationID, Node: a.Node}, runOpts{aside: true},
		func(ctx context.Context, e orch.Engine, op orch.Operation, _ schema.OpPayload, attempt int, last bool) outcome {
			return b.bk.backup(ctx, e, op, a, attempt, last)
		})
}

// backup is the backup job's step: a scheduled backup (a.Day) or a manual
// one (op) of e.
func (bk *Backups) backup(ctx context.Context, e orch.Engine, op orch.Operation, a jobs.Backup, attempt int, last bool) outcome {
	start := time.Now()
	if e.Status.Transitional() {
		// Being created (nothing to back up yet) or destroyed.
		return outcome{err: orch.Errorf(orch.CodeOperationInProgress, "engine is %s", e.Status), logAs: "skipped_" + string(e.Status)}
	}
	var day *time.Time
	trigger := schema.BackupManual
	meta := map[string]any{"backup_id": a.BackupID}
	if a.Day != "" {
		d, err := time.Parse(time.DateOnly, a.Day)
		if err != nil {
			return outcome{err: fmt.Errorf("backup day %q: %w", a.Day, err)}
		}
		day, trigger, meta["day"] = &d, schema.BackupScheduled, a.Day
		done, err := schema.New(bk.pool).HasBackupForDay(ctx, e.ID, d)
		if err != nil {
			return outcome{err: err, retryAudited: true}
		}
		if done {
			return outcome{logAs: "already_done"}
		}
	}
	meta["trigger"] = trigger
	if bk.portable() && e.Status != orch.StateRunning && !(e.Status == orch.StateSleeping && bk.sleepingRuns) {
		// The engine exports its own brain: it must be running. A stopped
		// engine's brain has not changed since it stopped.
		if day != nil {
			return outcome{logAs: "skipped_not_running"}
		}
		return outcome{err: orch.Errorf(orch.CodeEngineNotRunning, "engine is %s: on this backend a backup is the running engine's own export (start it first)", e.Status)}
	}

	f, err := bk.WriteBackup(ctx, e, a.BackupID)
	if err != nil {
		// The error's detail is the operators': in the job's log line.
		meta["attempt"], meta["will_retry"] = attempt, !last
		return outcome{action: orch.ActionBackup, meta: meta, duration: time.Since(start), err: err, retryAudited: true}
	}
	rec := schema.Backup{ID: a.BackupID, EngineID: e.ID, ProductID: e.ProductID, UserID: e.UserID, Node: e.Node,
		Path: f.Path, SizeBytes: f.SizeBytes, SHA256: f.SHA256, EngineVersion: e.EngineVersion, Trigger: trigger, Day: day,
		PausedMS: f.Paused.Milliseconds(), DurationMS: time.Since(start).Milliseconds(), OperationID: op.ID}
	// The file's path is the operators': logged, not audited.
	meta["size_bytes"], meta["sha256"], meta["paused_ms"], meta["engine_version"] = rec.SizeBytes, rec.SHA256, rec.PausedMS, rec.EngineVersion
	return outcome{action: orch.ActionBackup, meta: meta, duration: time.Since(start),
		record: func(ctx context.Context, q *schema.Queries) error {
			err := q.InsertBackup(ctx, rec)
			if errors.Is(err, schema.ErrBackupExists) {
				return fmt.Errorf("%w: %w", errRecorded, err)
			}
			return err
		},
		discard:  func() { os.Remove(filepath.Join(bk.cfg.Dir, f.Path)) }, //nolint:errcheck // unrecorded: never leave it behind
		logAttrs: []any{"paused_ms", rec.PausedMS, "size_bytes", rec.SizeBytes, "backup_id", rec.ID, "path", rec.Path}}
}

// WriteBackup writes one consistent backup of e's brain to ORCH_BACKUP_DIR
// and returns it; nothing is recorded. On error no file is left under a
// final name (temporary files are removed, or swept later if the process
// dies). Errors carry BACKEND_FAILED when the backend failed.
func (bk *Backups) WriteBackup(ctx context.Context, e orch.Engine, backupID string) (BackupFile, error) {
	start := time.Now()
	var f BackupFile
	if bk.cfg.Dir == "" {
		return f, errors.New("ORCH_BACKUP_DIR is not set")
	}
	rel := filepath.Join(e.ProductID, e.UserID)
	dir := filepath.Join(bk.cfg.Dir, rel)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return f, fmt.Errorf("create backup directory: %w", err)
	}
	raw, err := os.CreateTemp(dir, ".tmp-"+backupID+"-*.tar")
	if err != nil {
		return f, fmt.Errorf("create temporary backup file: %w", err)
	}
	defer func() { raw.Close(); os.Remove(raw.Name()) }() //nolint:errcheck

	// The frozen part: pause, copy the volume out as it is, unpause; or
	// the engine's own export (portable.go).
	if bk.portable() {
		err = bk.exportTar(ctx, e, raw)
	} else {
		f.Paused, err = bk.copyFrozen(ctx, e.ID, raw)
	}
	f.Copy = time.Since(start)
	if err != nil {
		return f, err
	}

	// Compress and hash with the engine running again.
	if _, err := raw.Seek(0, io.SeekStart); err != nil {
		return f, fmt.Errorf("rewind backup: %w", err)
	}
	gz, err := os.CreateTemp(dir, ".tmp-"+backupID+"-*.tar.gz")
	if err != nil {
		return f, fmt.Errorf("create temporary backup file: %w", err)
	}
	defer func() { gz.Close(); os.Remove(gz.Name()) }() //nolint:errcheck
	sum := sha256.New()
	var size int64
	bw := bufio.NewWriterSize(io.MultiWriter(gz, sum, countingWriter{&size}), 1<<20)
	zw, _ := gzip.NewWriterLevel(bw, backupCompression)
	if _, err := io.Copy(zw, ctxReader{ctx, bufio.NewReaderSize(raw, 1<<20)}); err != nil {
		return f, fmt.Errorf("compress backup: %w", err)
	}
	if err := zw.Close(); err != nil {
		return f, fmt.Errorf("compress backup: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return f, fmt.Errorf("write backup: %w", err)
	}
	if err := gz.Sync(); err != nil {
		return f, fmt.Errorf("fsync backup: %w", err)
	}
	name, err := linkUnique(gz.Name(), dir, time.Now())
	if err != nil {
		return f, err
	}
	if err := atomicfile.SyncDir(dir); err != nil {
		os.Remove(filepath.Join(dir, name)) //nolint:errcheck
		return f, fmt.Errorf("fsync backup directory: %w", err)
	}
	f.Path = filepath.Join(rel, name)
	f.SizeBytes = size
	f.SHA256 = hex.EncodeToString(sum.Sum(nil))
	f.Total = time.Since(start)
	return f, nil
}

// copyFrozen pauses the engine, copies its volume out to dst and unpauses
// it, also when ctx ends mid-copy. It returns how long the engine was
// frozen. Pausing an engine that is not running is a no-op (nothing writes
// its brain); an engine left paused by a killed earlier attempt is copied
// as it is and unpaused.
func (bk *Backups) copyFrozen(ctx context.Context, engineID string, dst *os.File) (time.Duration, error) {
	bw := bufio.NewWriterSize(dst, 1<<20)
	start := time.Now()
	if err := bk.backend.Pause(ctx, engineID); err != nil {
		bk.unpause(ctx, engineID) //nolint:errcheck // a partial pause must not stay
		return 0, backendErr("pause engine", err)
	}
	cerr := bk.backend.CopyDataOut(ctx, engineID, bw)
	uerr := bk.unpause(ctx, engineID)
	paused := time.Since(start)
	if cerr != nil {
		return paused, backendErr("copy brain out", cerr)
	}
	if uerr != nil {
		return paused, backendErr("unpause engine", uerr)
	}
	if err := bw.Flush(); err != nil {
		return paused, fmt.Errorf("write backup: %w", err)
	}
	return paused, nil
}

// unpause thaws an engine, insisting a little: a backup must never leave
// an engine frozen. It runs even when ctx has ended.
func (bk *Backups) unpause(ctx context.Context, engineID string) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	var err error
	for try := 0; try < 3; try++ {
		if err = bk.backend.Unpause(ctx, engineID); err == nil {
			return nil
		}
		time.Sleep(time.Duration(try+1) * 200 * time.Millisecond)
	}
	bk.log.Error("engine left paused", "engine_id", engineID, "error", err)
	return err
}

// linkUnique gives the finished temporary file its final name,
// <timestamp>.tar.gz, with a hard link: unlike a rename it never replaces
// an existing file, so two backups in the same millisecond both survive.
func linkUnique(tmp, dir string, t time.Time) (string, error) {
	t = t.UTC()
	for i := 0; i < 1000; i++ {
		name := t.Add(time.Duration(i)*time.Millisecond).Format("20060102T150405.000Z") + ".tar.gz"
		err := os.Link(tmp, filepath.Join(dir, name))
		if err == nil {
			return name, nil
		}
		if !errors.Is(err, fs.ErrExist) {
			return "", fmt.Errorf("name backup file: %w", err)
		}
	}
	return "", errors.New("name backup file: no free name")
}

type countingWriter struct{ n *int64 }

func (c countingWriter) Write(p []byte) (int, error) { *c.n += int64(len(p)); return len(p), nil }

// ctxReader stops a long copy when ctx ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

type backupAllWorker struct {
	river.WorkerDefaults[jobs.BackupAll]
	bk *Backups
}

func (b *backupAllWorker) Timeout(*river.Job[jobs.BackupAll]) time.Duration { return b.bk.jobTimeout() }

// Work enqueues the night's backup of every engine (unique per engine per
// day), then applies the retention. Ticks more than a day old are skipped.
func (b *backupAllWorker) Work(ctx context.Context, j *river.Job[jobs.BackupAll]) error {
	start := time.Now()
	if time.Since(j.Args.Tick) > 24*time.Hour {
		// A tick replayed after a long scheduler outage: the newest
		// replayed tick backs the fleet up; older ones would only repeat it.
		b.bk.log.Info("job", "job_kind", j.Kind, "outcome", "stale_tick_skipped", "tick", j.Args.Tick)
		return nil
	}
	n, err := b.bk.EnqueueBackups(ctx, river.ClientFromContext[pgx.Tx](ctx), j.Args.Tick)
	if err != nil {
		return err
	}
	pruned, strays, err := b.bk.PruneBackups(ctx)
	attrs := []any{"job_kind", j.Kind, "enqueued", n, "pruned", pruned, "strays_removed", strays,
		"duration_ms", time.Since(start).Milliseconds()}
	if err != nil {
		b.bk.log.Warn("job", append(attrs, "error", err.Error())...)
		return err
	}
	b.bk.log.Info("job", attrs...)
	return nil
}

// EnqueueBackups enqueues the scheduled backup of tick's day for every
// engine that is not being created or destroyed; engines that already
// have theirs (or an in-flight one) are skipped by uniqueness. Returns how
// many jobs were inserted.
func (bk *Backups) EnqueueBackups(ctx context.Context, rc *river.Client[pgx.Tx], tick time.Time) (int, error) {
	day := jobs.BackupDay(tick)
	q := schema.New(bk.pool)
	after, n := "", 0
	for {
		es, err := q.BackupCandidates(ctx, after, 1000)
		if err != nil {
			return n, err
		}
		if len(es) == 0 {
			return n, nil
		}
		params := make([]river.InsertManyParams, len(es))
		for i, e := range es {
			params[i] = river.InsertManyParams{Args: jobs.Backup{EngineID: e.ID, Node: e.Node, BackupID: uuid.NewString(), Day: day}}
		}
		res, err := rc.InsertMany(ctx, params)
		if err != nil {
			return n, fmt.Errorf("enqueue backups: %w", err)
		}
		for _, r := range res {
			if !r.UniqueSkippedAsDuplicate {
				n++
			}
		}
		after = es[len(es)-1].ID
	}
}

// PruneBackups applies the backup retention: expired rows are deleted,
// then their files (a crash in between leaves a stray file, removed by the
// next sweep, never a row without its file). It also removes stray files:
// unrecorded backups and temporary files older than an hour.
func (bk *Backups) PruneBackups(ctx context.Context) (pruned, strays int, err error) {
	if bk.cfg.Dir == "" {
		return 0, 0, nil
	}
	q := schema.New(bk.pool)
	cutoff := time.Now().Add(-bk.cfg.Retention)
	for {
		bs, err := q.ExpiredBackups(ctx, cutoff, 500)
		if err != nil {
			return pruned, strays, err
		}
		for _, b := range bs {
			err := inTx(ctx, bk.pool, func(tx pgx.Tx) error {
				tq := schema.New(tx)
				if err := tq.DeleteBackup(ctx, b.ID); err != nil {
					return err
				}
				return tq.InsertAudit(ctx, orch.AuditEntry{ProductID: b.ProductID, UserID: b.UserID, EngineID: b.EngineID,
					Action: orch.ActionBackup, Actor: orch.ActorSystem, Metadata: map[string]any{"backup_id": b.ID,
						"pruned": true, "reason": "retention", "created_at": b.CreatedAt.UTC().Format(time.RFC3339)}})
			})
			if err != nil {
				return pruned, strays, err
			}
			bk.log.Info("backup pruned", "backup_id", b.ID, "engine_id", b.EngineID, "path", b.Path)
			if err := os.Remove(filepath.Join(bk.cfg.Dir, b.Path)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				bk.log.Warn("remove pruned backup", "backup_id", b.ID, "error", err)
			}
			pruned++
		}
		if len(bs) < 500 {
			break
		}
	}
	strays, err = bk.removeStrays(ctx)
	return pruned, strays, err
}

// removeStrays deletes temporary files and unrecorded backup files older
// than strayAge under ORCH_BACKUP_DIR. Complete restore safety copies are
// kept: one left behind is a brain whose rollback failed, for an operator.
func (bk *Backups) removeStrays(ctx context.Context) (int, error) {
	old := time.Now().Add(-strayAge)
	var candidates []string
	err := filepath.WalkDir(bk.cfg.Dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if d.IsDir() {
			return nil
		}
		info, err := d.Info()
		if err != nil || info.ModTime().After(old) {
			return nil
		}
		rel, err := filepath.Rel(bk.cfg.Dir, p)
		if err != nil {
			return nil
		}
		switch {
		case strings.HasPrefix(d.Name(), ".tmp-"):
			if os.Remove(p) == nil {
				candidates = append(candidates, "") // counted below
			}
		case strings.HasSuffix(d.Name(), ".tar.gz") && !strings.HasPrefix(rel, safetyDir+string(filepath.Separator)):
			candidates = append(candidates, rel)
		}
		return ctx.Err()
	})
	if err != nil {
		return 0, fmt.Errorf("sweep backup directory: %w", err)
	}
	n := 0
	var paths []string
	for _, c := range candidates {
		if c == "" {
			n++
			continue
		}
		paths = append(paths, c)
	}
	for len(paths) > 0 {
		batch := paths[:min(len(paths), 1000)]
		paths = paths[len(batch):]
		known, err := schema.New(bk.pool).BackupPathsUnder(ctx, batch)
		if err != nil {
			return n, err
		}
		for _, p := range batch {
			if !known[p] && os.Remove(filepath.Join(bk.cfg.Dir, p)) == nil {
				bk.log.Warn("removed unrecorded backup file", "path", p)
				n++
			}
		}
	}
	return n, nil
}

// hashFile returns the hex SHA-256 and size of a file.
func hashFile(path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, bufio.NewReaderSize(f, 1<<20))
	if err != nil {
		return "", n, err
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

// hashingReader hashes what passes through it.
type hashingReader struct {
	r io.Reader
	h hash.Hash
}

func (h hashingReader) Read(p []byte) (int, error) {
	n, err := h.r.Read(p)
	h.h.Write(p[:n])
	return n, err
}
