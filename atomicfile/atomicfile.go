// Package atomicfile writes files so that their final name never holds a
// partial file, even when the process dies mid-write or the machine loses
// power: backups, audit exports and the subprocess backend's state files.
package atomicfile

import (
	"os"
	"path/filepath"
)

// TempPrefix starts the name of every temporary file Write creates, so a
// directory's leftovers from a crash can be recognized and removed.
const TempPrefix = ".tmp-"

// Write writes data to path through a temporary file in the same
// directory, fsynced and renamed over path, then fsyncs the directory.
func Write(path string, data []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, TempPrefix+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp) //nolint:errcheck
		return err
	}
	return SyncDir(dir)
}

// SyncDir fsyncs a directory, making renames and links in it durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
