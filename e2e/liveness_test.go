package e2e_test

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/internal/testenv"
)

// A worker process SIGKILLed while it works an operation does not hold it
// for River's stuck-job rescue (minutes): its session's lock goes with its
// connection, another worker re-queues the job within seconds and finishes
// the operation. Each round kills exactly the worker working the job
// (read from river_job.attempted_by → worker_sessions.pid), with the engine
// still booting (ENGINE_BOOT_DELAY_S keeps it at 503 for a while).
func TestKilledWorkerOperationMovesOn(t *testing.T) {
	t.Parallel()
	pf := newProcFleet(t, "ORCH_ENGINE_ENV_PASSTHROUGH=ENGINE_BOOT_DELAY_S", "ENGINE_BOOT_DELAY_S=3")
	apiProc := pf.start("api")
	workers := []*proc{pf.start("worker"), pf.start("worker")}
	key := pf.register(apiProc, "acme")
	pool := testenv.Pool(t, pf.dbURL)
	ctx := ctxT(t, 10*time.Minute)
	h := map[string]string{"X-Platform-Key": key}

	// killHolder SIGKILLs the worker process running the operation's job
	// and starts a replacement; it returns when the kill happened.
	killHolder := func(opID string) time.Time {
		t.Helper()
		var pid int
		require.Eventually(t, func() bool {
			err := pool.QueryRow(ctx, `SELECT s.pid FROM operations o JOIN river_job j ON j.id = o.job_id
				JOIN worker_sessions s ON s.id = j.attempted_by[array_length(j.attempted_by, 1)]
				WHERE o.id = $1 AND j.state = 'running'`, opID).Scan(&pid)
			return err == nil && pid > 0
		}, 30*time.Second, 20*time.Millisecond, "operation %s running on a worker", opID)
		i := slices.IndexFunc(workers, func(p *proc) bool { return p.cmd.Process.Pid == pid })
		require.GreaterOrEqual(t, i, 0, "the job runs on one of our workers (pid %d)", pid)
		require.NoError(t, workers[i].cmd.Process.Signal(syscall.SIGKILL))
		killed := time.Now()
		<-workers[i].done
		workers[i] = pf.start("worker")
		return killed
	}

	var took []time.Duration
	for i := range 4 {
		r := do(t, "POST", apiProc.url()+"/engines/provision", map[string]any{"user_id": fmt.Sprintf("k%d", i)},
			map[string]string{"X-Platform-Key": key, "Prefer": "respond-async"})
		require.Equal(t, http.StatusAccepted, r.Status, "%v", r.Body)
		opID := r.str("operation_id")
		killed := killHolder(opID)
		var status string
		require.Eventually(t, func() bool {
			o := do(t, "GET", apiProc.url()+"/operations/"+opID, nil, h)
			status = o.str("status")
			return status == "succeeded" || status == "failed"
		}, 90*time.Second, 50*time.Millisecond)
		require.Equal(t, "succeeded", status, "the operation finished on another worker")
		took = append(took, time.Since(killed))
	}
	slices.Sort(took)
	t.Logf("kill → operation succeeded on another worker: %v", took)
	// River's stuck-job rescue alone takes minutes; the liveness rescue
	// re-queues within seconds (the boot delay is 3 s of this).
	require.Less(t, took[len(took)-1], 30*time.Second)

	// A synchronous admit caught by a kill still answers 200 in its budget.
	done := make(chan resp, 1)
	go func() {
		done <- do(t, "POST", apiProc.url()+"/engines/sync-user/admit", map[string]any{"auto_provision": true}, h)
	}()
	var opID string
	require.Eventually(t, func() bool {
		return pool.QueryRow(ctx, `SELECT o.id::text FROM operations o JOIN engines e ON e.id = o.engine_id
			WHERE e.user_id = 'sync-user'`).Scan(&opID) == nil
	}, 30*time.Second, 20*time.Millisecond)
	killHolder(opID)
	r := <-done
	require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
	require.Equal(t, true, r.Body["admitted"], "%v", r.Body)

	// Nothing is left running on a dead session.
	var lost int
	require.NoError(t, pool.QueryRow(context.Background(), `SELECT count(*) FROM river_job j
		JOIN worker_sessions s ON s.id = j.attempted_by[array_length(j.attempted_by, 1)]
		WHERE j.state = 'running' AND s.pid NOT IN (`+pidList(workers)+`)`).Scan(&lost))
	require.Zero(t, lost)
}

func pidList(ps []*proc) string {
	s := ""
	for i, p := range ps {
		if i > 0 {
			s += ","
		}
		s += fmt.Sprint(p.cmd.Process.Pid)
	}
	return s
}
