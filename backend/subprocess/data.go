package subprocess

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/atomicfile"
)

// ErrUnsafeArchive is wrapped by CopyDataIn's error (code BACKUP_CORRUPT)
// when the tar stream holds an entry it refuses: a path escaping the data
// directory, a link, a device.
var ErrUnsafeArchive = errors.New("unsafe entry in data archive")

// recoverDataLocked finishes or rolls back a CopyDataIn swap interrupted
// by a crash, and removes extraction leftovers. With data/ missing, the
// complete new contents (data.new) win over the old ones (data.old).
func (b *Backend) recoverDataLocked(id string) error {
	data, newDir, oldDir := b.path(id, dirData), b.path(id, dirDataNew), b.path(id, dirDataOld)
	if !exists(data) {
		for _, from := range []string{newDir, oldDir} {
			if exists(from) {
				b.log.Warn("recovering interrupted data swap", "engine_id", id, "from", filepath.Base(from))
				if err := os.Rename(from, data); err != nil {
					return fmt.Errorf("recover data: %w", err)
				}
				break
			}
		}
	}
	if exists(data) {
		if err := errors.Join(os.RemoveAll(newDir), os.RemoveAll(oldDir)); err != nil {
			return fmt.Errorf("recover data: %w", err)
		}
	}
	return b.removeTemps(id)
}

// removeTemps removes partial extractions (data.in-*).
func (b *Backend) removeTemps(id string) error {
	ents, err := os.ReadDir(b.engineDir(id))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	var errs []error
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefixIn) || strings.HasPrefix(e.Name(), atomicfile.TempPrefix) {
			errs = append(errs, os.RemoveAll(b.path(id, e.Name())))
		}
	}
	return errors.Join(errs...)
}

// ensureVolumeLocked creates the engine's data directory if it is missing.
func (b *Backend) ensureVolumeLocked(id string) error {
	if err := os.MkdirAll(b.engineDir(id), 0o700); err != nil {
		return err
	}
	if err := b.recoverDataLocked(id); err != nil {
		return err
	}
	if !exists(b.path(id, dirData)) {
		if err := os.Mkdir(b.path(id, dirData), 0o700); err != nil {
			return fmt.Errorf("create data dir: %w", err)
		}
	}
	return b.recordVolumeLocked(id)
}

func (b *Backend) recordVolumeLocked(id string) error {
	if exists(b.path(id, fileVolume)) {
		return nil
	}
	return writeJSON(b.path(id, fileVolume), volumeRecord{CreatedAt: time.Now().UTC()})
}

// CopyDataOut writes a tar stream of the engine's data directory to w:
// directories and regular files with paths relative to it, their modes and
// modification times. It works in any runtime state; a file that shrinks
// while being copied (a running, unpaused engine) is an error. Errors:
// NOT_FOUND when the engine has no data directory.
func (b *Backend) CopyDataOut(ctx context.Context, id string, w io.Writer) error {
	unlock, err := b.lockEngine(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	if exists(b.engineDir(id)) {
		if err := b.recoverDataLocked(id); err != nil {
			return fmt.Errorf("copy data out of engine %s: %w", id, err)
		}
	}
	root := b.DataDir(id)
	if fi, err := os.Stat(root); err != nil || !fi.IsDir() {
		return orchestrator.Errorf(orchestrator.CodeNotFound, "engine %s has no data volume", id)
	}
	if err := writeTar(ctx, root, w); err != nil {
		return fmt.Errorf("copy data out of engine %s: %w", id, err)
	}
	return nil
}

func writeTar(ctx context.Context, root string, w io.Writer) error {
	tw := tar.NewWriter(w)
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if p == root {
			return nil
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		name := filepath.ToSlash(rel)
		fi, err := d.Info()
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // removed meanwhile
			}
			return err
		}
		hdr := &tar.Header{
			Name:    name,
			Mode:    int64(fi.Mode().Perm()),
			ModTime: fi.ModTime(),
			Format:  tar.FormatPAX,
		}
		switch {
		case fi.IsDir():
			hdr.Typeflag = tar.TypeDir
			hdr.Name += "/"
			return tw.WriteHeader(hdr)
		case fi.Mode().IsRegular():
			f, err := os.Open(p)
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return nil
				}
				return err
			}
			defer f.Close()
			hdr.Typeflag = tar.TypeReg
			hdr.Size = fi.Size()
			if err := tw.WriteHeader(hdr); err != nil {
				return err
			}
			n, err := io.CopyN(tw, f, hdr.Size)
			if errors.Is(err, io.EOF) {
				return fmt.Errorf("%s shrank while being copied (%d of %d bytes): pause the engine first", name, n, hdr.Size)
			}
			return err
		default:
			return nil // symlinks, sockets, fifos: not part of a brain
		}
	})
	if err != nil {
		return err
	}
	return tw.Close()
}

// CopyDataIn makes the engine's data directory exactly the tar stream r
// (the layout CopyDataOut writes). The stream is extracted into a sibling
// directory first, so a bad stream (an entry escaping the directory, a
// link, a device: BACKUP_CORRUPT wrapping ErrUnsafeArchive) leaves the
// engine, its container and its data untouched. Then the engine's process
// is stopped and its container removed (the caller Ensures and Starts it
// again), and the new directory is swapped in by renames; the old one is
// deleted only once the new one is in place. image is not needed (no
// helper container) and is ignored.
func (b *Backend) CopyDataIn(ctx context.Context, id, image string, r io.Reader) error {
	unlock, err := b.lockEngine(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	dir := b.engineDir(id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("copy data into engine %s: %w", id, err)
	}
	if err := b.recoverDataLocked(id); err != nil {
		return fmt.Errorf("copy data into engine %s: %w", id, err)
	}
	tmp, err := os.MkdirTemp(dir, prefixIn)
	if err != nil {
		return fmt.Errorf("copy data into engine %s: %w", id, err)
	}
	defer os.RemoveAll(tmp) // no-op once renamed
	if err := os.Chmod(tmp, 0o700); err != nil {
		return fmt.Errorf("copy data into engine %s: %w", id, err)
	}
	if err := extractTar(ctx, r, tmp); err != nil {
		if errors.Is(err, ErrUnsafeArchive) {
			return &orchestrator.Error{Code: orchestrator.CodeBackupCorrupt, Message: "data archive refused", Err: err}
		}
		return fmt.Errorf("copy data into engine %s: %w", id, err)
	}
	if err := b.removeContainerLocked(ctx, id, false); err != nil {
		return fmt.Errorf("copy data into engine %s: remove container: %w", id, err)
	}
	if err := b.swapDataLocked(id, tmp); err != nil {
		return fmt.Errorf("copy data into engine %s: %w", id, err)
	}
	b.log.Info("engine data replaced", "engine_id", id)
	return nil
}

// swapDataLocked puts the extracted directory tmp in place of data/.
//
//	tmp → data.new; data → data.old; data.new → data; rm data.old
//
// recoverDataLocked completes this after a crash at any step.
func (b *Backend) swapDataLocked(id, tmp string) error {
	data, newDir, oldDir := b.path(id, dirData), b.path(id, dirDataNew), b.path(id, dirDataOld)
	if err := errors.Join(os.RemoveAll(newDir), os.RemoveAll(oldDir)); err != nil {
		return err
	}
	if err := os.Rename(tmp, newDir); err != nil {
		return err
	}
	hadOld := exists(data)
	if hadOld {
		if err := os.Rename(data, oldDir); err != nil {
			os.RemoveAll(newDir)
			return err
		}
	}
	if err := os.Rename(newDir, data); err != nil {
		if hadOld {
			_ = os.Rename(oldDir, data)
		}
		os.RemoveAll(newDir)
		return err
	}
	if err := syncDir(b.engineDir(id)); err != nil {
		b.log.Warn("sync engine dir", "engine_id", id, "error", err)
	}
	if hadOld {
		if err := os.RemoveAll(oldDir); err != nil {
			b.log.Warn("remove old data", "engine_id", id, "error", err)
		}
	}
	return b.recordVolumeLocked(id)
}

// cleanName validates a tar entry name and returns it relative to the
// extraction root ("" for the root itself).
func cleanName(name string) (string, error) {
	if name == "" || strings.ContainsRune(name, 0) {
		return "", fmt.Errorf("%w: empty or invalid name %q", ErrUnsafeArchive, name)
	}
	if strings.HasPrefix(name, "/") {
		return "", fmt.Errorf("%w: absolute path %q", ErrUnsafeArchive, name)
	}
	for _, seg := range strings.Split(name, "/") {
		if seg == ".." {
			return "", fmt.Errorf("%w: path %q leaves the data directory", ErrUnsafeArchive, name)
		}
	}
	c := path.Clean(name)
	if c == "." {
		return "", nil
	}
	if !fs.ValidPath(c) {
		return "", fmt.Errorf("%w: invalid path %q", ErrUnsafeArchive, name)
	}
	return c, nil
}

// extractTar extracts r into the empty directory dst. Every operation
// goes through an os.Root, so nothing can be written outside dst even if
// a check above were wrong. Files are synced; directory modes and times are
// applied last, deepest first, so read-only directories can be filled.
func extractTar(ctx context.Context, r io.Reader, dst string) error {
	root, err := os.OpenRoot(dst)
	if err != nil {
		return err
	}
	defer root.Close()
	type dirMeta struct {
		name  string
		mode  fs.FileMode
		mtime time.Time
	}
	var dirs []dirMeta
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("read archive: %w", err)
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if hdr.Typeflag == tar.TypeXGlobalHeader {
			continue
		}
		name, err := cleanName(hdr.Name)
		if err != nil {
			return err
		}
		mode := fs.FileMode(hdr.Mode).Perm()
		switch hdr.Typeflag {
		case tar.TypeDir:
			if name == "" {
				continue // the data directory itself
			}
			if err := root.MkdirAll(name, 0o700); err != nil {
				return fmt.Errorf("create %s: %w", name, err)
			}
			dirs = append(dirs, dirMeta{name, mode, hdr.ModTime})
		case tar.TypeReg, tar.TypeRegA: //nolint:staticcheck // old archives use TypeRegA
			if name == "" {
				return fmt.Errorf("%w: file entry for the root", ErrUnsafeArchive)
			}
			if err := writeEntry(root, name, tr, mode, hdr.ModTime); err != nil {
				return err
			}
		case tar.TypeSymlink, tar.TypeLink:
			return fmt.Errorf("%w: link %q", ErrUnsafeArchive, hdr.Name)
		default:
			return fmt.Errorf("%w: %q has unsupported type %q", ErrUnsafeArchive, hdr.Name, hdr.Typeflag)
		}
	}
	sort.SliceStable(dirs, func(i, j int) bool {
		return strings.Count(dirs[i].name, "/") > strings.Count(dirs[j].name, "/")
	})
	for _, d := range dirs {
		if err := root.Chmod(d.name, d.mode); err != nil {
			return err
		}
		if !d.mtime.IsZero() {
			if err := root.Chtimes(d.name, d.mtime, d.mtime); err != nil {
				return err
			}
		}
	}
	return syncDir(dst)
}

func writeEntry(root *os.Root, name string, r io.Reader, mode fs.FileMode, mtime time.Time) error {
	if dir := path.Dir(name); dir != "." {
		if err := root.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("create %s: %w", dir, err)
		}
	}
	// A repeated entry replaces the earlier one (whatever its mode).
	if err := root.Remove(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("replace %s: %w", name, err)
	}
	f, err := root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("create %s: %w", name, err)
	}
	_, err = io.Copy(f, r)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if err := root.Chmod(name, mode); err != nil {
		return err
	}
	if !mtime.IsZero() {
		return root.Chtimes(name, mtime, mtime)
	}
	return nil
}
