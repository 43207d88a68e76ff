package workers

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/schema"
)

// Portable brains: on a backend that cannot copy a brain volume (kubernetes:
// the API gives no file access to a claim, and no freezer), backups and
// restores go through the engine's own portable format instead, its
// GET /memory/export and POST /memory/import. The backup file keeps its
// shape, a gzipped tar, holding one file, PortableEntry (the export
// bundle), so the backups table, retention, hashing and verification are
// the same. The engine must be running to be backed up this way (the
// nightly fan-out skips engines that are not; a manual backup says
// ENGINE_NOT_RUNNING), and a restore starts it first. The export is one
// read of the brain by the engine itself, so it is consistent without a
// pause.

// PortableEntry is the one file in a portable backup's tar.
const PortableEntry = "memory-export.json"

// maxPortableBytes bounds an export read into a backup (the reference
// engine refuses imports above 256 MiB).
const maxPortableBytes = 256 << 20

// copiesData reports whether the backend can copy brain volumes; backends
// that cannot say so (orch.DataCopier).
func copiesData(b orch.Backend) bool {
	c, ok := b.(orch.DataCopier)
	return !ok || c.CopiesData()
}

// portable reports whether this worker's backups go through the engine.
func (bk *Backups) portable() bool { return !copiesData(bk.backend) }

// engineCall makes one authenticated request to e's API, at the address
// the workers reach it (ORCH_ENGINE_PROBE_URL_TEMPLATE).
func (bk *Backups) engineCall(ctx context.Context, e orch.Engine, method, path string, body io.Reader) (*http.Response, error) {
	if bk.cfg.Keyring == nil {
		return nil, errors.New("no keyring: workers cannot authenticate to engines")
	}
	key, err := bk.cfg.Keyring.Decrypt(e.KeyEnc)
	if err != nil {
		return nil, fmt.Errorf("decrypt engine key: %w", err)
	}
	url := strings.TrimRight(orch.EngineURL(bk.eng.ProbeURLTemplate, e, bk.eng.Namespace), "/") + path
	req, err := http.NewRequestWithContext(ctx, method, url, body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("X-Engine-Key", key)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := bk.http.Do(req)
	if err != nil {
		return nil, backendErr("reach engine", err)
	}
	if res.StatusCode/100 != 2 {
		b, _ := io.ReadAll(io.LimitReader(res.Body, 512))
		res.Body.Close()
		return nil, &orch.Error{Code: orch.CodeBackendFailed, Message: fmt.Sprintf("engine answered %s %s with %d", method, path, res.StatusCode),
			Err: fmt.Errorf("%s", bytes.TrimSpace(b))}
	}
	return res, nil
}

// exportTar writes e's brain, exported by the engine, to dst as a tar
// holding PortableEntry.
func (bk *Backups) exportTar(ctx context.Context, e orch.Engine, dst io.Writer) error {
	res, err := bk.engineCall(ctx, e, http.MethodGet, "/memory/export", nil)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	// The tar header needs the size first: the bundle is spooled to a
	// temporary file (bounded), not held in memory.
	tmp, err := os.CreateTemp(bk.cfg.Dir, ".tmp-export-*")
	if err != nil {
		return fmt.Errorf("spool export: %w", err)
	}
	defer func() { tmp.Close(); os.Remove(tmp.Name()) }() //nolint:errcheck
	n, err := io.Copy(tmp, io.LimitReader(res.Body, maxPortableBytes+1))
	if err != nil {
		return backendErr("export brain", err)
	}
	if n > maxPortableBytes {
		return fmt.Errorf("export brain: larger than %d MiB", maxPortableBytes>>20)
	}
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		return err
	}
	tw := tar.NewWriter(dst)
	if err := tw.WriteHeader(&tar.Header{Name: PortableEntry, Mode: 0o600, Size: n, ModTime: time.Now(), Typeflag: tar.TypeReg}); err != nil {
		return err
	}
	if _, err := io.Copy(tw, tmp); err != nil {
		return fmt.Errorf("write export: %w", err)
	}
	return tw.Close()
}

// importTar reads PortableEntry from a tar stream and has e import it,
// replacing its brain. A tar without it is a volume copy, which this
// backend cannot put back.
func (bk *Backups) importTar(ctx context.Context, e orch.Engine, r io.Reader) error {
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return orch.Errorf(orch.CodeBackupCorrupt, "backup holds a volume copy, not an engine export (%s): it was taken on a backend that copies volumes and can only be restored there", PortableEntry)
		}
		if err != nil {
			return &orch.Error{Code: orch.CodeBackupCorrupt, Message: "backup archive is unreadable", Err: err}
		}
		if h.Name != PortableEntry {
			continue
		}
		res, err := bk.engineCall(ctx, e, http.MethodPost, "/memory/import", io.LimitReader(tr, maxPortableBytes))
		if err != nil {
			return err
		}
		io.Copy(io.Discard, res.Body) //nolint:errcheck
		res.Body.Close()
		_, err = io.Copy(io.Discard, tr) // the rest of the archive, for the caller's hash
		return err
	}
}

// restorePortable is restore for backends without data copy: verify the
// file, start the engine if it is not running, export its brain as the
// safety copy, import the backup; on failure import the safety copy back.
// The engine is left as it was found (running, or stopped again).
func (bk *Backups) restorePortable(ctx, jobCtx context.Context, e orch.Engine, b schema.Backup, safety string, wantRunning bool, fail func(error) outcome, last bool) outcome {
	start := time.Now()
	if e.Status != orch.StateRunning {
		if _, err := bk.bootAndWait(ctx, e, bk.currentSpec(e)); err != nil {
			bk.stopUnlessRunning(jobCtx, e, wantRunning)
			return fail(err)
		}
	}
	if _, err := os.Stat(safety); err != nil {
		if err := bk.portableSafetyCopy(ctx, e, safety); err != nil {
			bk.stopUnlessRunning(jobCtx, e, wantRunning)
			return fail(err)
		}
	}
	rerr := bk.importBackup(ctx, e, filepath.Join(bk.cfg.Dir, b.Path), b)
	if rerr == nil {
		rerr = bk.waitHealthy(ctx, e, time.Now().Add(bk.eng.BootTimeout))
	}
	if rerr != nil {
		out := fail(rerr)
		rbErr := bk.importSafety(jobCtx, e, safety)
		out.meta["rolled_back"] = rbErr == nil
		if rbErr != nil {
			out.meta["safety_copy_kept"] = true
			out.meta["rollback_error_code"] = string(orch.ErrorCode(rbErr))
			out.meta["rollback_error"] = publicError(rbErr)
			bk.log.Error("restore rollback failed: previous brain kept in the safety copy", "engine_id", e.ID,
				"safety_copy", safety, "error", rbErr)
			out.change = &schema.EngineChange{Status: orch.StateFailed, LastError: ptr("restore failed and its rollback failed")}
			return out
		}
		os.Remove(safety) //nolint:errcheck
		bk.stopUnlessRunning(jobCtx, e, wantRunning)
		return out
	}
	os.Remove(safety) //nolint:errcheck
	ms := time.Since(start).Milliseconds()
	return outcome{action: orch.ActionRestore, meta: map[string]any{"boot_ms": ms, "portable": true}, change: &schema.EngineChange{
		Status: orch.StateRunning, BootDurationMS: &ms, ResetHealth: true, RestartAttempts: ptr(0),
		SleepReason: ptr(""), ClearDeadline: true, LastError: ptr("")}}
}

// stopUnlessRunning stops an engine a portable restore started, when it
// was not running before and the restore failed.
func (bk *Backups) stopUnlessRunning(ctx context.Context, e orch.Engine, wantRunning bool) {
	if !wantRunning {
		bk.backend.Stop(context.WithoutCancel(ctx), e.ID, bk.eng.StopGrace) //nolint:errcheck // best effort: reconcile sees the rest
	}
}

// portableSafetyCopy exports e's brain to path (temporary name, fsync, rename).
func (bk *Backups) portableSafetyCopy(ctx context.Context, e orch.Engine, path string) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create safety copy directory: %w", err)
	}
	tmp, err := os.CreateTemp(dir, ".tmp-"+e.ID+"-*.tar")
	if err != nil {
		return fmt.Errorf("create safety copy: %w", err)
	}
	defer func() { tmp.Close(); os.Remove(tmp.Name()) }() //nolint:errcheck
	bw := bufio.NewWriterSize(tmp, 1<<20)
	if err := bk.exportTar(ctx, e, bw); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write safety copy: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("fsync safety copy: %w", err)
	}
	return os.Rename(tmp.Name(), path)
}

// importBackup imports a backup file, hashing it again as it streams: a
// file changed since it was verified fails the restore.
func (bk *Backups) importBackup(ctx context.Context, e orch.Engine, path string, b schema.Backup) error {
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
	if err := bk.importTar(ctx, e, zr); err != nil {
		return err
	}
	return verifyRest(hr, h, b)
}

// importSafety imports the safety copy back (the rollback).
func (bk *Backups) importSafety(ctx context.Context, e orch.Engine, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open safety copy: %w", err)
	}
	defer f.Close()
	if err := bk.importTar(ctx, e, bufio.NewReaderSize(f, 1<<20)); err != nil {
		return fmt.Errorf("put the previous brain back: %w", err)
	}
	return nil
}
