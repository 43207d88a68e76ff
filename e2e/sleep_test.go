package e2e_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/enginefleet/orchestrator/backend/docker/dockertest"

	"github.com/moby/moby/client"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
)

// Idle engines sleep (mark: the container keeps running; stop:
// it is stopped to free memory), the row keeps when and why, wake brings
// them back, sleeping engines are not probed.

// Mark mode, with the scheduler role firing the sweeps: an idle engine is
// marked sleeping (its process keeps running), is no longer probed,
// admit says engine_sleeping, and admit with auto_wake wakes it.
func TestIdleSleepMarkMode(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{idleAfter: time.Second, sleepMode: "mark", scheduler: true, healthInterval: time.Second})
	_, key := f.product("acme", orch.Policy{})
	e := f.provisionUser(key, "ed")

	require.Eventually(t, func() bool { return f.row(e.ID).Status == "sleeping" }, 10*time.Second, 50*time.Millisecond)
	r := f.row(e.ID)
	require.Equal(t, "idle", r.SleepReason)
	require.NotNil(t, r.SleptAt)
	sl := find(f.audit(e.ID), orch.ActionSleep, 0)
	require.Equal(t, "mark", sl.Meta["mode"])
	require.Equal(t, "idle", sl.Meta["reason"])
	require.GreaterOrEqual(t, sl.Meta["idle_s"], 1.0)
	require.Equal(t, http.StatusOK, engineCall(t, "GET", e.URL+"/health", "", nil).Status, "mark mode keeps the engine up")

	// Not probed while sleeping.
	probed := f.row(e.ID).LastHealthAt
	asleep := time.Now()
	testenv.Await(t, 10*time.Second, "two health sweeps (and their batches) done", func() error {
		var sweeps, unfinished int
		err := f.Pool.QueryRow(context.Background(), `SELECT
			count(*) FILTER (WHERE kind = 'health_sweep' AND created_at > $1 AND state = 'completed'),
			count(*) FILTER (WHERE kind = 'health_sweep_batch' AND finalized_at IS NULL)
			FROM river_job`, asleep).Scan(&sweeps, &unfinished)
		if err != nil {
			return err
		}
		return testenv.Check(sweeps >= 2 && unfinished == 0, "%d sweeps done, %d batches not", sweeps, unfinished)
	})
	require.Equal(t, probed, f.row(e.ID).LastHealthAt)

	a := f.call("POST", "/engines/ed/admit", key, nil)
	require.Equal(t, false, a.Body["admitted"])
	require.Equal(t, "engine_sleeping", a.Body["reason"])
	woke := time.Now()
	w := f.call("POST", "/engines/ed/admit", key, map[string]any{"auto_wake": true})
	awake := time.Now()
	require.Equal(t, http.StatusOK, w.Status, "%v", w.Body)
	require.Equal(t, true, w.Body["admitted"], "%v", w.Body)
	require.Equal(t, "running", w.str("engine", "status"))
	wk := find(f.audit(e.ID), orch.ActionWake, 0)
	require.Equal(t, "idle", wk.Meta["sleep_reason"])
	// Whole seconds asleep: from slept_at to the wake.
	require.GreaterOrEqual(t, wk.Meta["slept_s"], float64(int64(woke.Sub(*r.SleptAt).Seconds())))
	require.LessOrEqual(t, wk.Meta["slept_s"], awake.Sub(*r.SleptAt).Seconds())
	require.Empty(t, f.row(e.ID).SleepReason, "wake clears sleep_reason and slept_at")
}

// Stop mode: the idle sweep stops the engine (scale to zero), the row
// says sleeping with why and when; admit with auto_wake starts it and
// waits for health; the brain is intact.
func TestIdleSleepStopMode(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{idleAfter: time.Second, sleepMode: "stop", events: true, maxAttempts: 3, backoffBase: time.Second})
	sleepStopWake(t, f)
}

// Stop mode on Docker: the container is stopped while asleep and started
// again on wake, with its volume (data intact).
func TestIdleSleepStopModeDocker(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{backend: "docker", idleAfter: time.Second, sleepMode: "stop", events: true,
		maxAttempts: 3, backoffBase: time.Second})
	sleepStopWake(t, f)
}

func sleepStopWake(t *testing.T, f *fleet) {
	ctx := context.Background()
	_, key := f.product("acme", orch.Policy{})
	e := f.provisionUser(key, "flo")
	require.Equal(t, http.StatusCreated, engineCall(t, "POST", e.URL+"/memories", e.Key, map[string]any{"content": "sleeps with the engine"}).Status)

	time.Sleep(1100 * time.Millisecond) // idle for longer than idleAfter (1 s): time itself is what is tested
	require.Equal(t, 1, f.idleSweep())
	require.Eventually(t, func() bool { return f.row(e.ID).Status == "sleeping" }, 20*time.Second, 50*time.Millisecond)
	r := f.row(e.ID)
	require.Equal(t, "idle", r.SleepReason)
	require.NotNil(t, r.SleptAt)
	info, err := f.Backend.Inspect(ctx, e.ID)
	require.NoError(t, err)
	require.Equal(t, orch.RuntimeExited, info.State, "stop mode frees the engine")
	sl := find(f.audit(e.ID), orch.ActionSleep, 0)
	require.Equal(t, "stop", sl.Meta["mode"])
	require.GreaterOrEqual(t, sl.Meta["idle_s"], 1.0)
	require.Zero(t, f.sweep().Probed, "sleeping engines are not probed")
	require.Zero(t, f.idleSweep())

	// A quiet window (there is no event that says nothing happened):
	// nothing (auto-restart, crash check) touches a sleeping engine.
	time.Sleep(time.Second)
	require.Equal(t, "sleeping", f.row(e.ID).Status)
	require.Equal(t, []string{"provision", "sleep"}, actions(f.audit(e.ID)))

	a := f.call("POST", "/engines/flo/admit", key, nil)
	require.Equal(t, "engine_sleeping", a.Body["reason"])
	w := f.call("POST", "/engines/flo/admit", key, map[string]any{"auto_wake": true})
	require.Equal(t, http.StatusOK, w.Status, "%v", w.Body)
	require.Equal(t, true, w.Body["admitted"], "%v", w.Body)
	require.Equal(t, e.URL, w.str("engine", "url"))
	m := engineCall(t, "GET", e.URL+"/memories?q=sleeps", e.Key, nil)
	require.Equal(t, http.StatusOK, m.Status)
	require.Len(t, m.Body["memories"], 1, "brain intact after sleep and wake")
	rows := f.audit(e.ID)
	require.Equal(t, []string{"provision", "sleep", "wake"}, actions(rows))
	wk := find(rows, orch.ActionWake, 0)
	require.GreaterOrEqual(t, wk.Meta["slept_s"], 1.0)
	require.Equal(t, "sleeping", wk.Meta["from"])

	// Just woken: a whole idle period before it may sleep again.
	require.Zero(t, f.idleSweep())
	require.Equal(t, "running", f.row(e.ID).Status)
}

// BenchmarkWakeFromStopDocker compares waking an engine slept in stop
// mode (admit with auto_wake through the API: job pickup, container
// start, health wait) with a plain `docker start` of the same container
// and a health poll, interleaved over a fixed sample, and reports the
// medians, their ratio (target ≤ 1.10) and the wake's timeline.
func BenchmarkWakeFromStopDocker(b *testing.B) {
	const samples = 10
	f := newFleetTB(b, fleetOpts{backend: "docker", idleAfter: time.Hour, sleepMode: "stop", limits: true})
	cli := dockertest.RequireDocker(b)
	ctx := context.Background()
	_, key := f.product("acme", orch.Policy{})
	e := f.provisionUser(key, "bench")
	name := orch.ContainerName(e.ID)
	var wake, plain []time.Duration
	before := f.steps()
	for i := 0; i < samples; i++ {
		// Put it to sleep the orchestrator's way.
		_, err := f.Pool.Exec(ctx, `UPDATE engines SET last_active_at = now() - interval '2 hours', updated_at = now() - interval '2 hours' WHERE id = $1`, e.ID)
		require.NoError(b, err)
		// (Eventually: the last job may not have released its lease yet.)
		require.Eventually(b, func() bool { return f.idleSweep() == 1 }, 5*time.Second, 5*time.Millisecond)
		require.Eventually(b, func() bool { return f.row(e.ID).Status == "sleeping" }, 30*time.Second, 5*time.Millisecond)

		start := time.Now()
		w := f.call("POST", "/engines/bench/admit", key, map[string]any{"auto_wake": true})
		wake = append(wake, time.Since(start))
		require.Equal(b, true, w.Body["admitted"], "%v", w.Body)

		// The baseline: the same container, stopped and started by hand.
		_, err = cli.ContainerStop(ctx, name, client.ContainerStopOptions{})
		require.NoError(b, err)
		start = time.Now()
		_, err = cli.ContainerStart(ctx, name, client.ContainerStartOptions{})
		require.NoError(b, err)
		pollHealth(e.URL + "/health")
		plain = append(plain, time.Since(start))
	}
	f.reportSteps(b, before)
	b.ReportMetric(ms(pct(wake, 0.5)), "wake-p50-ms")
	b.ReportMetric(ms(pct(plain, 0.5)), "dockerstart-p50-ms")
	b.ReportMetric(float64(pct(wake, 0.5))/float64(pct(plain, 0.5)), "ratio")
}
