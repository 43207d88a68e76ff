package subprocess

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"time"

	"github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/atomicfile"
)

// Names inside an engine directory.
const (
	fileSpec    = "spec.json"
	filePid     = "pid"
	fileStopped = "stopped"
	filePaused  = "paused"
	fileExit    = "exit.json"
	fileVolume  = "volume.json"
	fileLog     = "engine.log"
	fileLogOld  = "engine.log.1"
	dirData     = "data"
	dirDataNew  = "data.new" // complete new contents, being swapped in
	dirDataOld  = "data.old" // previous contents, being swapped out
	prefixIn    = "data.in-" // contents being extracted
	enginesDir  = "engines"
	dbFileName  = "brain.sqlite"
	maxLogBytes = 10 << 20 // engine.log is rotated at Start beyond this
)

// specRecord is spec.json: the "container" of an engine.
type specRecord struct {
	EngineID  string            `json:"engine_id"`
	ProductID string            `json:"product_id"`
	Node      string            `json:"node"`
	Image     string            `json:"image"`
	Binary    string            `json:"binary"`
	HostPort  int               `json:"host_port"`
	Env       map[string]string `json:"env"` // the engine's environment, minus PATH/HOME/TMPDIR
	Labels    map[string]string `json:"labels"`
	CreatedAt time.Time         `json:"created_at"`
}

// sameConfig reports whether a running container for r can serve w.
func (r specRecord) sameConfig(w specRecord) bool {
	return r.EngineID == w.EngineID && r.ProductID == w.ProductID && r.Node == w.Node &&
		r.Image == w.Image && r.Binary == w.Binary && r.HostPort == w.HostPort &&
		maps.Equal(r.Env, w.Env)
}

// pidRecord is the pid file: which process runs the engine.
type pidRecord struct {
	PID        int       `json:"pid"`
	StartTicks uint64    `json:"start_ticks"` // field 22 of /proc/<pid>/stat; 0 when unknown
	StartedAt  time.Time `json:"started_at"`
}

func (r pidRecord) same(o pidRecord) bool { return r.PID == o.PID && r.StartTicks == o.StartTicks }

// exitRecord is exit.json: how the last process ended.
type exitRecord struct {
	PID        int       `json:"pid"`
	StartTicks uint64    `json:"start_ticks"`
	ExitCode   int       `json:"exit_code"` // -1: unknown
	FinishedAt time.Time `json:"finished_at"`
}

func (e exitRecord) of(r pidRecord) bool { return e.PID == r.PID && e.StartTicks == r.StartTicks }

// volumeRecord is volume.json.
type volumeRecord struct {
	CreatedAt time.Time `json:"created_at"`
}

var idPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)

// validID reports whether id is usable as a directory name.
func validID(id string) bool { return idPattern.MatchString(id) }

func checkID(id string) error {
	if !validID(id) {
		return orchestrator.Errorf(orchestrator.CodeInvalidRequest, "invalid engine id %q", id)
	}
	return nil
}

func (b *Backend) engineDir(id string) string { return filepath.Join(b.root, enginesDir, id) }

func (b *Backend) path(id, name string) string { return filepath.Join(b.root, enginesDir, id, name) }

// DataDir returns the directory that is engineID's brain volume.
func (b *Backend) DataDir(engineID string) string { return b.path(engineID, dirData) }

// LogPath returns the file that collects engineID's stdout and stderr.
func (b *Backend) LogPath(engineID string) string { return b.path(engineID, fileLog) }

// readJSON reads a JSON file into v; it returns fs.ErrNotExist when the
// file is absent.
func readJSON(path string, v any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("decode %s: %w", path, err)
	}
	return nil
}

// writeJSON atomically replaces path with v encoded as JSON.
func writeJSON(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(path, append(data, '\n'))
}

// removeFiles removes the named files of an engine; missing ones are fine.
func (b *Backend) removeFiles(id string, names ...string) error {
	var errs []error
	for _, n := range names {
		if err := os.Remove(b.path(id, n)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

func (b *Backend) readSpec(id string) (specRecord, error) {
	var s specRecord
	err := readJSON(b.path(id, fileSpec), &s)
	return s, err
}

// readPid returns the engine's pid record; ok is false when there is none.
func (b *Backend) readPid(id string) (rec pidRecord, ok bool, err error) {
	err = readJSON(b.path(id, filePid), &rec)
	if errors.Is(err, fs.ErrNotExist) {
		return rec, false, nil
	}
	if err != nil {
		return rec, false, err
	}
	return rec, true, nil
}

func (b *Backend) readExit(id string) (exitRecord, bool) {
	var e exitRecord
	if err := readJSON(b.path(id, fileExit), &e); err != nil {
		return e, false
	}
	return e, true
}

// syncDir makes renames inside dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
