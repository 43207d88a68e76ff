package e2e_test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/backend/subprocess"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
)

// procFleet runs the real orchestrator binary as separate processes on one
// database: what a deployment with several replicas looks like.
type procFleet struct {
	t       *testing.T
	env     []string
	dbURL   string
	dataDir string
	logPath string
}

func newProcFleet(t *testing.T, extraEnv ...string) *procFleet {
	t.Helper()
	dbURL := testenv.DB(t)
	portMin := freeRange(t, 100)
	data := t.TempDir()
	env := append(os.Environ(),
		"ORCH_DATABASE_URL="+dbURL, "ORCH_MASTER_KEY="+keys.GenerateMasterKey(), "ORCH_ADMIN_KEY="+adminKey,
		"ORCH_ENGINE_BACKEND=subprocess", "ORCH_ENGINE_BINARY="+testenv.EngineBinary(t),
		"ORCH_ENGINE_IMAGE=enginefleet/engine:e2e-1", "ORCH_NODE=procs-"+randHex(3),
		"ORCH_DATA_ROOT_PATH="+filepath.Join(data, "engines"), "ORCH_BACKUP_DIR="+filepath.Join(data, "backups"),
		"ORCH_AUDIT_EXPORT_DIR="+filepath.Join(data, "exports"),
		fmt.Sprintf("ORCH_PORT_MIN=%d", portMin), fmt.Sprintf("ORCH_PORT_MAX=%d", portMin+99),
		"ORCH_METRICS_ADDR=off", "ORCH_BOOT_TIMEOUT_S=20", "ORCH_SHUTDOWN_TIMEOUT_S=30")
	env = append(env, extraEnv...)
	pf := &procFleet{t: t, env: env, dbURL: dbURL, dataDir: data, logPath: filepath.Join(data, "orchestrator.log")}
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(pf.logPath)
			t.Logf("orchestrator logs:\n%s", b)
		}
	})
	t.Cleanup(func() { pf.stopEngines(env) })
	return pf
}

// stopEngines stops the engine processes the fleet's workers started: they
// run in process groups of their own and outlive the orchestrator, so the
// subprocess backend on the fleet's data root removes them (their command
// line names no path a pattern could match).
func (pf *procFleet) stopEngines(env []string) {
	node := ""
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "ORCH_NODE="); ok {
			node = v // the last one wins, as for the processes
		}
	}
	b, err := subprocess.New(subprocess.Config{DataRoot: filepath.Join(pf.dataDir, "engines"), EngineBinary: testenv.EngineBinary(pf.t),
		Node: node}, testenv.Quiet())
	if err != nil {
		return
	}
	(&fleet{Backend: b}).removeEngines()
}

type proc struct {
	cmd  *exec.Cmd
	addr string // API address, "" for workers
	done chan error
}

func freePort(t *testing.T) int { return testenv.FreePort(t) }

// start runs `orchestrator serve --roles=<roles>` with extra environment;
// API roles get a free port.
func (pf *procFleet) start(roles string, extraEnv ...string) *proc {
	pf.t.Helper()
	lf, err := os.OpenFile(pf.logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	require.NoError(pf.t, err)
	p := &proc{done: make(chan error, 1)}
	env := append(append([]string{}, pf.env...), extraEnv...)
	if roles == "api" || roles == "api,worker" {
		p.addr = fmt.Sprintf("127.0.0.1:%d", freePort(pf.t))
		env = append(env, "ORCH_LISTEN_ADDR="+p.addr)
	}
	p.cmd = exec.Command(orchestratorBinary(pf.t), "serve", "--roles="+roles)
	p.cmd.Env = env
	p.cmd.Stdout, p.cmd.Stderr = lf, lf
	require.NoError(pf.t, p.cmd.Start())
	go func() { p.done <- p.cmd.Wait(); lf.Close() }()
	pf.t.Cleanup(func() { p.cmd.Process.Kill() }) //nolint:errcheck
	if p.addr != "" {
		require.Eventually(pf.t, func() bool {
			r, err := http.Get("http://" + p.addr + "/health")
			if err != nil {
				return false
			}
			r.Body.Close()
			return r.StatusCode == 200
		}, 30*time.Second, 50*time.Millisecond, "api %s healthy", p.addr)
	} else if strings.Contains(roles, "worker") {
		// A worker holds its liveness session once River has started
		// (a scheduler-only process has none).
		pool := testenv.Pool(pf.t, pf.dbURL)
		testenv.Await(pf.t, 30*time.Second, "the worker's liveness session", func() error {
			var n int
			if err := pool.QueryRow(context.Background(), `SELECT count(*) FROM worker_sessions WHERE pid = $1`, p.cmd.Process.Pid).Scan(&n); err != nil {
				return err
			}
			return testenv.Check(n == 1, "no session with pid %d", p.cmd.Process.Pid)
		})
	}
	return p
}

// stop sends SIGTERM and returns the exit error once the process drained.
func (p *proc) stop(t *testing.T) error {
	t.Helper()
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	select {
	case err := <-p.done:
		return err
	case <-time.After(60 * time.Second):
		t.Fatal("process did not exit within 60 s of SIGTERM")
		return nil
	}
}

func (p *proc) url() string { return "http://" + p.addr }

// register registers a product through the admin API of p.
func (pf *procFleet) register(p *proc, slug string) string {
	pf.t.Helper()
	r := do(pf.t, "POST", p.url()+"/products/register", map[string]any{"slug": slug, "display_name": slug},
		map[string]string{"X-Admin-Key": adminKey})
	require.Equal(pf.t, 200, r.Status, "%v", r.Body)
	return r.str("platform_api_key")
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
