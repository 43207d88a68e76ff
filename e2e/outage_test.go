package e2e_test

import (
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/enginefleet/orchestrator/backend/docker/dockertest"

	"github.com/moby/moby/client"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/backend/docker"
	"github.com/enginefleet/orchestrator/internal/testenv"
)

// Postgres goes away for a while under a running fleet (API, worker and
// scheduler processes) with operations in flight, then comes back. During
// the outage the API says 503 SERVICE_UNAVAILABLE with Retry-After, never a
// 500; afterwards every process is still up, no operation is lost, every
// engine runs on its own port, synchronous calls are woken by NOTIFY again
// and key rotations reach the API's cache again (its LISTEN reconnected),
// and the scheduler leads again.
func TestPostgresOutage(t *testing.T) {
	t.Parallel()
	// Engines take 1.5 s to boot, so the outage catches provisions mid-way.
	pf := newProcFleet(t, "ORCH_HEALTH_CHECK_INTERVAL_S=1", "ENGINE_BOOT_DELAY_S=1.5", "ORCH_ENGINE_ENV_PASSTHROUGH=ENGINE_BOOT_DELAY_S")
	px := testenv.NewProxy(t, "tcp", hostPort(t, pf.dbURL))
	pf.env = append(pf.env, "ORCH_DATABASE_URL="+px.URL(pf.dbURL))
	apiP, workerP, schedP := pf.start("api"), pf.start("worker"), pf.start("scheduler")
	key := pf.register(apiP, "acme")
	call := func(method, path, key string, body any, hdr ...string) resp {
		h := map[string]string{"X-Platform-Key": key}
		for i := 0; i+1 < len(hdr); i += 2 {
			h[hdr[i]] = hdr[i+1]
		}
		return do(t, method, apiP.url()+path, body, h)
	}

	for i := range 2 {
		r := call("POST", "/engines/provision", key, map[string]any{"user_id": fmt.Sprintf("before-%d", i)})
		require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
	}
	var ops []string
	for i := range 4 {
		r := call("POST", "/engines/provision", key, map[string]any{"user_id": fmt.Sprintf("during-%d", i)}, "Prefer", "respond-async")
		require.Equal(t, http.StatusAccepted, r.Status, "%v", r.Body)
		ops = append(ops, r.str("operation_id"))
	}

	// A synchronous call in flight rides the outage out: cut once its
	// engine row is committed (checked around the proxy).
	pool := testenv.Pool(t, pf.dbURL)
	syncDone := make(chan resp, 1)
	go func() {
		syncDone <- call("POST", "/engines/provision", key, map[string]any{"user_id": "riding"})
	}()
	require.Eventually(t, func() bool {
		var n int
		require.NoError(t, pool.QueryRow(t.Context(), `SELECT count(*) FROM engines WHERE user_id = 'riding'`).Scan(&n))
		return n == 1
	}, 10*time.Second, 5*time.Millisecond)

	px.Cut()
	cutAt := time.Now()
	require.Eventually(t, func() bool {
		r := do(t, "GET", apiP.url()+"/health", nil, nil)
		return r.Status == http.StatusServiceUnavailable
	}, 10*time.Second, 100*time.Millisecond, "/health says 503 while Postgres is away")
	for _, path := range []string{"/engines/before-0/admit", "/engines/provision"} {
		r := call("POST", path, key, map[string]any{"user_id": "nobody"})
		assert.Equal(t, http.StatusServiceUnavailable, r.Status, "%s: %v", path, r.Body)
		assert.Equal(t, "SERVICE_UNAVAILABLE", r.code(), path)
		assert.NotEmpty(t, r.Header.Get("Retry-After"), path)
	}
	time.Sleep(time.Until(cutAt.Add(5 * time.Second))) // an outage of 5 s: its length is what is tested
	px.Restore()
	restoredAt := time.Now()

	require.Eventually(t, func() bool {
		return do(t, "GET", apiP.url()+"/health", nil, nil).Status == http.StatusOK
	}, 20*time.Second, 100*time.Millisecond, "/health recovers")
	t.Logf("outage 5 s; healthy again %s after", time.Since(restoredAt).Round(100*time.Millisecond))

	// No operation is lost: each finishes (the jobs cut off mid-way are
	// retried), and every engine ends running on a port of its own.
	for _, op := range ops {
		require.Eventually(t, func() bool {
			r := call("GET", "/operations/"+op, key, nil)
			return r.str("status") == "succeeded"
		}, 90*time.Second, 250*time.Millisecond, "operation %s succeeds after the outage: %v", op, call("GET", "/operations/"+op, key, nil).Body)
	}
	t.Logf("every operation done %s after the outage", time.Since(restoredAt).Round(100*time.Millisecond))
	select {
	case r := <-syncDone:
		require.Equal(t, http.StatusOK, r.Status, "the synchronous provision in flight: %v", r.Body)
	case <-time.After(60 * time.Second):
		t.Fatal("the synchronous provision in flight never answered")
	}
	ports := map[string]bool{}
	for _, u := range []string{"before-0", "before-1", "during-0", "during-1", "during-2", "during-3", "riding"} {
		r := call("POST", "/engines/"+u+"/admit", key, map[string]any{})
		require.Equal(t, http.StatusOK, r.Status, "%s: %v", u, r.Body)
		require.Equal(t, true, r.Body["admitted"], "%s: %v", u, r.Body)
		h := engineCall(t, "GET", r.str("engine", "url")+"/health", "", nil)
		require.Equal(t, http.StatusOK, h.Status, "%s's engine answers", u)
		ports[r.str("engine", "url")] = true
	}
	require.Len(t, ports, 7, "seven engines, seven ports")

	// A synchronous call is woken again (the API's LISTEN is back).
	start := time.Now()
	r := call("POST", "/engines/provision", key, map[string]any{"user_id": "after-0"})
	require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
	t.Logf("synchronous provision after the outage: %s", time.Since(start).Round(time.Millisecond))

	// A rotation with no overlap refuses the old key: the API's cache hears
	// the NOTIFY, or flushes when its listener reconnects (backoff ≤ 5 s).
	rot := do(t, "POST", apiP.url()+"/products/"+productID(t, apiP, key)+"/rotate-platform-key",
		map[string]any{"overlap_seconds": 0}, map[string]string{"X-Admin-Key": adminKey})
	require.Equal(t, http.StatusOK, rot.Status, "%v", rot.Body)
	require.Eventually(t, func() bool {
		return call("GET", "/engines", key, nil).code() == "INVALID_PLATFORM_KEY"
	}, 6*time.Second, 20*time.Millisecond, "the rotated-out key is refused")
	require.Equal(t, http.StatusOK, call("GET", "/engines", rot.str("platform_api_key"), nil).Status)

	// The scheduler leads again: health sweeps are enqueued after the outage.
	require.Eventually(t, func() bool {
		var n int
		require.NoError(t, pool.QueryRow(t.Context(), `SELECT count(*) FROM river_job WHERE kind = 'health_sweep' AND created_at > $1`, restoredAt).Scan(&n))
		return n > 0
	}, 30*time.Second, 250*time.Millisecond, "the scheduler enqueues sweeps again")

	for name, p := range map[string]*proc{"api": apiP, "worker": workerP, "scheduler": schedP} {
		select {
		case err := <-p.done:
			t.Fatalf("the %s process exited during the outage: %v", name, err)
		default:
		}
	}
}

// productID looks a product up by its platform key through GET /products.
func productID(t *testing.T, p *proc, key string) string {
	t.Helper()
	r := do(t, "GET", p.url()+"/products", nil, map[string]string{"X-Admin-Key": adminKey})
	require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
	for _, x := range r.Body["products"].([]any) {
		m := x.(map[string]any)
		if m["slug"] == "acme" {
			return m["product_id"].(string)
		}
	}
	t.Fatal("product acme not listed")
	return ""
}

func hostPort(t *testing.T, dbURL string) string {
	t.Helper()
	u, err := url.Parse(dbURL)
	require.NoError(t, err)
	return u.Host
}

// The Docker API goes away for a while under a worker (the daemon and the
// containers keep running; the worker cannot reach them). Running engines
// keep serving and admits of them keep answering; an operation asked for
// meanwhile finishes once Docker is back, without a second container or
// volume; and the worker's event stream reconnects: a container removed
// behind our back afterwards is noticed at once and recreated on its
// volume, brain intact.
func TestDockerOutage(t *testing.T) {
	t.Parallel()
	cli := dockertest.RequireDocker(t)
	image := dockertest.EngineImage(t, "e2e-1")
	pf := newProcFleet(t)
	node := "e2e-dockerout-" + randHex(4)
	be, err := docker.New(docker.Config{Network: e2eNetwork, Node: node, Fleet: fleetID(t, testenv.Pool(t, pf.dbURL))}, testenv.Quiet())
	require.NoError(t, err)
	f := &fleet{t: t, Backend: be, Node: node}
	t.Cleanup(f.removeEngines)

	sock := "/var/run/docker.sock"
	if h := os.Getenv("DOCKER_HOST"); strings.HasPrefix(h, "unix://") {
		sock = strings.TrimPrefix(h, "unix://")
	}
	px := testenv.NewProxy(t, "unix", sock)
	pf.env = append(pf.env, "ORCH_ENGINE_BACKEND=docker", "ORCH_ENGINE_IMAGE="+image, "ORCH_NODE="+node,
		"ORCH_ENGINE_NETWORK="+e2eNetwork, "DOCKER_HOST=tcp://"+px.Addr(),
		"ORCH_RESTART_MAX_ATTEMPTS=3", "ORCH_RESTART_BACKOFF_BASE_S=1")
	apiP, workerP := pf.start("api"), pf.start("worker")
	key := pf.register(apiP, "acme")
	call := func(method, path string, body any, hdr ...string) resp {
		h := map[string]string{"X-Platform-Key": key}
		for i := 0; i+1 < len(hdr); i += 2 {
			h[hdr[i]] = hdr[i+1]
		}
		return do(t, method, apiP.url()+path, body, h)
	}

	r := call("POST", "/engines/provision", map[string]any{"user_id": "before"})
	require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
	before := struct{ id, url, key string }{r.str("engine_id"), r.str("url"), r.str("api_key")}
	require.Equal(t, http.StatusCreated, engineCall(t, "POST", before.url+"/memories", before.key, map[string]any{"content": "kept through the outage"}).Status)

	px.Cut()
	cutAt := time.Now()
	r = call("POST", "/engines/provision", map[string]any{"user_id": "during"}, "Prefer", "respond-async")
	require.Equal(t, http.StatusAccepted, r.Status, "%v", r.Body)
	op := r.str("operation_id")
	for time.Since(cutAt) < 5*time.Second {
		a := call("POST", "/engines/before/admit", map[string]any{})
		require.Equal(t, http.StatusOK, a.Status, "%v", a.Body)
		require.Equal(t, true, a.Body["admitted"], "a running engine is admitted while Docker is away: %v", a.Body)
		require.Equal(t, http.StatusOK, engineCall(t, "GET", before.url+"/health", "", nil).Status)
		time.Sleep(250 * time.Millisecond) // a client's pace, all through the 5 s outage
	}
	px.Restore()
	restoredAt := time.Now()

	require.Eventually(t, func() bool {
		return call("GET", "/operations/"+op, nil).str("status") == "succeeded"
	}, 60*time.Second, 250*time.Millisecond, "the provision asked for during the outage succeeds: %v", call("GET", "/operations/"+op, nil).Body)
	t.Logf("provision done %s after Docker came back", time.Since(restoredAt).Round(100*time.Millisecond))
	a := call("POST", "/engines/during/admit", map[string]any{})
	require.Equal(t, true, a.Body["admitted"], "%v", a.Body)
	require.Equal(t, http.StatusOK, engineCall(t, "GET", a.str("engine", "url")+"/health", "", nil).Status)
	rts, vols, err := be.List(t.Context())
	require.NoError(t, err)
	require.Len(t, rts, 2, "one container per engine")
	require.Len(t, vols, 2, "one volume per engine")

	// The event stream is back: a container removed behind our back is
	// noticed at once (no scheduler runs sweeps here) and recreated.
	waitCatchUp(t, testenv.Pool(t, pf.dbURL), cutAt) // the stream re-subscribes (with backoff) once Docker is back
	_, err = cli.ContainerRemove(t.Context(), orch.ContainerName(before.id), client.ContainerRemoveOptions{Force: true})
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		info, err := be.Inspect(t.Context(), before.id)
		if err != nil || info.State != orch.RuntimeRunning {
			return false
		}
		h, err := tryDo("GET", before.url+"/health", nil, nil)
		return err == nil && h.Status == http.StatusOK
	}, 30*time.Second, 250*time.Millisecond, "the removed container is recreated")
	m := engineCall(t, "GET", before.url+"/memories?q=outage", before.key, nil)
	require.Equal(t, http.StatusOK, m.Status)
	require.Len(t, m.Body["memories"], 1, "brain intact on the recreated container")

	select {
	case err := <-workerP.done:
		t.Fatalf("the worker exited: %v", err)
	default:
	}
}
