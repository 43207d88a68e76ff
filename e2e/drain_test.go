package e2e_test

import (
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/internal/testenv"
)

// SIGTERM with a request and a job in flight: both complete, then the
// process exits 0 (docker stop --time 60 semantics).
func TestGracefulDrain(t *testing.T) {
	t.Parallel()
	pf := newProcFleet(t, "ORCH_ENGINE_ENV_PASSTHROUGH=ENGINE_BOOT_DELAY_S", "ENGINE_BOOT_DELAY_S=2")
	p := pf.start("api,worker")
	key := pf.register(p, "acme")

	type result struct {
		r   resp
		err error
	}
	done := make(chan resp, 1)
	go func() {
		done <- do(t, "POST", p.url()+"/engines/provision", map[string]any{"user_id": "drain"}, map[string]string{"X-Platform-Key": key})
	}()
	waitJobRunning(t, pf.dbURL, "engine_provision") // the request waits, the job waits for the engine's boot
	stopped := make(chan error, 1)
	go func() { stopped <- p.stop(t) }()

	r := <-done
	require.Equal(t, http.StatusOK, r.Status, "the in-flight request completes: %v", r.Body)
	require.Equal(t, "running", r.str("status"), "the in-flight job completes")
	require.NoError(t, <-stopped, "exit status 0 after draining")

	// A new process sees the engine running: nothing was lost.
	p2 := pf.start("api")
	g := do(t, "GET", p2.url()+"/engines/drain", nil, map[string]string{"X-Platform-Key": key})
	require.Equal(t, "running", g.str("status"))
}

// A request waiting for an operation longer than the drain budget is
// answered before the budget ends (503 naming the operation) instead of
// having its connection cut; the operation goes on in the workers.
func TestDrainAnswersLongWaits(t *testing.T) {
	t.Parallel()
	pf := newProcFleet(t, "ORCH_ENGINE_ENV_PASSTHROUGH=ENGINE_BOOT_DELAY_S", "ENGINE_BOOT_DELAY_S=8",
		"ORCH_SHUTDOWN_TIMEOUT_S=4", "ORCH_BOOT_TIMEOUT_S=30")
	apiP, _ := pf.start("api"), pf.start("worker")
	key := pf.register(apiP, "acme")

	done := make(chan resp, 1)
	go func() {
		done <- do(t, "POST", apiP.url()+"/engines/provision", map[string]any{"user_id": "slow"}, map[string]string{"X-Platform-Key": key})
	}()
	waitJobRunning(t, pf.dbURL, "engine_provision")
	stopped := make(chan error, 1)
	sigterm := time.Now()
	go func() { stopped <- apiP.stop(t) }()

	r := <-done
	answered := time.Since(sigterm)
	require.Equal(t, http.StatusServiceUnavailable, r.Status, "%v", r.Body)
	require.Equal(t, "SERVICE_UNAVAILABLE", r.code())
	require.Equal(t, "1", r.Header.Get("Retry-After"))
	require.Contains(t, r.Body["error"].(map[string]any)["message"], "/operations/")
	require.Less(t, answered, 4*time.Second, "answered within the drain budget")
	require.NoError(t, <-stopped, "exit status 0")

	// The provision went on: another API replica sees it finish.
	p2 := pf.start("api")
	require.Eventually(t, func() bool {
		return do(t, "GET", p2.url()+"/engines/slow", nil, map[string]string{"X-Platform-Key": key}).str("status") == "running"
	}, 20*time.Second, 100*time.Millisecond)
}

// waitJobRunning waits until a job of kind is being worked.
func waitJobRunning(t *testing.T, dbURL, kind string) {
	t.Helper()
	pool := testenv.Pool(t, dbURL)
	require.Eventually(t, func() bool {
		var n int
		require.NoError(t, pool.QueryRow(t.Context(), `SELECT count(*) FROM river_job WHERE kind = $1 AND state = 'running'`, kind).Scan(&n))
		return n > 0
	}, 15*time.Second, 10*time.Millisecond, "a %s job runs", kind)
}
