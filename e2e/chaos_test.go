package e2e_test

import (
	"fmt"
	"math/rand/v2"
	"net/http"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/enginefleet/orchestrator/backend/docker/dockertest"

	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/backend/docker"
	"github.com/enginefleet/orchestrator/internal/testenv"
)

// The chaos drill: the API, two workers and the scheduler as separate
// processes (each with its own metrics listener) on a Postgres of the
// test's own; product traffic from 30 users for two minutes while a
// worker is SIGKILLed every few seconds (replaced at once) and Postgres is
// restarted once. Afterwards: every engine is usable or failed with a
// reason, no operation is unfinished, ports are unique, containers match
// rows, nothing is orphaned and every finished operation is in the audit
// log.
func TestChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("the chaos drill takes minutes")
	}
	t.Parallel()
	dockertest.RequireDocker(t)
	image := dockertest.EngineImage(t, "e2e-1")
	pg := testenv.OwnPostgres(t)
	node := "chaos-" + randHex(3)
	pf := newProcFleet(t, "ORCH_DATABASE_URL="+pg.URL, "ORCH_ENGINE_BACKEND=docker", "ORCH_ENGINE_IMAGE="+image,
		"ORCH_ENGINE_NETWORK="+e2eNetwork, "ORCH_NODE="+node, "ORCH_BOOT_TIMEOUT_S=30",
		"ORCH_HEALTH_CHECK_INTERVAL_S=5", "ORCH_HEALTH_CHECK_TIMEOUT_S=2", "ORCH_RESTART_BACKOFF_BASE_S=1",
		"ORCH_IDLE_AFTER_S=0", "ORCH_LOG_LEVEL=info")
	pf.dbURL = pg.URL
	pool := testenv.Pool(t, pg.URL)
	be, err := docker.New(docker.Config{Network: e2eNetwork, Node: node, Fleet: fleetID(t, pool)}, testenv.Quiet())
	require.NoError(t, err)
	t.Cleanup((&fleet{Backend: be}).removeEngines)

	metricsAddr := func() string { return fmt.Sprintf("ORCH_METRICS_ADDR=127.0.0.1:%d", freePort(t)) }
	apiProc := pf.start("api", metricsAddr())
	pf.start("scheduler", metricsAddr())
	var wmu sync.Mutex
	workers := []*proc{pf.start("worker", metricsAddr()), pf.start("worker", metricsAddr())}
	key := pf.register(apiProc, "acme")
	h := map[string]string{"X-Platform-Key": key}

	const users, clients = 30, 6
	traffic := 2 * time.Minute
	if testing.Short() {
		traffic = 30 * time.Second
	}
	var stop atomic.Bool
	var mu sync.Mutex
	answers := map[string]int{} // "action status code" → count
	var unavailable []time.Time // when a 503 was answered
	record := func(action string, r resp) {
		mu.Lock()
		answers[fmt.Sprintf("%s %d %s", action, r.Status, r.code())]++
		if r.Status == http.StatusServiceUnavailable {
			unavailable = append(unavailable, time.Now())
		}
		mu.Unlock()
	}
	hc := &http.Client{Timeout: 3 * time.Minute}
	var wg sync.WaitGroup
	for c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(c), 42))
			for !stop.Load() {
				u := fmt.Sprintf("%s/engines/u%02d", apiProc.url(), rng.IntN(users))
				switch x := rng.IntN(100); {
				case x < 70:
					record("admit", doWith(t, hc, "POST", u+"/admit", map[string]any{"auto_provision": true, "auto_wake": true}, h))
				case x < 78:
					record("stop", doWith(t, hc, "POST", u+"/stop", nil, h))
				case x < 84:
					record("start", doWith(t, hc, "POST", u+"/start", nil, h))
				case x < 89:
					record("restart", doWith(t, hc, "POST", u+"/restart", nil, h))
				case x < 94:
					record("rotate", doWith(t, hc, "POST", u+"/rotate-key", nil, h))
				case x < 97:
					record("destroy", doWith(t, hc, "DELETE", u, nil, h))
				default:
					record("get", doWith(t, hc, "GET", u, nil, h))
				}
			}
		}()
	}

	// Kill a worker every 3-6 s (a new one starts at once); restart
	// Postgres once, half-way.
	kills := 0
	deadline := time.Now().Add(traffic)
	var restartedAt time.Time
	for time.Now().Before(deadline) {
		time.Sleep(time.Duration(3000+rand.IntN(3000)) * time.Millisecond) // the kill schedule: random on purpose
		wmu.Lock()
		i := rand.IntN(len(workers))
		require.NoError(t, workers[i].cmd.Process.Signal(syscall.SIGKILL))
		<-workers[i].done
		workers[i] = pf.start("worker", metricsAddr())
		wmu.Unlock()
		kills++
		if restartedAt.IsZero() && time.Until(deadline) < traffic/2 {
			restartedAt = time.Now()
			require.NoError(t, pg.Restart())
			t.Logf("postgres restarted after %d kills (took %s)", kills, time.Since(restartedAt).Round(time.Millisecond))
		}
	}
	stop.Store(true)
	wg.Wait()
	t.Logf("%d worker kills; answers:", kills)
	keys := make([]string, 0, len(answers))
	for k := range answers {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		t.Logf("  %-40s %d", k, answers[k])
	}
	require.GreaterOrEqual(t, kills, 20)
	for k := range answers {
		require.NotContains(t, k, " 500 ", "no internal error: %s", k)
	}
	// 503 only while Postgres restarts (and the pool reconnects).
	for _, at := range unavailable {
		require.WithinRange(t, at, restartedAt, restartedAt.Add(30*time.Second), "503 SERVICE_UNAVAILABLE outside the restart")
	}
	if len(unavailable) > 0 {
		t.Logf("503 answered from %s to %s after the restart began", unavailable[0].Sub(restartedAt).Round(time.Millisecond),
			unavailable[len(unavailable)-1].Sub(restartedAt).Round(time.Millisecond))
	}

	ctx := ctxT(t, 5*time.Minute)
	// Every operation ends.
	require.Eventually(t, func() bool {
		var n int
		return pool.QueryRow(ctx, `SELECT count(*) FROM operations WHERE status IN ('pending', 'running')`).Scan(&n) == nil && n == 0
	}, 2*time.Minute, 500*time.Millisecond, "no operation unfinished")
	var transitional int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM engines WHERE status IN ('provisioning', 'destroying')`).Scan(&transitional))
	require.Zero(t, transitional, "no engine left in a transitional state")

	// Ports unique.
	var rows, ports int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*), count(DISTINCT port) FROM engines`).Scan(&rows, &ports))
	require.Equal(t, rows, ports, "no port held twice")

	// Every engine usable, or failed with a reason.
	type row struct {
		id, user, status, lastErr string
	}
	var es []row
	r, err := pool.Query(ctx, `SELECT id::text, user_id, status, coalesce(last_error, '') FROM engines`)
	require.NoError(t, err)
	for r.Next() {
		var e row
		require.NoError(t, r.Scan(&e.id, &e.user, &e.status, &e.lastErr))
		es = append(es, e)
	}
	r.Close()
	byID := map[string]row{}
	for _, e := range es {
		byID[e.id] = e
		switch orch.State(e.status) {
		case orch.StateRunning:
			g := doWith(t, hc, "GET", apiProc.url()+"/engines/"+e.user, nil, h)
			require.Equal(t, http.StatusOK, g.Status)
			require.Eventually(t, func() bool { return engineStatus(g.str("url")+"/memories", g.str("api_key")) == http.StatusOK },
				30*time.Second, 200*time.Millisecond, "running engine %s answers with the key the product has", e.user)
		case orch.StateFailed:
			require.NotEmpty(t, e.lastErr, "failed engine %s says why", e.user)
		}
	}

	// Containers = rows; no orphan container or volume.
	rts, vols, err := be.List(ctx)
	require.NoError(t, err)
	for _, rt := range rts {
		_, ok := byID[rt.EngineID]
		require.True(t, ok, "orphan container %s", rt.Name)
	}
	for _, v := range vols {
		_, ok := byID[v.EngineID]
		require.True(t, ok, "orphan volume %s", v.Name)
	}
	have := map[string]orch.RuntimeInfo{}
	for _, rt := range rts {
		have[rt.EngineID] = rt
	}
	for _, e := range es {
		if e.status == string(orch.StateRunning) && have[e.id].State != orch.RuntimeRunning {
			var acts []string
			r, err := pool.Query(ctx, `SELECT action || coalesce(' ' || (metadata->>'repair'), '') FROM audit_log WHERE engine_id = $1 ORDER BY id`, e.id)
			require.NoError(t, err)
			for r.Next() {
				var a string
				require.NoError(t, r.Scan(&a))
				acts = append(acts, a)
			}
			r.Close()
			info, err := be.Inspect(ctx, e.id)
			t.Fatalf("running engine %s has no running container: listed %+v, inspected %+v (%v); audit %v", e.user, have[e.id], info, err, acts)
		}
	}

	// No audit gap: every operation that changed something is audited.
	var gaps int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM operations o
		WHERE (o.status = 'succeeded' OR (o.status = 'failed' AND o.error_code NOT IN ('OPERATION_IN_PROGRESS', 'ENGINE_NOT_FOUND')))
		AND o.kind <> 'backup'
		AND NOT EXISTS (SELECT 1 FROM audit_log a WHERE a.metadata->>'operation_id' = o.id::text)`).Scan(&gaps))
	require.Zero(t, gaps, "every finished operation has its audit row")
	t.Logf("end state: %d engines %v", len(es), countStates(es, func(e row) string { return e.status }))
}

func countStates[T any](xs []T, f func(T) string) map[string]int {
	m := map[string]int{}
	for _, x := range xs {
		m[f(x)]++
	}
	return m
}
