package subprocess

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/atomicfile"
)

// Config configures the subprocess backend. cmd/orchestrator fills it from
// the environment.
type Config struct {
	// DataRoot is ORCH_DATA_ROOT_PATH: engines live under DataRoot/engines.
	DataRoot string
	// EngineBinary is the engine binary run for every image that is not
	// itself an absolute path to an executable. A bare name is looked up
	// in PATH.
	EngineBinary string
	// CatalogMountPath is ORCH_CATALOG_MOUNT_PATH; when set, engines get
	// CATALOG_DIR=CatalogMountPath.
	CatalogMountPath string
	// Node is this backend's node name (default "local"); List reports only
	// the engines of this node.
	Node string
}

// DefaultNode is the node name used when Config.Node is empty.
const DefaultNode = "local"

// Grace given to an engine that Ensure (replacing it), RemoveContainer or
// CopyDataIn stops, before SIGKILL.
const removeGrace = 2 * time.Second

// How long a process may take to die after SIGKILL before Stop gives up.
const killWait = 10 * time.Second

// Backend runs engines as local processes. It is safe for concurrent use;
// operations on one engine id are serialized.
type Backend struct {
	cfg     Config
	root    string // absolute DataRoot
	log     *slog.Logger
	procfs  bool     // /proc is available (Linux)
	inherit []string // PATH, HOME, TMPDIR of the orchestrator, as K=V

	locks engineLocks

	childMu  sync.Mutex
	children map[string]*child // engines this process started and reaps

	hubMu     sync.Mutex
	subs      map[chan orchestrator.RuntimeEvent]struct{}
	watchStop chan struct{} // non-nil while the adopted-engine watcher runs
	scans     atomic.Int64  // completed scans of the watcher: tests wait for one instead of a poll interval
}

var _ orchestrator.Backend = (*Backend)(nil)

// New returns a subprocess backend over cfg.DataRoot, creating the
// directory if needed. It fails when DataRoot is empty or cannot be created.
// A nil logger discards logs.
func New(cfg Config, logger *slog.Logger) (*Backend, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if cfg.DataRoot == "" {
		return nil, errors.New("subprocess backend: data root (ORCH_DATA_ROOT_PATH) is required")
	}
	root, err := filepath.Abs(cfg.DataRoot)
	if err != nil {
		return nil, fmt.Errorf("subprocess backend: data root: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(root, enginesDir), 0o700); err != nil {
		return nil, fmt.Errorf("subprocess backend: create data root: %w", err)
	}
	if cfg.EngineBinary != "" {
		bin := cfg.EngineBinary
		if !filepath.IsAbs(bin) && filepath.Base(bin) == bin {
			if p, err := exec.LookPath(bin); err == nil {
				bin = p
			}
		}
		if bin, err = filepath.Abs(bin); err != nil {
			return nil, fmt.Errorf("subprocess backend: engine binary: %w", err)
		}
		cfg.EngineBinary = bin
	}
	if cfg.Node == "" {
		cfg.Node = DefaultNode
	}
	b := &Backend{
		cfg:      cfg,
		root:     root,
		log:      logger.With("backend", "subprocess"),
		procfs:   exists("/proc/self/stat"),
		children: make(map[string]*child),
		subs:     make(map[chan orchestrator.RuntimeEvent]struct{}),
	}
	// Engines get a minimal environment: the caller passes everything else
	// through spec.Env.
	for _, k := range []string{"PATH", "HOME", "TMPDIR"} {
		if v, ok := os.LookupEnv(k); ok {
			b.inherit = append(b.inherit, k+"="+v)
		}
	}
	return b, nil
}

// Name returns "subprocess".
func (b *Backend) Name() string { return "subprocess" }

// Ensure creates the engine's data directory if missing and records spec as
// its container, adopting an existing record with the same configuration
// (image, binary, port, environment) and replacing one that differs: the
// old process, if any, is stopped (SIGTERM, 2 s, SIGKILL) and the engine is
// left created, not started. The data directory is never removed.
// Errors: INVALID_REQUEST for an unusable engine id, port or node.
func (b *Backend) Ensure(ctx context.Context, spec orchestrator.EngineSpec) error {
	id := spec.EngineID
	if err := checkID(id); err != nil {
		return err
	}
	if spec.HostPort < 1 || spec.HostPort > 65535 {
		return orchestrator.Errorf(orchestrator.CodeInvalidRequest, "engine %s: invalid host port %d", id, spec.HostPort)
	}
	node := spec.Node
	if node == "" {
		node = b.cfg.Node
	} else if node != b.cfg.Node {
		return orchestrator.Errorf(orchestrator.CodeInvalidRequest, "engine %s is for node %q, this backend serves %q", id, node, b.cfg.Node)
	}
	binary, err := b.resolveBinary(spec.Image)
	if err != nil {
		return fmt.Errorf("ensure engine %s: %w", id, err)
	}
	unlock, err := b.locks.lock(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()

	if err := os.MkdirAll(b.engineDir(id), 0o700); err != nil {
		return fmt.Errorf("ensure engine %s: %w", id, err)
	}
	if err := b.ensureVolumeLocked(id); err != nil {
		return fmt.Errorf("ensure engine %s: %w", id, err)
	}

	want := specRecord{
		EngineID:  id,
		ProductID: spec.ProductID,
		Node:      node,
		Image:     spec.Image,
		Binary:    binary,
		HostPort:  spec.HostPort,
		Env:       b.engineEnv(id, spec),
		Labels: map[string]string{
			orchestrator.LabelManaged:   "true",
			orchestrator.LabelEngineID:  id,
			orchestrator.LabelProductID: spec.ProductID,
			orchestrator.LabelNode:      node,
		},
	}
	have, err := b.readSpec(id)
	switch {
	case err == nil && have.sameConfig(want):
		return nil // adopt
	case err == nil:
		b.log.Info("replacing engine container", "engine_id", id)
	case !errors.Is(err, fs.ErrNotExist):
		b.log.Warn("replacing unreadable engine container", "engine_id", id, "error", err)
	}
	// Whatever runs under the old record (or without one) goes.
	if err := b.removeContainerLocked(ctx, id, true); err != nil {
		return fmt.Errorf("ensure engine %s: replace container: %w", id, err)
	}
	want.CreatedAt = time.Now().UTC()
	if err := writeJSON(b.path(id, fileSpec), want); err != nil {
		return fmt.Errorf("ensure engine %s: %w", id, err)
	}
	return nil
}

// engineEnv is the environment an engine runs with (besides PATH, HOME and
// TMPDIR): spec.Env with the real data and catalog paths and the listen
// address.
func (b *Backend) engineEnv(id string, spec orchestrator.EngineSpec) map[string]string {
	env := make(map[string]string, len(spec.Env)+3)
	for k, v := range spec.Env {
		env[k] = v
	}
	env["SQLITE_DB_PATH"] = filepath.Join(b.DataDir(id), dbFileName)
	if b.cfg.CatalogMountPath != "" {
		env["CATALOG_DIR"] = b.cfg.CatalogMountPath
	}
	env["ENGINE_LISTEN_ADDR"] = "127.0.0.1:" + strconv.Itoa(spec.HostPort)
	return env
}

// resolveBinary picks the executable for image.
func (b *Backend) resolveBinary(image string) (string, error) {
	if filepath.IsAbs(image) && isExecutable(image) {
		return filepath.Clean(image), nil
	}
	if b.cfg.EngineBinary == "" {
		return "", fmt.Errorf("image %q is not an executable path and no engine binary is configured: %w", image, orchestrator.ErrImageUnavailable)
	}
	if !isExecutable(b.cfg.EngineBinary) {
		return "", fmt.Errorf("engine binary %s is not an executable file: %w", b.cfg.EngineBinary, orchestrator.ErrImageUnavailable)
	}
	return b.cfg.EngineBinary, nil
}

// Start starts the engine's process. Starting a running engine is a no-op;
// starting a paused one unpauses it. Errors: NOT_FOUND when the engine has
// no container (Ensure first).
func (b *Backend) Start(ctx context.Context, id string) error {
	unlock, err := b.lockEngine(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()

	spec, err := b.readSpec(id)
	if errors.Is(err, fs.ErrNotExist) {
		return orchestrator.Errorf(orchestrator.CodeNotFound, "engine %s has no container", id)
	}
	if err != nil {
		return fmt.Errorf("start engine %s: %w", id, err)
	}
	if rec, ok, err := b.readPid(id); err != nil {
		return fmt.Errorf("start engine %s: %w", id, err)
	} else if ok {
		if alive, _ := b.probe(rec); alive {
			return b.unpauseLocked(id, rec)
		}
	}
	if err := b.ensureVolumeLocked(id); err != nil {
		return fmt.Errorf("start engine %s: %w", id, err)
	}
	if !isExecutable(spec.Binary) {
		return fmt.Errorf("start engine %s: engine binary %s is not an executable file", id, spec.Binary)
	}

	// The engine would exit at once on a port another program holds: say
	// so, so that the workers move it (a race with that program remains,
	// and ends in a boot timeout like any engine that exits).
	if ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(spec.HostPort)); err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return fmt.Errorf("start engine %s: %w: %w", id, orchestrator.ErrPortUnavailable, err)
		}
	} else {
		ln.Close()
	}

	logFile, err := b.openLog(id)
	if err != nil {
		return fmt.Errorf("start engine %s: %w", id, err)
	}
	now := time.Now().UTC()
	fmt.Fprintf(logFile, "--- %s subprocess backend: starting %s (image %s)\n", now.Format(time.RFC3339Nano), spec.Binary, spec.Image)

	cmd := exec.Command(spec.Binary)
	cmd.Dir = b.engineDir(id)
	cmd.Env = b.childEnv(spec.Env)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	// Own process group: signals go to the engine and whatever it spawns,
	// and a ^C at the orchestrator's terminal does not reach the engines.
	// No Pdeathsig: engines outlive the orchestrator process.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	err = cmd.Start()
	logFile.Close() // the child has its own descriptor
	if err != nil {
		return fmt.Errorf("start engine %s: %w", id, err)
	}
	rec := pidRecord{PID: cmd.Process.Pid, StartedAt: now}
	if b.procfs {
		// The child cannot be reaped before reap runs, so its stat exists.
		if st, err := readProcStat(rec.PID); err == nil {
			rec.StartTicks = st.startTicks
		}
	}
	c := &child{rec: rec, done: make(chan struct{})}
	b.childMu.Lock()
	b.children[id] = c
	b.childMu.Unlock()
	go b.reap(id, cmd, c)

	if err := b.removeFiles(id, fileStopped, filePaused, fileExit); err != nil {
		b.log.Warn("clear engine state files", "engine_id", id, "error", err)
	}
	if err := writeJSON(b.path(id, filePid), rec); err != nil {
		_ = signalGroup(rec.PID, syscall.SIGKILL)
		return fmt.Errorf("start engine %s: record pid: %w", id, err)
	}
	b.log.Info("engine started", "engine_id", id, "pid", rec.PID, "port", spec.HostPort, "image", spec.Image)
	b.emit(id, "start", 0, now)
	return nil
}

// childEnv turns an engine environment into a process environment.
func (b *Backend) childEnv(env map[string]string) []string {
	out := make([]string, 0, len(env)+len(b.inherit))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	for _, kv := range b.inherit {
		k, _, _ := strings.Cut(kv, "=")
		if _, ok := env[k]; !ok {
			out = append(out, kv)
		}
	}
	sort.Strings(out)
	return out
}

// openLog opens engine.log for appending, rotating it first when large.
func (b *Backend) openLog(id string) (*os.File, error) {
	p := b.path(id, fileLog)
	if fi, err := os.Stat(p); err == nil && fi.Size() > maxLogBytes {
		_ = os.Rename(p, b.path(id, fileLogOld))
	}
	return os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
}

// Stop sends SIGTERM to the engine's process group, waits up to grace,
// then sends SIGKILL. Stopping a stopped, crashed, never-started or missing
// engine is a no-op. A paused engine is resumed so it can handle SIGTERM.
// When ctx ends before the engine is gone, Stop returns ctx's error (the
// engine has received SIGTERM).
func (b *Backend) Stop(ctx context.Context, id string, grace time.Duration) error {
	unlock, err := b.lockEngine(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()

	if _, ok, err := b.readPid(id); err != nil {
		return fmt.Errorf("stop engine %s: %w", id, err)
	} else if !ok {
		return nil
	}
	found, err := b.terminateLocked(ctx, id, grace)
	if err != nil {
		return fmt.Errorf("stop engine %s: %w", id, err)
	}
	now := time.Now().UTC()
	if err := atomicfile.Write(b.path(id, fileStopped), []byte(now.Format(time.RFC3339Nano)+"\n")); err != nil {
		return fmt.Errorf("stop engine %s: %w", id, err)
	}
	if err := b.removeFiles(id, filePid, filePaused); err != nil {
		return fmt.Errorf("stop engine %s: %w", id, err)
	}
	if found {
		b.log.Info("engine stopped", "engine_id", id)
		b.emit(id, "stop", 0, now)
	}
	return nil
}

// terminateLocked stops the engine's recorded process if it is alive:
// SIGTERM (and SIGCONT, in case it is paused), up to grace, SIGKILL. It
// records the exit and reports whether there was a live process. For a
// process this Backend did not start it emits "die" itself (the reaper
// does it for children).
func (b *Backend) terminateLocked(ctx context.Context, id string, grace time.Duration) (bool, error) {
	rec, ok, err := b.readPid(id)
	if err != nil || !ok {
		return false, err
	}
	if alive, _ := b.probe(rec); !alive {
		return false, nil
	}
	c := b.childFor(id, rec)
	if err := signalGroup(rec.PID, syscall.SIGTERM); err != nil {
		return true, fmt.Errorf("signal engine: %w", err)
	}
	_ = signalGroup(rec.PID, syscall.SIGCONT)
	killed := false
	if !b.waitDead(ctx, rec, c, grace) {
		if err := ctx.Err(); err != nil {
			return true, err
		}
		b.log.Warn("engine ignored SIGTERM, killing", "engine_id", id, "pid", rec.PID, "grace", grace.String())
		if err := signalGroup(rec.PID, syscall.SIGKILL); err != nil {
			return true, fmt.Errorf("kill engine: %w", err)
		}
		killed = true
		if !b.waitDead(context.WithoutCancel(ctx), rec, c, killWait) {
			return true, fmt.Errorf("engine process %d survived SIGKILL", rec.PID)
		}
	}
	// Whatever the engine spawned in its group goes with it.
	_ = signalGroup(rec.PID, syscall.SIGKILL)

	code := -1
	switch {
	case c != nil:
		code = c.code
	case killed:
		code = 128 + int(syscall.SIGKILL)
	}
	now := time.Now().UTC()
	if e, ok := b.readExit(id); !ok || !e.of(rec) {
		if err := writeJSON(b.path(id, fileExit), exitRecord{
			PID: rec.PID, StartTicks: rec.StartTicks, ExitCode: code, FinishedAt: now,
		}); err != nil {
			b.log.Warn("record engine exit", "engine_id", id, "error", err)
		}
	}
	if c == nil {
		b.emit(id, "die", code, now)
	}
	return true, nil
}

// removeContainerLocked stops the engine's process and removes its
// container files, keeping the data directory (and the log if keepLog).
func (b *Backend) removeContainerLocked(ctx context.Context, id string, keepLog bool) error {
	if _, err := b.terminateLocked(ctx, id, removeGrace); err != nil {
		return err
	}
	names := []string{fileSpec, filePid, fileStopped, filePaused, fileExit}
	if !keepLog {
		names = append(names, fileLog, fileLogOld)
	}
	return b.removeFiles(id, names...)
}

// RemoveContainer stops the engine's process (SIGTERM, 2 s, SIGKILL) and
// removes its container record and log; the data directory stays. A missing
// engine is a no-op.
func (b *Backend) RemoveContainer(ctx context.Context, id string) error {
	unlock, err := b.lockEngine(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	if !exists(b.engineDir(id)) {
		return nil
	}
	if err := b.removeContainerLocked(ctx, id, false); err != nil {
		return fmt.Errorf("remove engine %s container: %w", id, err)
	}
	_ = os.Remove(b.engineDir(id)) // only if nothing (no volume) is left
	return nil
}

// RemoveVolume removes the engine's data directory (and the engine's
// directory once empty). A missing volume is a no-op. Like the Docker
// backend, it first removes the engine's container if there still is one
// (the process is stopped: SIGTERM, 2 s, SIGKILL).
func (b *Backend) RemoveVolume(ctx context.Context, id string) error {
	unlock, err := b.lockEngine(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	dir := b.engineDir(id)
	if !exists(dir) {
		return nil
	}
	if err := b.removeContainerLocked(ctx, id, false); err != nil {
		return fmt.Errorf("remove engine %s volume: remove container: %w", id, err)
	}
	var errs []error
	for _, n := range []string{dirData, dirDataNew, dirDataOld} {
		errs = append(errs, os.RemoveAll(b.path(id, n)))
	}
	errs = append(errs, b.removeTemps(id), b.removeFiles(id, fileVolume))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("remove engine %s volume: %w", id, err)
	}
	_ = os.Remove(dir) // only if empty
	return nil
}

// Inspect reports the engine's runtime: missing without a container,
// created before the first Start, running or paused while its process
// lives, exited after a Stop or a crash (ExitCode -1 when unknown).
func (b *Backend) Inspect(ctx context.Context, id string) (orchestrator.RuntimeInfo, error) {
	if err := checkID(id); err != nil {
		return orchestrator.RuntimeInfo{}, err
	}
	if err := ctx.Err(); err != nil {
		return orchestrator.RuntimeInfo{}, err
	}
	spec, err := b.readSpec(id)
	if errors.Is(err, fs.ErrNotExist) {
		return orchestrator.RuntimeInfo{EngineID: id, State: orchestrator.RuntimeMissing}, nil
	}
	if err != nil {
		return orchestrator.RuntimeInfo{}, fmt.Errorf("inspect engine %s: %w", id, err)
	}
	info, err := b.inspect(id, spec)
	if err != nil {
		return orchestrator.RuntimeInfo{}, fmt.Errorf("inspect engine %s: %w", id, err)
	}
	return info, nil
}

func (b *Backend) inspect(id string, spec specRecord) (orchestrator.RuntimeInfo, error) {
	info := orchestrator.RuntimeInfo{
		EngineID:  id,
		ProductID: spec.ProductID,
		Name:      orchestrator.ContainerName(id),
		State:     orchestrator.RuntimeCreated,
		Image:     spec.Image,
		HostPort:  spec.HostPort,
		CreatedAt: spec.CreatedAt,
	}
	rec, ok, err := b.readPid(id)
	if err != nil {
		return info, err
	}
	if ok {
		alive, stopped := b.probe(rec)
		switch {
		case alive && (stopped || exists(b.path(id, filePaused))):
			info.State = orchestrator.RuntimePaused
		case alive:
			info.State = orchestrator.RuntimeRunning
		default:
			info.State = orchestrator.RuntimeExited
			info.ExitCode = -1
			if c := b.childFor(id, rec); c != nil && isClosed(c.done) {
				info.ExitCode = c.code
			} else if e, ok := b.readExit(id); ok && e.of(rec) {
				info.ExitCode = e.ExitCode
			}
		}
		return info, nil
	}
	if exists(b.path(id, fileStopped)) {
		info.State = orchestrator.RuntimeExited
		info.ExitCode = -1
		if e, ok := b.readExit(id); ok {
			info.ExitCode = e.ExitCode
		}
	}
	return info, nil
}

func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// List returns the engines recorded for this node and every data directory.
func (b *Backend) List(ctx context.Context) ([]orchestrator.RuntimeInfo, []orchestrator.VolumeInfo, error) {
	ents, err := os.ReadDir(filepath.Join(b.root, enginesDir))
	if err != nil {
		return nil, nil, fmt.Errorf("list engines: %w", err)
	}
	var rts []orchestrator.RuntimeInfo
	var vols []orchestrator.VolumeInfo
	for _, e := range ents {
		if err := ctx.Err(); err != nil {
			return nil, nil, err
		}
		id := e.Name()
		if !e.IsDir() || !validID(id) {
			continue
		}
		if spec, err := b.readSpec(id); err == nil {
			if spec.Node == b.cfg.Node {
				info, err := b.inspect(id, spec)
				if err != nil {
					b.log.Warn("list: inspect engine", "engine_id", id, "error", err)
				} else {
					rts = append(rts, info)
				}
			}
		} else if !errors.Is(err, fs.ErrNotExist) {
			b.log.Warn("list: read engine spec", "engine_id", id, "error", err)
		}
		if v, ok := b.volumeInfo(id); ok {
			vols = append(vols, v)
		}
	}
	return rts, vols, nil
}

func (b *Backend) volumeInfo(id string) (orchestrator.VolumeInfo, bool) {
	for _, n := range []string{dirData, dirDataNew, dirDataOld} {
		fi, err := os.Stat(b.path(id, n))
		if err != nil || !fi.IsDir() {
			continue
		}
		v := orchestrator.VolumeInfo{EngineID: id, Name: orchestrator.VolumeName(id), CreatedAt: fi.ModTime().UTC()}
		var rec volumeRecord
		if err := readJSON(b.path(id, fileVolume), &rec); err == nil {
			v.CreatedAt = rec.CreatedAt
		}
		return v, true
	}
	return orchestrator.VolumeInfo{}, false
}

// Pause freezes the engine's process group (SIGSTOP) and waits until it is
// stopped, so its data directory can be copied consistently. Pausing a
// paused engine is a no-op, and so is pausing a missing, created or exited
// one (nothing writes its data then), as with the Docker backend.
func (b *Backend) Pause(ctx context.Context, id string) error {
	unlock, err := b.lockEngine(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	rec, ok, err := b.readPid(id)
	if err != nil {
		return fmt.Errorf("pause engine %s: %w", id, err)
	}
	if !ok {
		return nil
	}
	if alive, _ := b.probe(rec); !alive {
		return nil
	}
	// Marker first: a crash right after SIGSTOP still leaves a record that
	// Unpause (or Start) acts on.
	if err := atomicfile.Write(b.path(id, filePaused), []byte(time.Now().UTC().Format(time.RFC3339Nano)+"\n")); err != nil {
		return fmt.Errorf("pause engine %s: %w", id, err)
	}
	if err := signalGroup(rec.PID, syscall.SIGSTOP); err != nil {
		return fmt.Errorf("pause engine %s: %w", id, err)
	}
	if !b.procfs {
		return nil
	}
	deadline := time.Now().Add(2 * time.Second)
	for !allStopped(rec.PID) {
		if alive, _ := b.probe(rec); !alive {
			return orchestrator.Errorf(orchestrator.CodeEngineNotRunning, "engine %s exited while pausing", id)
		}
		if time.Now().After(deadline) {
			b.log.Warn("engine not stopped yet after SIGSTOP", "engine_id", id, "pid", rec.PID)
			return nil
		}
		time.Sleep(2 * time.Millisecond)
	}
	return nil
}

// Unpause resumes a paused engine (SIGCONT). Unpausing an engine that is
// not paused, not running or missing is a no-op.
func (b *Backend) Unpause(ctx context.Context, id string) error {
	unlock, err := b.lockEngine(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	rec, ok, err := b.readPid(id)
	if err != nil {
		return fmt.Errorf("unpause engine %s: %w", id, err)
	}
	if !ok {
		return b.removeFiles(id, filePaused)
	}
	if alive, _ := b.probe(rec); !alive {
		return b.removeFiles(id, filePaused)
	}
	return b.unpauseLocked(id, rec)
}

func (b *Backend) unpauseLocked(id string, rec pidRecord) error {
	_, stopped := b.probe(rec)
	if !stopped && !exists(b.path(id, filePaused)) {
		return nil
	}
	if err := signalGroup(rec.PID, syscall.SIGCONT); err != nil {
		return fmt.Errorf("unpause engine %s: %w", id, err)
	}
	if err := b.removeFiles(id, filePaused); err != nil {
		return fmt.Errorf("unpause engine %s: %w", id, err)
	}
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		if _, stopped := b.probe(rec); !stopped {
			break
		}
		time.Sleep(time.Millisecond)
	}
	return nil
}
