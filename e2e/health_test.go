package e2e_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/enginefleet/orchestrator/backend/docker/dockertest"

	"github.com/jackc/pgx/v5"
	"github.com/moby/moby/client"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/keys"
)

// Health sweeps, failure counting, auto-restart with backoff,
// crash detection from the backend's events, manual operations winning
// over auto-restart.

// engineRef is what a test needs of one provisioned engine.
type engineRef struct {
	ID, URL, Key, User string
}

// provision admits a new user with auto_provision and returns its engine.
func (f *fleet) provisionUser(key, user string) engineRef {
	f.t.Helper()
	r := f.call("POST", "/engines/"+user+"/admit", key, map[string]any{"auto_provision": true})
	require.Equal(f.t, http.StatusOK, r.Status, "%v", r.Body)
	require.Equal(f.t, true, r.Body["admitted"], "%v", r.Body)
	// The provision job answers before it releases its lease on the row.
	require.Eventually(f.t, func() bool {
		var free bool
		err := f.Pool.QueryRow(context.Background(), `SELECT lease_job_id IS NULL FROM engines WHERE id = $1`, r.str("engine", "engine_id")).Scan(&free)
		return err == nil && free
	}, 5*time.Second, 5*time.Millisecond)
	return engineRef{ID: r.str("engine", "engine_id"), URL: r.str("engine", "url"), Key: r.str("engine", "api_key"), User: user}
}

// setHealthy flips the reference engine's on-demand health switch.
func setHealthy(t testing.TB, e engineRef, healthy bool) {
	t.Helper()
	r := engineCall(t, "PUT", e.URL+"/debug/health", e.Key, map[string]any{"healthy": healthy})
	require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
}

// engineRow is the part of an engine row health tests look at.
type engineRow struct {
	Status          string
	HealthFailures  int
	RestartAttempts int
	LastHealthAt    *time.Time
	OperationID     string
	SleepReason     string
	SleptAt         *time.Time
}

func (f *fleet) row(id string) engineRow {
	f.t.Helper()
	var r engineRow
	require.NoError(f.t, f.Pool.QueryRow(context.Background(), `SELECT status, health_failures, restart_attempts, last_health_at,
		coalesce(operation_id::text, ''), coalesce(sleep_reason, ''), slept_at FROM engines WHERE id = $1`, id).
		Scan(&r.Status, &r.HealthFailures, &r.RestartAttempts, &r.LastHealthAt, &r.OperationID, &r.SleepReason, &r.SleptAt))
	return r
}

// auditRow is one audit row of an engine.
type auditRow struct {
	Action string
	At     time.Time
	Meta   map[string]any
}

func (f *fleet) audit(engineID string) []auditRow {
	f.t.Helper()
	rows, err := f.Pool.Query(context.Background(), `SELECT action, "timestamp", metadata FROM audit_log WHERE engine_id = $1 ORDER BY id`, engineID)
	require.NoError(f.t, err)
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (auditRow, error) {
		var a auditRow
		err := r.Scan(&a.Action, &a.At, &a.Meta)
		return a, err
	})
	require.NoError(f.t, err)
	return out
}

// actions lists audit actions, dropping sampled healthy health_check rows
// (which a sweep may write at any time).
func actions(rows []auditRow) []string {
	var out []string
	for _, r := range rows {
		if r.Action == string(orch.ActionHealthCheck) && r.Meta["sampled"] == true {
			continue
		}
		out = append(out, r.Action)
	}
	return out
}

func find(rows []auditRow, action orch.Action, nth int) auditRow {
	for _, r := range rows {
		if r.Action == string(action) {
			if nth == 0 {
				return r
			}
			nth--
		}
	}
	return auditRow{}
}

// restartJob is one auto-restart job as River holds it.
type restartJob struct {
	Attempt     int
	State       string
	ScheduledAt time.Time
}

func (f *fleet) restartJobs(engineID string) []restartJob {
	f.t.Helper()
	rows, err := f.Pool.Query(context.Background(), `SELECT (args->>'attempt')::int, state::text, scheduled_at FROM river_job
		WHERE kind = $1 AND args->>'engine_id' = $2 AND (args->>'auto')::bool ORDER BY id`, jobs.Restart{}.Kind(), engineID)
	require.NoError(f.t, err)
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (restartJob, error) {
		var j restartJob
		err := r.Scan(&j.Attempt, &j.State, &j.ScheduledAt)
		return j, err
	})
	require.NoError(f.t, err)
	return out
}

func (f *fleet) waitAction(engineID string, action orch.Action, n int, timeout time.Duration) []auditRow {
	f.t.Helper()
	var rows []auditRow
	testenv.Await(f.t, timeout, fmt.Sprintf("%d× %s", n, action), func() error {
		rows = f.audit(engineID)
		c := 0
		for _, r := range rows {
			if r.Action == string(action) {
				c++
			}
		}
		return testenv.Check(c >= n, "audited %v", actions(rows))
	})
	return rows
}

// An engine made unhealthy on demand goes failed after exactly
// MAX_FAILURES probes; auto-restart attempts follow the backoff; after the
// last one the engine stays failed and admit says engine_unhealthy.
func TestUnhealthyEngineFailsAndAutoRestartGivesUp(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{bootTimeout: 3 * time.Second, maxFailures: 3, backoffBase: time.Second,
		backoffMax: time.Minute, maxAttempts: 2, healthInterval: time.Second})
	_, key := f.product("acme", orch.Policy{})
	e := f.provisionUser(key, "ann")

	// Healthy sweeps keep last_health_at fresh.
	res := f.sweep()
	require.Equal(t, 1, res.Healthy)
	first := f.row(e.ID).LastHealthAt
	require.NotNil(t, first)

	setHealthy(t, e, false)
	for i := 1; i < 3; i++ {
		res := f.sweep()
		require.Equal(t, 1, res.Failed)
		r := f.row(e.ID)
		require.Equal(t, "running", r.Status, "not failed after %d probes", i)
		require.Equal(t, i, r.HealthFailures)
	}
	res = f.sweep()
	require.Equal(t, 1, res.NowFailed, "failed at exactly MAX_FAILURES probes")
	require.Equal(t, "failed", f.row(e.ID).Status)
	require.Equal(t, 0, f.sweep().Probed, "failed engines are not probed")

	rows := f.waitAction(e.ID, orch.ActionAutoRestartGaveUp, 1, 60*time.Second)
	require.Equal(t, []string{"provision", "health_check", "health_check", "health_check", "health_failed",
		"auto_restart_start", "auto_restart_failed", "auto_restart_start", "auto_restart_failed", "auto_restart_gave_up"}, actions(rows))
	require.EqualValues(t, 3, find(rows, orch.ActionHealthCheck, 2).Meta["failures"])

	// Backoff: attempt n is scheduled min(1 s·2^(n-1), max) after the
	// failure that caused it.
	js := f.restartJobs(e.ID)
	require.Len(t, js, 2)
	failedAt := find(rows, orch.ActionHealthFailed, 0).At
	require.InDelta(t, 1.0, js[0].ScheduledAt.Sub(failedAt).Seconds(), 0.5, "attempt 1 after BASE")
	attempt1Failed := find(rows, orch.ActionAutoRestartFailed, 0).At
	require.InDelta(t, 2.0, js[1].ScheduledAt.Sub(attempt1Failed).Seconds(), 0.5, "attempt 2 after 2·BASE")
	require.Eventually(t, func() bool {
		st := states(f.restartJobs(e.ID))
		return len(st) == 2 && st[0] == "completed" && st[1] == "completed"
	}, 5*time.Second, 20*time.Millisecond, "no more attempts after giving up")

	r := f.row(e.ID)
	require.Equal(t, "failed", r.Status)
	require.Equal(t, 2, r.RestartAttempts)
	st := f.call("GET", "/status", key, nil)
	require.Equal(t, http.StatusOK, st.Status, "%v", st.Body)
	require.Equal(t, "critical", st.str("health"), "/status reads the failed row")
	require.EqualValues(t, 1, st.Body["unhealthy_count"])
	a := f.call("POST", "/engines/ann/admit", key, nil)
	require.Equal(t, http.StatusOK, a.Status, "%v", a.Body)
	require.Equal(t, false, a.Body["admitted"])
	require.Equal(t, "engine_unhealthy", a.Body["reason"])
}

// An engine that recovers mid-way: a healthy probe resets the failure
// count; once failed, an attempt that finds it healthy again brings it
// back to running with its counters reset.
func TestEngineRecoversMidway(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{bootTimeout: 3 * time.Second, maxFailures: 3, backoffBase: time.Second,
		backoffMax: time.Minute, maxAttempts: 4, healthInterval: time.Second})
	_, key := f.product("acme", orch.Policy{})
	e := f.provisionUser(key, "bo")

	setHealthy(t, e, false)
	f.sweep()
	f.sweep()
	require.Equal(t, 2, f.row(e.ID).HealthFailures)
	setHealthy(t, e, true)
	f.sweep()
	require.Equal(t, 0, f.row(e.ID).HealthFailures, "a success resets the count")
	require.Equal(t, "running", f.row(e.ID).Status)

	setHealthy(t, e, false)
	for i := 0; i < 3; i++ {
		f.sweep()
	}
	require.Equal(t, "failed", f.row(e.ID).Status)
	f.waitAction(e.ID, orch.ActionAutoRestartFailed, 1, 30*time.Second)
	require.Equal(t, 1, f.row(e.ID).RestartAttempts)
	setHealthy(t, e, true) // the engine attempt 1 restarted recovers

	rows := f.waitAction(e.ID, orch.ActionAutoRestartSuccess, 1, 30*time.Second)
	require.Equal(t, true, find(rows, orch.ActionAutoRestartSuccess, 0).Meta["already_healthy"])
	require.EqualValues(t, 2, find(rows, orch.ActionAutoRestartSuccess, 0).Meta["attempt"])
	r := f.row(e.ID)
	require.Equal(t, "running", r.Status)
	require.Zero(t, r.HealthFailures)
	require.Zero(t, r.RestartAttempts)
	a := f.call("POST", "/engines/bo/admit", key, nil)
	require.Equal(t, true, a.Body["admitted"], "%v", a.Body)
	require.Equal(t, 1, f.sweep().Healthy)
}

// pidOf finds the engine process by its key hash in /proc (subprocess backend).
func pidOf(t *testing.T, e engineRef) int {
	t.Helper()
	want := "ENGINE_KEY_HASH=" + keys.Hash(e.Key)
	ents, err := os.ReadDir("/proc")
	require.NoError(t, err)
	for _, d := range ents {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		env, err := os.ReadFile(filepath.Join("/proc", d.Name(), "environ"))
		if err != nil {
			continue
		}
		for _, kv := range strings.Split(string(env), "\x00") {
			if kv == want {
				return pid
			}
		}
	}
	t.Fatalf("no engine process with key hash %s", keys.Hash(e.Key))
	return 0
}

// A crashed engine process is seen at once from the backend's events (no
// sweep runs here), goes failed and is auto-restarted.
func TestCrashDetectedFromEventsSubprocess(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{bootTimeout: 5 * time.Second, maxAttempts: 3, backoffBase: time.Second, events: true})
	_, key := f.product("acme", orch.Policy{})
	e := f.provisionUser(key, "cy")
	waitCatchUp(t, f.Pool, time.Time{})

	killed := time.Now()
	require.NoError(t, syscall.Kill(pidOf(t, e), syscall.SIGKILL))
	rows := f.waitAction(e.ID, orch.ActionHealthFailed, 1, 5*time.Second)
	detected := find(rows, orch.ActionHealthFailed, 0)
	require.Less(t, detected.At.Sub(killed), 2*time.Second, "crash detected from events")
	require.Equal(t, "crash", detected.Meta["reason"])
	require.Equal(t, "die", detected.Meta["event"])
	require.EqualValues(t, 137, detected.Meta["exit_code"])

	rows = f.waitAction(e.ID, orch.ActionAutoRestartSuccess, 1, 20*time.Second)
	require.Equal(t, []string{"provision", "health_failed", "auto_restart_start", "auto_restart_success"}, actions(rows))
	require.Equal(t, "running", f.row(e.ID).Status)
	require.Equal(t, http.StatusOK, engineCall(t, "GET", e.URL+"/health", "", nil).Status)
}

// Docker: `docker kill` of an engine container is detected from Docker's
// events (the fleet runs no health sweep that could notice it; the time it
// took is logged, `make bench` measures it) and the engine is restarted on
// its volume. (The
// daemon treats `docker kill` as a manual stop and does not apply the
// unless-stopped policy; should it restart the container itself, the
// crash is audited as a health_check with recovered_by=runtime instead.)
func TestDockerKillDetectedAndRestarted(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{backend: "docker", bootTimeout: 20 * time.Second, maxAttempts: 3, backoffBase: time.Second, events: true})
	cli := dockertest.RequireDocker(t)
	_, key := f.product("acme", orch.Policy{})
	e := f.provisionUser(key, "dee")
	require.Equal(t, http.StatusCreated, engineCall(t, "POST", e.URL+"/memories", e.Key, map[string]any{"content": "kept across the crash"}).Status)
	waitCatchUp(t, f.Pool, time.Time{})

	killed := time.Now()
	_, err := cli.ContainerKill(context.Background(), orch.ContainerName(e.ID), client.ContainerKillOptions{Signal: "KILL"})
	require.NoError(t, err)
	var detected auditRow
	require.Eventually(t, func() bool {
		for _, r := range f.audit(e.ID) {
			if r.Action != "provision" && r.Meta["sampled"] != true {
				detected = r
				return true
			}
		}
		return false
	}, 15*time.Second, 20*time.Millisecond, "detected from Docker events: this fleet runs no health sweep")
	var rows []auditRow
	require.Equal(t, "die", detected.Meta["event"])
	t.Logf("detected after %s: %s %v", detected.At.Sub(killed), detected.Action, detected.Meta)

	if detected.Action == string(orch.ActionHealthCheck) {
		// Docker restarted it by itself: nothing more to do.
		require.Equal(t, "runtime", detected.Meta["recovered_by"])
		require.Equal(t, []string{"provision", "health_check"}, actions(f.audit(e.ID)))
	} else {
		rows = f.waitAction(e.ID, orch.ActionAutoRestartSuccess, 1, 30*time.Second)
		require.Equal(t, []string{"provision", "health_failed", "auto_restart_start", "auto_restart_success"}, actions(rows))
		require.EqualValues(t, 137, detected.Meta["exit_code"])
	}
	require.Equal(t, "running", f.row(e.ID).Status)
	m := engineCall(t, "GET", e.URL+"/memories?q=crash", e.Key, nil)
	require.Equal(t, http.StatusOK, m.Status)
	require.Len(t, m.Body["memories"], 1, "brain intact")

	// A container that is gone altogether is recreated on its volume.
	require.Eventually(t, func() bool { // the last job releases its lease
		var free bool
		err := f.Pool.QueryRow(context.Background(), `SELECT lease_job_id IS NULL FROM engines WHERE id = $1`, e.ID).Scan(&free)
		return err == nil && free
	}, 10*time.Second, 10*time.Millisecond)
	before := len(f.audit(e.ID))
	_, err = cli.ContainerRemove(context.Background(), orch.ContainerName(e.ID), client.ContainerRemoveOptions{Force: true})
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		rows := f.audit(e.ID)
		return len(rows) > before && rows[len(rows)-1].Action == string(orch.ActionAutoRestartSuccess)
	}, 30*time.Second, 50*time.Millisecond, "recreated: %v", actions(f.audit(e.ID)))
	gone := f.audit(e.ID)[before]
	require.Equal(t, string(orch.ActionHealthFailed), gone.Action)
	require.Contains(t, []any{string(orch.RuntimeMissing), string(orch.RuntimeExited)}, gone.Meta["runtime_state"])
	require.Equal(t, "crash", gone.Meta["reason"])
	require.Equal(t, "running", f.row(e.ID).Status)
	m = engineCall(t, "GET", e.URL+"/memories?q=crash", e.Key, nil)
	require.Len(t, m.Body["memories"], 1, "brain intact on the recreated container")
}

// A manual stop cancels a pending auto-restart and is never undone by one
// (nor by the die event of the stop); a manual start does the same.
func TestManualOperationsCancelAutoRestart(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{bootTimeout: 5 * time.Second, maxFailures: 1, backoffBase: 3 * time.Second,
		maxAttempts: 3, events: true})
	_, key := f.product("acme", orch.Policy{})

	t.Run("stop", func(t *testing.T) {
		e := f.provisionUser(key, "stopper")
		setHealthy(t, e, false)
		require.Equal(t, 1, f.sweep().NowFailed)
		r := f.row(e.ID)
		require.Equal(t, "failed", r.Status)
		require.Equal(t, []string{"scheduled"}, states(f.restartJobs(e.ID)))
		autoOp := r.OperationID

		s := f.call("POST", "/engines/stopper/stop", key, nil)
		require.Equal(t, http.StatusOK, s.Status, "%v", s.Body)
		require.Equal(t, "stopped", s.str("status"))
		require.Equal(t, []string{"cancelled"}, states(f.restartJobs(e.ID)))
		var opStatus, opCode string
		require.NoError(t, f.Pool.QueryRow(context.Background(), `SELECT status, error_code FROM operations WHERE id = $1`, autoOp).Scan(&opStatus, &opCode))
		require.Equal(t, "failed", opStatus)
		require.Equal(t, string(orch.CodeOperationInProgress), opCode)

		// Past the cancelled restart's backoff: the passage of time is what
		// is tested (nothing may happen when it would have run).
		time.Sleep(4 * time.Second)
		require.Equal(t, "stopped", f.row(e.ID).Status)
		require.Equal(t, []string{"provision", "health_check", "health_failed", "stop"}, actions(f.audit(e.ID)))
	})

	t.Run("stop of a running engine is not a crash", func(t *testing.T) {
		e := f.provisionUser(key, "quiet")
		s := f.call("POST", "/engines/quiet/stop", key, nil)
		require.Equal(t, http.StatusOK, s.Status, "%v", s.Body)
		// A quiet window: nothing may mistake the stop for a crash in it
		// (there is no event that says nothing happened).
		time.Sleep(time.Second)
		require.Equal(t, "stopped", f.row(e.ID).Status)
		require.Equal(t, []string{"provision", "stop"}, actions(f.audit(e.ID)))
		require.Empty(t, f.restartJobs(e.ID))
	})

	t.Run("start", func(t *testing.T) {
		e := f.provisionUser(key, "starter")
		setHealthy(t, e, false)
		require.Equal(t, 1, f.sweep().NowFailed)
		setHealthy(t, e, true)
		s := f.call("POST", "/engines/starter/start", key, nil)
		require.Equal(t, http.StatusOK, s.Status, "%v", s.Body)
		require.Equal(t, "running", s.str("status"))
		require.Equal(t, []string{"cancelled"}, states(f.restartJobs(e.ID)))
		time.Sleep(4 * time.Second) // past the cancelled restart's backoff, as above
		require.Equal(t, "running", f.row(e.ID).Status)
		require.Equal(t, []string{"provision", "health_check", "health_failed", "start"}, actions(f.audit(e.ID)))
	})
}

// A manual restart or destroy also replaces a pending auto-restart (the
// restart is a new engine_restart job: the cancelled one no longer blocks
// it as a duplicate).
func TestManualRestartAndDestroyCancelAutoRestart(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{bootTimeout: 5 * time.Second, maxFailures: 1, backoffBase: time.Minute, maxAttempts: 3})
	_, key := f.product("acme", orch.Policy{})

	e := f.provisionUser(key, "restarter")
	setHealthy(t, e, false)
	require.Equal(t, 1, f.sweep().NowFailed)
	setHealthy(t, e, true)
	r := f.call("POST", "/engines/restarter/restart", key, nil)
	require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
	require.Equal(t, "running", r.str("status"))
	require.Equal(t, []string{"cancelled"}, states(f.restartJobs(e.ID)))
	require.Equal(t, []string{"provision", "health_check", "health_failed", "restart"}, actions(f.audit(e.ID)))

	d := f.provisionUser(key, "destroyed")
	setHealthy(t, d, false)
	require.Equal(t, 1, f.sweep().NowFailed)
	x := f.call("DELETE", "/engines/destroyed", key, nil)
	require.Equal(t, http.StatusOK, x.Status, "%v", x.Body)
	require.Equal(t, []string{"cancelled"}, states(f.restartJobs(d.ID)))
	require.Equal(t, "ENGINE_NOT_FOUND", f.call("GET", "/engines/destroyed", key, nil).code())
}

func states(js []restartJob) []string {
	var out []string
	for _, j := range js {
		out = append(out, j.State)
	}
	return out
}

// fakeEngines starts n light /health servers on loopback; the first
// `hang` of them never answer in time. Returns their ports.
func fakeEngines(t testing.TB, n, hang int, hangFor time.Duration) []int {
	t.Helper()
	ports := make([]int, n)
	ok := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"status":"ok","uptime_seconds":1,"subsystems":{}}`)) //nolint:errcheck
	})
	slow := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(hangFor):
		case <-r.Context().Done():
		}
	})
	for i := range ports {
		h := ok
		if i < hang {
			h = slow
		}
		s := httptest.NewServer(h)
		t.Cleanup(s.Close)
		p := s.Listener.Addr().String()
		port, err := strconv.Atoi(p[strings.LastIndex(p, ":")+1:])
		require.NoError(t, err)
		ports[i] = port
	}
	return ports
}

// A sweep over 200 engines (fake engines on loopback) completes within one
// interval through the real fan-out (sweep job → batch jobs on the node
// queue), and ten engines whose probe times out do not delay the others.
func TestSweep200Engines(t *testing.T) {
	t.Parallel()
	const interval = 5 * time.Second
	f := newFleet(t, fleetOpts{healthInterval: interval, probeTimeout: time.Second, maxFailures: 3})
	pid, _ := f.product("acme", orch.Policy{})
	ports := fakeEngines(t, 200, 10, 10*time.Second)
	ids := insertEngines(t, f, pid, ports)

	start := time.Now()
	_, err := f.River.Insert(context.Background(), jobs.HealthSweep{Tick: start}, nil)
	require.NoError(t, err)
	f.waitSweepDone(start, 2)
	took := time.Since(start)
	t.Logf("sweep of 200 engines (10 timing out after 1 s) took %s", took)
	require.Less(t, took, interval, "a sweep completes within one interval")

	var fresh, failing int
	require.NoError(t, f.Pool.QueryRow(context.Background(), `SELECT count(*) FILTER (WHERE last_health_at >= $1),
		count(*) FILTER (WHERE health_failures = 1) FROM engines`, start).Scan(&fresh, &failing))
	require.Equal(t, 190, fresh)
	require.Equal(t, 10, failing)
	// The healthy engines were not held up by the hanging ones: probes run
	// in parallel, so ten hanging engines delay a batch's commit by one
	// probe timeout (1 s), not ten.
	var healthyDone time.Time
	require.NoError(t, f.Pool.QueryRow(context.Background(), `SELECT max(last_health_at) FROM engines WHERE id = ANY($1::uuid[])`,
		ids[10:]).Scan(&healthyDone))
	require.Less(t, healthyDone.Sub(start), 4*time.Second)
}

// insertEngines records running engines at ports for product (no backend
// objects: the "engines" are fake /health servers).
func insertEngines(t testing.TB, f *fleet, productID string, ports []int) []string {
	t.Helper()
	ids := make([]string, len(ports))
	rows := make([][]any, len(ports))
	for i, p := range ports {
		ids[i] = fmt.Sprintf("00000000-0000-4000-8000-%012d", i+1)
		rows[i] = []any{ids[i], productID, fmt.Sprintf("fake-%d", i), "running", f.Node, p, "fake", "h", "e"}
	}
	_, err := f.Pool.CopyFrom(context.Background(), pgx.Identifier{"engines"},
		[]string{"id", "product_id", "user_id", "status", "node", "port", "engine_version", "engine_key_hash", "engine_key_enc"},
		pgx.CopyFromRows(rows))
	require.NoError(t, err)
	return ids
}

// waitSweepDone waits until the sweep enqueued at or after since and its
// batches have all finished.
func (f *fleet) waitSweepDone(since time.Time, batches int) {
	f.t.Helper()
	require.Eventually(f.t, func() bool {
		var sweeps, done, open int
		err := f.Pool.QueryRow(context.Background(), `SELECT
			count(*) FILTER (WHERE kind = 'health_sweep'),
			count(*) FILTER (WHERE kind = 'health_sweep_batch' AND state = 'completed'),
			count(*) FILTER (WHERE state NOT IN ('completed', 'cancelled', 'discarded'))
			FROM river_job WHERE kind IN ('health_sweep', 'health_sweep_batch') AND created_at >= $1`, since.Add(-time.Second)).
			Scan(&sweeps, &done, &open)
		return err == nil && sweeps >= 1 && done >= batches && open == 0
	}, 30*time.Second, 10*time.Millisecond)
}

// Docker: an engine process that dies by itself (not `docker kill`) is
// restarted by the daemon's unless-stopped policy. The crash is still
// seen from the events and audited; the engine ends up running either
// way: recovered by the runtime (health_check, recovered_by=runtime) when
// the daemon restarted it before the check looked, or else failed, then
// auto-restart attempt 1 finds it healthy (already_healthy) and only marks
// it running.
func TestDockerSelfCrashRestartedByPolicy(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{backend: "docker", bootTimeout: 20 * time.Second, maxAttempts: 3, backoffBase: time.Second, events: true})
	cli := dockertest.RequireDocker(t)
	_, key := f.product("acme", orch.Policy{})
	e := f.provisionUser(key, "eve")
	waitCatchUp(t, f.Pool, time.Time{})
	in, err := cli.ContainerInspect(context.Background(), orch.ContainerName(e.ID), client.ContainerInspectOptions{})
	require.NoError(t, err)
	require.NotZero(t, in.Container.State.Pid)
	require.NoError(t, syscall.Kill(in.Container.State.Pid, syscall.SIGKILL)) // a crash, from the daemon's view

	var crash auditRow
	require.Eventually(t, func() bool {
		for _, r := range f.audit(e.ID) {
			if r.Meta["event"] == "die" {
				crash = r
				return true
			}
		}
		return false
	}, 10*time.Second, 20*time.Millisecond, "the crash is audited")
	t.Logf("crash audited as %s %v", crash.Action, crash.Meta)
	switch crash.Action {
	case string(orch.ActionHealthCheck):
		require.Equal(t, "runtime", crash.Meta["recovered_by"])
	default:
		rows := f.waitAction(e.ID, orch.ActionAutoRestartSuccess, 1, 30*time.Second)
		require.Equal(t, []string{"provision", "health_failed", "auto_restart_start", "auto_restart_success"}, actions(rows))
		t.Logf("auto-restart: %v", find(rows, orch.ActionAutoRestartSuccess, 0).Meta)
	}
	require.Eventually(t, func() bool { return f.row(e.ID).Status == "running" }, 30*time.Second, 50*time.Millisecond)
	in, err = cli.ContainerInspect(context.Background(), orch.ContainerName(e.ID), client.ContainerInspectOptions{})
	require.NoError(t, err)
	require.GreaterOrEqual(t, in.Container.RestartCount, 1, "the daemon restarted it")
	require.Equal(t, http.StatusOK, engineCall(t, "GET", e.URL+"/health", "", nil).Status)
}
