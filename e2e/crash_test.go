package e2e_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/enginefleet/orchestrator/backend/docker/dockertest"

	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/api"
	"github.com/enginefleet/orchestrator/backend/docker"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/lifecycle"
	"github.com/enginefleet/orchestrator/server"
)

var (
	orchBinOnce sync.Once
	orchBin     string
	orchBinErr  error
)

// orchestratorBinary builds cmd/orchestrator once per test process.
func orchestratorBinary(t *testing.T) string {
	t.Helper()
	orchBinOnce.Do(func() {
		dir, err := os.MkdirTemp("", "orch-e2e-bin-")
		if err != nil {
			orchBinErr = err
			return
		}
		orchBin = filepath.Join(dir, "orchestrator")
		cmd := exec.Command("go", "build", "-o", orchBin, "./cmd/orchestrator")
		cmd.Dir = testenv.RepoRoot(t)
		out, err := cmd.CombinedOutput()
		if err != nil {
			orchBinErr = fmt.Errorf("build orchestrator: %v: %s", err, out)
		}
	})
	require.NoError(t, orchBinErr)
	return orchBin
}

// workerProc is an orchestrator worker in its own process, to be killed.
type workerProc struct {
	cmd *exec.Cmd
	log *os.File
}

func startWorker(t *testing.T, env []string, logPath string) *workerProc {
	t.Helper()
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	require.NoError(t, err)
	cmd := exec.Command(orchestratorBinary(t), "serve", "--roles=worker")
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = lf, lf
	require.NoError(t, cmd.Start())
	return &workerProc{cmd: cmd, log: lf}
}

func (w *workerProc) kill() {
	w.cmd.Process.Signal(syscall.SIGKILL) //nolint:errcheck
	w.cmd.Wait()                          //nolint:errcheck
	w.log.Close()
}

// A worker process SIGKILLed in the middle of provisioning, 10 times in a
// row at different points: afterwards every engine is running or cleanly
// failed, no orphan container or volume exists, no port is held twice.
func TestWorkerKilledMidProvisionDocker(t *testing.T) {
	t.Parallel()
	dockertest.RequireDocker(t)
	image := dockertest.EngineImage(t, "e2e-1")
	dbURL := testenv.DB(t)
	pool := testenv.Pool(t, dbURL)
	node := "e2e-crash-" + randHex(4)
	portMin := freeRange(t, 20)
	master := keys.GenerateMasterKey()
	kr, err := keys.NewKeyring(master, nil)
	require.NoError(t, err)

	be, err := docker.New(docker.Config{Network: e2eNetwork, Node: node, Fleet: fleetID(t, pool)}, testenv.Quiet())
	require.NoError(t, err)
	f := &fleet{t: t, Pool: pool, Backend: be, Node: node}
	t.Cleanup(f.removeEngines)

	// The API role in this process, workers outside.
	p, err := server.New(server.Config{Roles: server.Roles{API: true}, API: api.Config{AdminKey: adminKey},
		Core: lifecycle.Config{DefaultImage: image, PortMin: portMin, PortMax: portMin + 19, Node: node,
			BootTimeout: 10 * time.Second, URLTemplate: "http://127.0.0.1:{port}"}}, pool, kr, nil, testenv.Quiet())
	require.NoError(t, err)
	ctx := context.Background()
	require.NoError(t, p.Start(ctx))
	t.Cleanup(func() { p.Stop(context.Background()) }) //nolint:errcheck
	ts := httptest.NewServer(p.Handler())
	t.Cleanup(ts.Close)
	f.URL = ts.URL
	_, key := f.product("acme", orch.Policy{})

	env := append(os.Environ(),
		"ORCH_DATABASE_URL="+dbURL, "ORCH_MASTER_KEY="+master, "ORCH_ADMIN_KEY="+adminKey,
		"ORCH_ENGINE_BACKEND=docker", "ORCH_ENGINE_IMAGE="+image, "ORCH_NODE="+node,
		"ORCH_ENGINE_NETWORK="+e2eNetwork, "ORCH_BOOT_TIMEOUT_S=10", "ORCH_DATA_ROOT_PATH="+t.TempDir(),
		fmt.Sprintf("ORCH_PORT_MIN=%d", portMin), fmt.Sprintf("ORCH_PORT_MAX=%d", portMin+19),
		"ORCH_METRICS_ADDR=off", "ORCH_LOG_LEVEL=debug")
	logPath := filepath.Join(t.TempDir(), "worker.log")

	for i := 0; i < 10; i++ {
		w := startWorker(t, env, logPath)
		r := f.call("POST", "/engines/provision", key, map[string]any{"user_id": fmt.Sprintf("crash-%d", i)}, "Prefer", "respond-async")
		require.Equal(t, http.StatusAccepted, r.Status, "%v", r.Body)
		// Kill at a different point each time: before pickup, while
		// creating the container, while waiting for health, after.
		time.Sleep(time.Duration(rand.IntN(1200)) * time.Millisecond) // a random kill point, on purpose
		w.kill()
	}
	final := startWorker(t, env, logPath)
	t.Cleanup(final.kill)

	// Jobs cut off by a kill are re-queued as soon as their worker's
	// session is seen dead (seconds, not River's stuck-job rescue): the
	// last worker finishes every provision.
	require.Eventually(t, func() bool {
		var n int
		require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM engines WHERE status NOT IN ('running', 'failed')`).Scan(&n))
		return n == 0
	}, time.Minute, time.Second, "every engine ends running or failed within a minute")

	var rows, running, ports int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE status = 'running'), count(DISTINCT port) FROM engines`).Scan(&rows, &running, &ports))
	require.Equal(t, 10, rows)
	require.Equal(t, rows, ports, "no port held twice")
	t.Logf("after 10 kills: %d running, %d failed", running, rows-running)

	rts, vols, err := be.List(ctx)
	require.NoError(t, err)
	ids := map[string]bool{}
	idRows, err := pool.Query(ctx, `SELECT id::text FROM engines`)
	require.NoError(t, err)
	for idRows.Next() {
		var id string
		require.NoError(t, idRows.Scan(&id))
		ids[id] = true
	}
	idRows.Close()
	for _, rt := range rts {
		require.True(t, ids[rt.EngineID], "orphan container %s", rt.Name)
	}
	for _, v := range vols {
		require.True(t, ids[v.EngineID], "orphan volume %s", v.Name)
	}
	require.LessOrEqual(t, len(rts), 10)
	// Every running engine answers its health at its port.
	for i := 0; i < 10; i++ {
		g := f.call("GET", fmt.Sprintf("/engines/crash-%d", i), key, nil)
		if g.str("status") == "running" {
			require.Equal(t, http.StatusOK, engineCall(t, "GET", g.str("url")+"/health", "", nil).Status)
		}
	}
}
