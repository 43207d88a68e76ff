package subprocess

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
)

func TestEnsureStartHealthyAndAdopt(t *testing.T) {
	f := newFleet(t)
	b := f.backend()
	ctx := ctxT(t)
	spec := testSpec(t, newID())
	id := spec.EngineID

	wantState(t, b, id, orchestrator.RuntimeMissing)
	if err := b.Ensure(ctx, spec); err != nil {
		t.Fatal(err)
	}
	info := wantState(t, b, id, orchestrator.RuntimeCreated)
	if info.Image != spec.Image || info.HostPort != spec.HostPort || info.ProductID != spec.ProductID ||
		info.Name != "engine-"+id || info.CreatedAt.IsZero() {
		t.Errorf("Inspect = %+v", info)
	}
	if err := b.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, b, spec)
	wantState(t, b, id, orchestrator.RuntimeRunning)
	rec := pidOf(t, b, id)

	// The engine's brain is in the data dir, not at the caller's /data path.
	if _, err := os.Stat(filepath.Join(b.DataDir(id), "brain.sqlite")); err != nil {
		t.Errorf("brain not in data dir: %v", err)
	}
	// Its environment is spec.Env plus the listen address and PATH/HOME/TMPDIR.
	environ, err := os.ReadFile("/proc/" + itoa(rec.PID) + "/environ")
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{}
	for _, kv := range strings.Split(string(environ), "\x00") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
	}
	if env["ENGINE_LISTEN_ADDR"] != "127.0.0.1:"+itoa(spec.HostPort) ||
		env["SQLITE_DB_PATH"] != filepath.Join(b.DataDir(id), "brain.sqlite") ||
		env["ENGINE_KEY_HASH"] != spec.Env["ENGINE_KEY_HASH"] || env["CATALOG_DIR"] != "/catalog" {
		t.Errorf("engine env = %v", env)
	}
	for k := range env {
		switch k {
		case "ENGINE_LISTEN_ADDR", "SQLITE_DB_PATH", "ENGINE_KEY_HASH", "CATALOG_DIR", "PATH", "HOME", "TMPDIR":
		default:
			t.Errorf("unexpected variable %s in the engine's environment", k)
		}
	}

	// Ensure again with the same spec adopts: same process, still healthy.
	if err := b.Ensure(ctx, spec); err != nil {
		t.Fatal(err)
	}
	if err := b.Start(ctx, id); err != nil { // no-op
		t.Fatal(err)
	}
	if got := pidOf(t, b, id); !got.same(rec) {
		t.Errorf("Ensure+Start of a running engine replaced its process: %d → %d", rec.PID, got.PID)
	}
	if err := health(spec.HostPort, time.Second); err != nil {
		t.Error(err)
	}

	// A second backend on the same root with the same spec adopts too.
	b2 := f.backend()
	if err := b2.Ensure(ctx, spec); err != nil {
		t.Fatal(err)
	}
	if got := pidOf(t, b2, id); !got.same(rec) {
		t.Errorf("Ensure on a new backend replaced the process")
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

func TestEnsureReplacesChangedSpec(t *testing.T) {
	f := newFleet(t)
	b := f.backend()
	ctx := ctxT(t)
	spec := testSpec(t, newID())
	mustEnsureStart(t, b, spec)
	addMemory(t, spec, "kept across replace")
	before := exportBrain(t, spec)
	old := pidOf(t, b, spec.EngineID)

	// Key rotation: same volume, new environment.
	spec.Env["ENGINE_KEY_HASH_PREVIOUS"] = spec.Env["ENGINE_KEY_HASH"]
	spec.Env["ENGINE_KEY_PREVIOUS_EXPIRES_AT"] = time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	if err := b.Ensure(ctx, spec); err != nil {
		t.Fatal(err)
	}
	wantState(t, b, spec.EngineID, orchestrator.RuntimeCreated)
	if alive, _ := b.probe(old); alive {
		t.Fatal("old process still alive after Ensure replaced the container")
	}
	if err := b.Start(ctx, spec.EngineID); err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, b, spec)
	if got := exportBrain(t, spec); got != before {
		t.Errorf("brain changed across replace:\n%s\nwant\n%s", got, before)
	}
}

func TestNewBackendAdoptsRunningEngine(t *testing.T) {
	f := newFleet(t)
	b1 := f.backend()
	ctx := ctxT(t)
	spec := testSpec(t, newID())
	mustEnsureStart(t, b1, spec)

	// The orchestrator restarts: a new backend on the same data root.
	b2 := f.backend()
	wantState(t, b2, spec.EngineID, orchestrator.RuntimeRunning)
	rts, vols, err := b2.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(rts) != 1 || rts[0].EngineID != spec.EngineID || rts[0].State != orchestrator.RuntimeRunning ||
		rts[0].HostPort != spec.HostPort || rts[0].Image != spec.Image {
		t.Errorf("List runtimes = %+v", rts)
	}
	if len(vols) != 1 || vols[0].EngineID != spec.EngineID || vols[0].Name != "engine-data-"+spec.EngineID || vols[0].CreatedAt.IsZero() {
		t.Errorf("List volumes = %+v", vols)
	}
	// Another node's backend does not list it.
	other, err := New(Config{DataRoot: f.root, EngineBinary: f.bin, Node: "node-2"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rts, _, _ := other.List(ctx); len(rts) != 0 {
		t.Errorf("node-2 lists %+v", rts)
	}

	rec := pidOf(t, b2, spec.EngineID)
	if err := b2.Stop(ctx, spec.EngineID, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if alive, _ := b2.probe(rec); alive {
		t.Fatal("engine alive after Stop")
	}
	info := wantState(t, b2, spec.EngineID, orchestrator.RuntimeExited)
	wantState(t, b1, spec.EngineID, orchestrator.RuntimeExited)
	if info.ExitCode != 0 && info.ExitCode != -1 {
		t.Errorf("exit code after a clean stop = %d", info.ExitCode)
	}
	if err := b2.Stop(ctx, spec.EngineID, time.Second); err != nil { // no-op
		t.Fatal(err)
	}
	// And b2 can start it again.
	if err := b2.Start(ctx, spec.EngineID); err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, b2, spec)
	wantState(t, b1, spec.EngineID, orchestrator.RuntimeRunning)
}

func TestKillNineEmitsDie(t *testing.T) {
	f := newFleet(t)
	b := f.backend()
	ctx, cancel := context.WithCancel(ctxT(t))
	defer cancel()
	// Two subscribers: both get every event.
	ev1, err := b.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ev2, _ := b.Events(ctx)
	spec := testSpec(t, newID())
	mustEnsureStart(t, b, spec)
	waitEvent(t, ev1, spec.EngineID, "start", time.Second)
	waitEvent(t, ev2, spec.EngineID, "start", time.Second)

	rec := pidOf(t, b, spec.EngineID)
	killed := time.Now()
	if err := syscall.Kill(rec.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for _, ch := range []<-chan orchestrator.RuntimeEvent{ev1, ev2} {
		ev := waitEvent(t, ch, spec.EngineID, "die", time.Second)
		if ev.ExitCode != 137 {
			t.Errorf("die exit code = %d, want 137", ev.ExitCode)
		}
		if ev.Time.Before(killed) {
			t.Errorf("event time %v before the kill %v", ev.Time, killed)
		}
	}
	info := wantState(t, b, spec.EngineID, orchestrator.RuntimeExited)
	if info.ExitCode != 137 {
		t.Errorf("Inspect exit code = %d, want 137", info.ExitCode)
	}
	// No auto-restart: still exited a moment later. (Nothing to wait for:
	// the sleep is the moment in which a restart would have happened.)
	time.Sleep(200 * time.Millisecond)
	wantState(t, b, spec.EngineID, orchestrator.RuntimeExited)

	// The channels close when ctx ends.
	cancel()
	for _, ch := range []<-chan orchestrator.RuntimeEvent{ev1, ev2} {
		for range ch {
		}
	}
}

func TestAdoptedEngineDeathIsPolled(t *testing.T) {
	f := newFleet(t)
	b1 := f.backend()
	spec := testSpec(t, newID())
	mustEnsureStart(t, b1, spec)

	b2 := f.backend() // did not start the engine: must poll it
	ctx, cancel := context.WithCancel(ctxT(t))
	defer cancel()
	events, err := b2.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	waitScanned(t, b2) // the watcher has seen it alive
	rec := pidOf(t, b2, spec.EngineID)
	if err := syscall.Kill(rec.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, events, spec.EngineID, "die", 2500*time.Millisecond)
	wantState(t, b2, spec.EngineID, orchestrator.RuntimeExited)

	// A stop through b2 of an adopted engine reports die and stop.
	if err := b2.Start(ctx, spec.EngineID); err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, b2, spec)
	b3 := f.backend()
	ev3, _ := b3.Events(ctx)
	if err := b3.Stop(ctx, spec.EngineID, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, ev3, spec.EngineID, "die", time.Second)
	waitEvent(t, ev3, spec.EngineID, "stop", time.Second)
	// The watcher of b3 does not report that death a second time.
	select {
	case ev := <-ev3:
		if ev.EngineID == spec.EngineID {
			t.Errorf("unexpected event %+v", ev)
		}
	case <-time.After(1500 * time.Millisecond):
	}
}

func TestStopStartKeepsData(t *testing.T) {
	f := newFleet(t)
	b := f.backend()
	ctx := ctxT(t)
	spec := testSpec(t, newID())
	mustEnsureStart(t, b, spec)
	addMemory(t, spec, "remember the milk")
	want := exportBrain(t, spec)

	if err := b.Stop(ctx, spec.EngineID, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	info := wantState(t, b, spec.EngineID, orchestrator.RuntimeExited)
	if info.ExitCode != 0 {
		t.Errorf("exit code after SIGTERM = %d, want 0 (clean shutdown)", info.ExitCode)
	}
	if !exists(b.path(spec.EngineID, fileStopped)) {
		t.Error("no stopped marker")
	}
	if err := health(spec.HostPort, 200*time.Millisecond); err == nil {
		t.Fatal("engine still answers after Stop")
	}
	if err := b.Start(ctx, spec.EngineID); err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, b, spec)
	if got := exportBrain(t, spec); got != want {
		t.Errorf("export after restart:\n%s\nwant\n%s", got, want)
	}
}

func TestStopKillsEngineIgnoringSIGTERM(t *testing.T) {
	f := newFleet(t)
	b := f.backend()
	ctx := ctxT(t)
	// A "binary" that ignores SIGTERM, run through the image-path rule.
	script := filepath.Join(t.TempDir(), "stubborn.sh")
	if err := os.WriteFile(script, []byte("#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 0.05; done\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	spec := testSpec(t, newID())
	spec.Image = script
	if err := b.Ensure(ctx, spec); err != nil {
		t.Fatal(err)
	}
	if err := b.Start(ctx, spec.EngineID); err != nil {
		t.Fatal(err)
	}
	rec := pidOf(t, b, spec.EngineID)
	if exe, _ := os.Readlink("/proc/" + itoa(rec.PID) + "/exe"); !strings.HasSuffix(exe, "sh") && !strings.Contains(exe, "dash") && !strings.Contains(exe, "bash") {
		t.Errorf("engine runs %s, want the image's script interpreter", exe)
	}
	testenv.Await(t, 5*time.Second, "the script ignores SIGTERM (its trap is installed)", func() error {
		return ignoresSignal(rec.PID, syscall.SIGTERM)
	})
	start := time.Now()
	if err := b.Stop(ctx, spec.EngineID, 300*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 300*time.Millisecond || d > 5*time.Second {
		t.Errorf("Stop took %s", d)
	}
	info := wantState(t, b, spec.EngineID, orchestrator.RuntimeExited)
	if info.ExitCode != 137 {
		t.Errorf("exit code = %d, want 137", info.ExitCode)
	}
	// The whole group is gone (the sleep children too).
	if n := groupMembers(rec.PID); n != 0 {
		t.Errorf("%d processes of the engine's group still alive", n)
	}
}

func TestPauseUnpause(t *testing.T) {
	f := newFleet(t)
	b := f.backend()
	ctx := ctxT(t)
	spec := testSpec(t, newID())
	mustEnsureStart(t, b, spec)

	for range 2 { // idempotent
		if err := b.Pause(ctx, spec.EngineID); err != nil {
			t.Fatal(err)
		}
	}
	wantState(t, b, spec.EngineID, orchestrator.RuntimePaused)
	if err := health(spec.HostPort, 300*time.Millisecond); err == nil {
		t.Fatal("paused engine answered /health")
	}
	// A new backend sees it paused too.
	wantState(t, f.backend(), spec.EngineID, orchestrator.RuntimePaused)
	for range 2 {
		if err := b.Unpause(ctx, spec.EngineID); err != nil {
			t.Fatal(err)
		}
	}
	wantState(t, b, spec.EngineID, orchestrator.RuntimeRunning)
	waitHealthy(t, b, spec)

	// Start resumes a paused engine; Stop stops a paused one cleanly.
	if err := b.Pause(ctx, spec.EngineID); err != nil {
		t.Fatal(err)
	}
	if err := b.Start(ctx, spec.EngineID); err != nil {
		t.Fatal(err)
	}
	wantState(t, b, spec.EngineID, orchestrator.RuntimeRunning)
	if err := b.Pause(ctx, spec.EngineID); err != nil {
		t.Fatal(err)
	}
	if err := b.Stop(ctx, spec.EngineID, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	info := wantState(t, b, spec.EngineID, orchestrator.RuntimeExited)
	if info.ExitCode != 0 {
		t.Errorf("exit code of a paused engine stopped with SIGTERM = %d, want 0", info.ExitCode)
	}
	// Pausing or unpausing an exited engine is a no-op.
	if err := b.Pause(ctx, spec.EngineID); err != nil {
		t.Errorf("Pause of an exited engine: %v", err)
	}
	wantState(t, b, spec.EngineID, orchestrator.RuntimeExited)
	if err := b.Unpause(ctx, spec.EngineID); err != nil {
		t.Errorf("Unpause of an exited engine: %v", err)
	}
}

func TestRemoveIdempotent(t *testing.T) {
	f := newFleet(t)
	b := f.backend()
	ctx := ctxT(t)
	spec := testSpec(t, newID())
	id := spec.EngineID
	mustEnsureStart(t, b, spec)
	rec := pidOf(t, b, id)

	for range 2 {
		if err := b.RemoveContainer(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if alive, _ := b.probe(rec); alive {
		t.Fatal("process alive after RemoveContainer")
	}
	wantState(t, b, id, orchestrator.RuntimeMissing)
	rts, vols, err := b.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(rts) != 0 || len(vols) != 1 {
		t.Fatalf("List after RemoveContainer: %+v %+v", rts, vols)
	}
	if _, err := os.Stat(filepath.Join(b.DataDir(id), "brain.sqlite")); err != nil {
		t.Fatalf("RemoveContainer lost the data: %v", err)
	}
	for range 2 {
		if err := b.RemoveVolume(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if exists(b.engineDir(id)) {
		t.Error("engine dir left behind")
	}
	if rts, vols, _ := b.List(ctx); len(rts) != 0 || len(vols) != 0 {
		t.Errorf("List after removal: %+v %+v", rts, vols)
	}
	// Operations on engines that never existed.
	never := newID()
	for name, err := range map[string]error{
		"RemoveContainer": b.RemoveContainer(ctx, never),
		"RemoveVolume":    b.RemoveVolume(ctx, never),
		"Stop":            b.Stop(ctx, never, time.Second),
		"Unpause":         b.Unpause(ctx, never),
	} {
		if err != nil {
			t.Errorf("%s of a missing engine: %v", name, err)
		}
	}
	if err := b.Start(ctx, never); !orchestrator.IsCode(err, orchestrator.CodeNotFound) {
		t.Errorf("Start of a missing engine: %v", err)
	}
	if exists(b.engineDir(never)) {
		t.Error("operations on a missing engine created its directory")
	}
}

func TestRecycledPidIsNotTheEngine(t *testing.T) {
	f := newFleet(t)
	b := f.backend()
	ctx := ctxT(t)
	spec := testSpec(t, newID())
	if err := b.Ensure(ctx, spec); err != nil {
		t.Fatal(err)
	}
	// A pid file naming a live process (this test) with another start time.
	st, err := readProcStat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	rec := pidRecord{PID: os.Getpid(), StartTicks: st.startTicks + 1, StartedAt: time.Now()}
	if err := writeJSON(b.path(spec.EngineID, filePid), rec); err != nil {
		t.Fatal(err)
	}
	wantState(t, b, spec.EngineID, orchestrator.RuntimeExited)
	// Stop, Pause and RemoveContainer must not signal it (we would stop
	// or die).
	if err := b.Pause(ctx, spec.EngineID); err != nil {
		t.Fatal(err)
	}
	wantState(t, b, spec.EngineID, orchestrator.RuntimeExited)
	if err := b.Stop(ctx, spec.EngineID, 0); err != nil {
		t.Fatal(err)
	}
	if err := b.RemoveContainer(ctx, spec.EngineID); err != nil {
		t.Fatal(err)
	}
}

func TestConcurrentEngines(t *testing.T) {
	f := newFleet(t)
	b := f.backend()
	ctx := ctxT(t)
	const n = 8
	specs := make([]orchestrator.EngineSpec, n)
	for i := range specs {
		specs[i] = testSpec(t, newID())
	}
	var wg sync.WaitGroup
	errs := make(chan error, n*4)
	for _, spec := range specs {
		// Several concurrent Ensure+Start of the same engine: one process.
		for range 4 {
			wg.Go(func() {
				if err := b.Ensure(ctx, spec); err != nil {
					errs <- err
					return
				}
				if err := b.Start(ctx, spec.EngineID); err != nil {
					errs <- err
				}
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for _, spec := range specs {
		waitHealthy(t, b, spec)
		wantState(t, b, spec.EngineID, orchestrator.RuntimeRunning)
	}
	rts, vols, err := b.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(rts) != n || len(vols) != n {
		t.Errorf("List: %d runtimes, %d volumes, want %d", len(rts), len(vols), n)
	}
	if got := countChildren(); got != n {
		t.Errorf("%d engine processes running, want %d", got, n)
	}
	for _, spec := range specs {
		wg.Go(func() {
			if err := b.Stop(ctx, spec.EngineID, 10*time.Second); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if got := countChildren(); got != 0 {
		t.Errorf("%d engine processes running after Stop", got)
	}
}

// countChildren counts live child processes of the test binary.
func countChildren() int {
	me := itoa(os.Getpid())
	ents, _ := os.ReadDir("/proc")
	n := 0
	for _, e := range ents {
		data, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		i := strings.LastIndexByte(string(data), ')')
		if i < 0 {
			continue
		}
		fields := strings.Fields(string(data[i+1:]))
		if len(fields) > 1 && fields[0] != "Z" && fields[1] == me {
			n++
		}
	}
	return n
}

func TestEnsureValidation(t *testing.T) {
	f := newFleet(t)
	b := f.backend()
	ctx := ctxT(t)
	for name, mutate := range map[string]func(*orchestrator.EngineSpec){
		"path id":    func(s *orchestrator.EngineSpec) { s.EngineID = "../x" },
		"empty id":   func(s *orchestrator.EngineSpec) { s.EngineID = "" },
		"port":       func(s *orchestrator.EngineSpec) { s.HostPort = 0 },
		"other node": func(s *orchestrator.EngineSpec) { s.Node = "elsewhere" },
	} {
		spec := testSpec(t, newID())
		mutate(&spec)
		if err := b.Ensure(ctx, spec); !orchestrator.IsCode(err, orchestrator.CodeInvalidRequest) {
			t.Errorf("%s: Ensure = %v, want INVALID_REQUEST", name, err)
		}
	}
	// No binary at all.
	nob, err := New(Config{DataRoot: t.TempDir()}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := nob.Ensure(ctx, testSpec(t, newID())); err == nil {
		t.Error("Ensure without an engine binary succeeded")
	}
	if _, err := New(Config{}, nil); err == nil {
		t.Error("New without a data root succeeded")
	}
}

// TestEngineSurvivesOrchestratorExit starts an engine from another
// process that then exits (an orchestrator worker dying), and adopts it.
func TestEngineSurvivesOrchestratorExit(t *testing.T) {
	f := newFleet(t)
	spec := testSpec(t, newID())
	args, _ := json.Marshal(helperArgs{Root: f.root, Binary: f.bin, Spec: spec})
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+string(args))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("helper orchestrator: %v\n%s", err, out)
	}
	b := f.backend()
	waitHealthy(t, b, spec)
	wantState(t, b, spec.EngineID, orchestrator.RuntimeRunning)
	rec := pidOf(t, b, spec.EngineID)
	ctx, cancel := context.WithCancel(ctxT(t))
	defer cancel()
	events, _ := b.Events(ctx)
	waitScanned(t, b) // the watcher has seen it alive

	// Adopted: Pause/Unpause and Stop work on it.
	if err := b.Pause(ctx, spec.EngineID); err != nil {
		t.Fatal(err)
	}
	wantState(t, b, spec.EngineID, orchestrator.RuntimePaused)
	if err := b.Unpause(ctx, spec.EngineID); err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, b, spec)

	// Its death (it is nobody's child here) is seen by polling.
	if err := syscall.Kill(rec.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	ev := waitEvent(t, events, spec.EngineID, "die", 2500*time.Millisecond)
	if ev.ExitCode != -1 {
		t.Errorf("adopted die exit code = %d, want -1 (unknown)", ev.ExitCode)
	}
	info := wantState(t, b, spec.EngineID, orchestrator.RuntimeExited)
	if info.ExitCode != -1 {
		t.Errorf("Inspect exit code = %d, want -1", info.ExitCode)
	}
	if err := b.Stop(ctx, spec.EngineID, time.Second); err != nil {
		t.Fatal(err)
	}
}

// TestRemoveVolumeRemovesContainer: like the Docker backend, removing the
// volume of an engine that still has a container removes the container.
func TestRemoveVolumeRemovesContainer(t *testing.T) {
	f := newFleet(t)
	b := f.backend()
	ctx := ctxT(t)
	spec := testSpec(t, newID())
	mustEnsureStart(t, b, spec)
	rec := pidOf(t, b, spec.EngineID)
	if err := b.RemoveVolume(ctx, spec.EngineID); err != nil {
		t.Fatal(err)
	}
	if alive, _ := b.probe(rec); alive {
		t.Fatal("engine alive after its volume was removed")
	}
	wantState(t, b, spec.EngineID, orchestrator.RuntimeMissing)
	if exists(b.engineDir(spec.EngineID)) {
		t.Error("engine dir left behind")
	}
}

// ignoresSignal returns nil when process pid ignores sig (per the SigIgn
// mask in /proc/pid/status), else what it found.
func ignoresSignal(pid int, sig syscall.Signal) error {
	status, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(status), "\n") {
		if mask, ok := strings.CutPrefix(line, "SigIgn:"); ok {
			m, err := strconv.ParseUint(strings.TrimSpace(mask), 16, 64)
			if err != nil {
				return err
			}
			return testenv.Check(m&(1<<(uint(sig)-1)) != 0, "SigIgn %s", strings.TrimSpace(mask))
		}
	}
	return fmt.Errorf("no SigIgn in /proc/%d/status", pid)
}
