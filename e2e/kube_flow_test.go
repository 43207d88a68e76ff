//go:build kube_e2e

// These whole-orchestrator tests on the kubernetes backend were written
// before the control plane could be built on the machine that wrote them,
// and have not run yet: they stay behind the kube_e2e tag until they pass
// (go test -tags kube_e2e -run Kubernetes ./e2e), then the tag goes and
// make test runs them.

package e2e_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/api"
	"github.com/enginefleet/orchestrator/internal/kubeenv"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/lifecycle"
	"github.com/enginefleet/orchestrator/server"
)

// The whole contract flow on Kubernetes: admit provisions a Pod, claim,
// Service and NetworkPolicy; stop deletes the pod and keeps the brain;
// start, rotate-key, upgrade (the brain follows) and destroy (nothing
// left) as on Docker. The engine really serves, behind its Service name.
func TestContractFlowKubernetes(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{backend: "kubernetes", bootTimeout: time.Minute})
	contractFlow(t, f, kubeenv.AgentImageNext)
}

// Sleep in stop mode on Kubernetes: the pod is deleted, the claim kept,
// and admit with auto_wake brings the engine back with its brain.
func TestIdleSleepStopModeKubernetes(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{backend: "kubernetes", bootTimeout: time.Minute, idleAfter: time.Second, sleepMode: "stop",
		events: true, maxAttempts: 3, backoffBase: time.Second})
	sleepStopWake(t, f)
}

// Worker processes on Kubernetes SIGKILLed at random points of
// provisioning (between any two API calls: Secret, claim, Service,
// NetworkPolicy, Pod, the health wait): afterwards every engine is
// running or cleanly failed, every object in the namespace belongs to an
// engine row, and every running engine answers at its Service's name.
func TestWorkerKilledMidProvisionKubernetes(t *testing.T) {
	t.Parallel()
	dbURL := testenv.DB(t)
	pool := testenv.Pool(t, dbURL)
	node := "e2e-crash-" + randHex(4)
	fleetID := fleetID(t, pool)
	ns, be := kubeFleet(t, node, fleetID, time.Minute)
	env := kubeenv.Require(t)
	master := keys.GenerateMasterKey()
	kr, err := keys.NewKeyring(master, nil)
	require.NoError(t, err)
	f := &fleet{t: t, Pool: pool, Backend: be, Node: node}
	t.Cleanup(f.removeEngines)

	// The API role in this process, workers outside.
	p, err := server.New(server.Config{Roles: server.Roles{API: true}, API: api.Config{AdminKey: adminKey},
		Core: lifecycle.Config{DefaultImage: kubeenv.AgentImage, Node: node, BootTimeout: 30 * time.Second,
			URLTemplate: kubeURLTemplate, NoHostPorts: true, Namespace: ns}}, pool, kr, nil, testenv.Quiet())
	require.NoError(t, err)
	ctx := context.Background()
	require.NoError(t, p.Start(ctx))
	t.Cleanup(func() { p.Stop(context.Background()) }) //nolint:errcheck
	ts := httptest.NewServer(p.Handler())
	t.Cleanup(ts.Close)
	f.URL = ts.URL
	_, key := f.product("acme", orch.Policy{})

	workerEnv := append(os.Environ(),
		"ORCH_DATABASE_URL="+dbURL, "ORCH_MASTER_KEY="+master, "ORCH_ADMIN_KEY="+adminKey,
		"ORCH_ENGINE_BACKEND=kubernetes", "KUBECONFIG="+env.Kubeconfig, "ORCH_KUBE_NAMESPACE="+ns,
		"ORCH_KUBE_STORAGE_CLASS="+kubeenv.StorageClass, "ORCH_KUBE_NODE_SELECTOR="+kubeenv.LabelNodeKind+"=agent",
		"ORCH_KUBE_TOLERATIONS="+kubeenv.AgentTaintKey+":NoSchedule",
		"ORCH_ENGINE_IMAGE="+kubeenv.AgentImage, "ORCH_NODE="+node, "ORCH_BOOT_TIMEOUT_S=30",
		"HTTP_PROXY="+kubeProxy(t), "NO_PROXY=", "ORCH_METRICS_ADDR=off", "ORCH_LOG_LEVEL=debug")
	logPath := filepath.Join(t.TempDir(), "worker.log")
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("worker log:\n%s", lastLines(string(b), 60))
		}
	})

	const n = 8
	for i := 0; i < n; i++ {
		w := startWorker(t, workerEnv, logPath)
		r := f.call("POST", "/engines/provision", key, map[string]any{"user_id": fmt.Sprintf("crash-%d", i)}, "Prefer", "respond-async")
		require.Equal(t, http.StatusAccepted, r.Status, "%v", r.Body)
		// A worker process takes about a second to start and sync its
		// caches: kill it before pickup, among the object writes, while
		// the pod starts, or after.
		time.Sleep(time.Duration(500+rand.IntN(2500)) * time.Millisecond)
		w.kill()
	}
	final := startWorker(t, workerEnv, logPath)
	t.Cleanup(final.kill)

	require.Eventually(t, func() bool {
		var left int
		require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM engines WHERE status NOT IN ('running', 'failed')`).Scan(&left))
		return left == 0
	}, 2*time.Minute, time.Second, "every engine ends running or failed")

	var rows, running, portless int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE status = 'running'),
		count(*) FILTER (WHERE port = 0) FROM engines`).Scan(&rows, &running, &portless))
	require.Equal(t, n, rows)
	require.Equal(t, n, portless, "no host port on kubernetes")
	t.Logf("after %d kills: %d running, %d failed", n, running, rows-running)

	ids := map[string]bool{}
	idRows, err := pool.Query(ctx, `SELECT id::text FROM engines`)
	require.NoError(t, err)
	for idRows.Next() {
		var id string
		require.NoError(t, idRows.Scan(&id))
		ids[id] = true
	}
	idRows.Close()
	rts, vols, err := be.List(ctx)
	require.NoError(t, err)
	for _, rt := range rts {
		require.True(t, ids[rt.EngineID], "orphan engine objects %s", rt.Name)
	}
	for _, v := range vols {
		require.True(t, ids[v.EngineID], "orphan claim %s", v.Name)
	}
	for i := 0; i < n; i++ {
		g := f.call("GET", fmt.Sprintf("/engines/crash-%d", i), key, nil)
		if g.str("status") == "running" {
			require.Equal(t, http.StatusOK, engineCall(t, "GET", g.str("url")+"/health", "", nil).Status)
		}
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Backups and restores on Kubernetes, where no volume can be copied: the
// backup is the running engine's own export, a restore its import (with
// the safety copy and rollback of every backend).
func TestBackupRestoreKubernetes(t *testing.T) {
	t.Parallel()
	backupRestore(t, newFleet(t, fleetOpts{backend: "kubernetes", bootTimeout: time.Minute}))
}

// The restore drill on Kubernetes: memories → backup → destroy (Pod,
// claim, Service gone) → provision again → restore the old engine's
// backup → byte-identical export.
func TestRestoreDrillKubernetes(t *testing.T) {
	t.Parallel()
	restoreDrill(t, newFleet(t, fleetOpts{backend: "kubernetes", bootTimeout: time.Minute}))
}
