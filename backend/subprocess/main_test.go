package subprocess

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
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

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		os.Exit(helperOrchestrator())
	}
	code := m.Run()
	if n := leftoverChildren(); n > 0 {
		fmt.Fprintf(os.Stderr, "FAIL: %d engine processes left running after the tests\n", n)
		code = 1
	}
	os.Exit(code)
}

// leftoverChildren kills and counts live child processes of the test
// binary: every engine a test started is one, so none may outlive the
// tests (each test's cleanup stops its engines).
func leftoverChildren() int {
	me := os.Getpid()
	ents, _ := os.ReadDir("/proc")
	n := 0
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		data, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(data, ')')
		f := strings.Fields(string(data[i+1:]))
		if len(f) < 2 || f[0] == "Z" {
			continue
		}
		if ppid, _ := strconv.Atoi(f[1]); ppid == me {
			fmt.Fprintf(os.Stderr, "leftover process %d: %s\n", pid, data[:i+1])
			syscall.Kill(-pid, syscall.SIGKILL)
			syscall.Kill(pid, syscall.SIGKILL)
			n++
		}
	}
	return n
}

// fleet is one DataRoot with the backends (orchestrator processes) on it.
type fleet struct {
	t        *testing.T
	root     string
	bin      string
	mu       sync.Mutex
	backends []*Backend
}

func newFleet(t *testing.T) *fleet {
	t.Helper()
	f := &fleet{t: t, root: t.TempDir(), bin: testenv.EngineBinary(t)}
	// Registered after TempDir, so it runs before the directory goes.
	t.Cleanup(f.killAll)
	return f
}

func (f *fleet) backend() *Backend {
	f.t.Helper()
	b, err := New(Config{DataRoot: f.root, EngineBinary: f.bin}, testLogger())
	if err != nil {
		f.t.Fatal(err)
	}
	f.mu.Lock()
	f.backends = append(f.backends, b)
	f.mu.Unlock()
	return b
}

func testLogger() *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
}

// killAll kills every engine process recorded under the fleet's root.
func (f *fleet) killAll() {
	b, err := New(Config{DataRoot: f.root}, nil)
	if err != nil {
		return
	}
	ents, _ := os.ReadDir(filepath.Join(f.root, enginesDir))
	for _, e := range ents {
		rec, ok, _ := b.readPid(e.Name())
		if !ok {
			continue
		}
		if alive, _ := b.probe(rec); alive {
			signalGroup(rec.PID, syscall.SIGKILL)
			b.waitDead(context.Background(), rec, nil, 5*time.Second)
		}
	}
	// Let the reapers finish writing before the directory is removed.
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, b := range f.backends {
		testenv.Poll(5*time.Second, func() error { //nolint:errcheck // best effort: the directory goes anyway
			b.childMu.Lock()
			defer b.childMu.Unlock()
			return testenv.Check(len(b.children) == 0, "%d children not reaped", len(b.children))
		})
	}
}

// groupMembers counts live (not zombie) processes in process group pgid.
func groupMembers(pgid int) int {
	ents, _ := os.ReadDir("/proc")
	n := 0
	for _, e := range ents {
		data, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(data, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(data[i+1:]))
		if len(f) > 2 && f[0] != "Z" && f[2] == strconv.Itoa(pgid) {
			n++
		}
	}
	return n
}

func keyHash(key string) string {
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:])
}

func freePort(t testing.TB) int { return testenv.FreePort(t) }

var idSeq struct {
	sync.Mutex
	n int
}

func newID() string {
	idSeq.Lock()
	defer idSeq.Unlock()
	idSeq.n++
	return fmt.Sprintf("0000000-test-%04d-%d", idSeq.n, time.Now().UnixNano()%1e6)
}

func testSpec(t testing.TB, id string) orchestrator.EngineSpec {
	return orchestrator.EngineSpec{
		EngineID:  id,
		ProductID: "product-1",
		Image:     "enginefleet/engine:1.2",
		HostPort:  freePort(t),
		Env: map[string]string{
			"ENGINE_KEY_HASH": keyHash("key-" + id),
			"SQLITE_DB_PATH":  "/data/brain.sqlite", // overridden by the backend
			"CATALOG_DIR":     "/catalog",
		},
	}
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func mustEnsureStart(t *testing.T, b *Backend, spec orchestrator.EngineSpec) {
	t.Helper()
	ctx := ctxT(t)
	if err := b.Ensure(ctx, spec); err != nil {
		t.Fatalf("Ensure: %v", err)
	}
	if err := b.Start(ctx, spec.EngineID); err != nil {
		t.Fatalf("Start: %v", err)
	}
	waitHealthy(t, b, spec)
}

var shortClient = &http.Client{Timeout: 2 * time.Second}

// health returns nil when GET /health answers 200 {"status":"ok"}.
func health(port int, timeout time.Duration) error {
	c := &http.Client{Timeout: timeout}
	resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/health", port))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var body struct {
		Status string `json:"status"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return err
	}
	if resp.StatusCode != 200 || body.Status != "ok" {
		return fmt.Errorf("health: %d %q", resp.StatusCode, body.Status)
	}
	return nil
}

func waitHealthy(t testing.TB, b *Backend, spec orchestrator.EngineSpec) {
	t.Helper()
	err := testenv.Poll(20*time.Second, func() error { return health(spec.HostPort, time.Second) })
	if err != nil {
		logData, _ := os.ReadFile(b.LogPath(spec.EngineID))
		t.Fatalf("engine %s not healthy: %v\nlog:\n%s", spec.EngineID, err, logData)
	}
}

// waitScanned waits for the first scan of b's adopted-engine watcher
// (started by b's first Events): the engines alive before Events are then
// known to it, so their death is reported.
func waitScanned(t testing.TB, b *Backend) {
	t.Helper()
	testenv.Await(t, 5*time.Second, "the adopted-engine watcher's first scan", func() error {
		return testenv.Check(b.scans.Load() > 0, "no scan yet")
	})
}

func engineReq(t testing.TB, spec orchestrator.EngineSpec, method, path string, body any) []byte {
	t.Helper()
	var r io.Reader
	if body != nil {
		data, _ := json.Marshal(body)
		r = bytes.NewReader(data)
	}
	req, err := http.NewRequest(method, fmt.Sprintf("http://127.0.0.1:%d%s", spec.HostPort, path), r)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-Engine-Key", "key-"+spec.EngineID)
	req.Header.Set("Content-Type", "application/json")
	resp, err := shortClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		t.Fatalf("%s %s: %d %s", method, path, resp.StatusCode, data)
	}
	return data
}

func addMemory(t testing.TB, spec orchestrator.EngineSpec, content string) {
	t.Helper()
	engineReq(t, spec, http.MethodPost, "/memories", map[string]string{"content": content})
}

func exportBrain(t testing.TB, spec orchestrator.EngineSpec) string {
	t.Helper()
	return string(engineReq(t, spec, http.MethodGet, "/memory/export", nil))
}

func mustInspect(t testing.TB, b *Backend, id string) orchestrator.RuntimeInfo {
	t.Helper()
	info, err := b.Inspect(context.Background(), id)
	if err != nil {
		t.Fatalf("Inspect: %v", err)
	}
	return info
}

func wantState(t testing.TB, b *Backend, id string, want orchestrator.RuntimeState) orchestrator.RuntimeInfo {
	t.Helper()
	info := mustInspect(t, b, id)
	if info.State != want {
		t.Fatalf("engine %s state = %s, want %s", id, info.State, want)
	}
	return info
}

func pidOf(t testing.TB, b *Backend, id string) pidRecord {
	t.Helper()
	rec, ok, err := b.readPid(id)
	if err != nil || !ok {
		t.Fatalf("no pid record for %s: %v", id, err)
	}
	return rec
}

// waitEvent waits for an event of kind for id.
func waitEvent(t testing.TB, ch <-chan orchestrator.RuntimeEvent, id, kind string, within time.Duration) orchestrator.RuntimeEvent {
	t.Helper()
	timer := time.NewTimer(within)
	defer timer.Stop()
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				t.Fatalf("event channel closed waiting for %s %s", kind, id)
			}
			if ev.EngineID == id && ev.Kind == kind {
				return ev
			}
		case <-timer.C:
			t.Fatalf("no %q event for %s within %s", kind, id, within)
		}
	}
}

// helperEnv makes the test binary act as a short-lived orchestrator: it
// starts the engine described by the JSON in the variable and exits.
const helperEnv = "SUBPROCESS_TEST_HELPER_ORCHESTRATOR"

type helperArgs struct {
	Root, Binary string
	Spec         orchestrator.EngineSpec
}

func helperOrchestrator() int {
	var args helperArgs
	if err := json.Unmarshal([]byte(os.Getenv(helperEnv)), &args); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	b, err := New(Config{DataRoot: args.Root, EngineBinary: args.Binary}, nil)
	if err == nil {
		err = b.Ensure(context.Background(), args.Spec)
	}
	if err == nil {
		err = b.Start(context.Background(), args.Spec.EngineID)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0 // exits at once, leaving the engine running
}
