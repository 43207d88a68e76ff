package e2e_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/lifecycle"
	"github.com/enginefleet/orchestrator/schema"
)

// abandon records an operation of kind on the user's engine whose job is
// scheduled an hour from now (so no worker runs it), points the row at it
// and returns the operation and its job id: what a request leaves behind
// before something happens to its job.
func (f *fleet) abandon(user string, kind orch.OpKind, args func(l jobs.Lifecycle) river.JobArgs, payload schema.OpPayload,
	state orch.State, deadline time.Time) (orch.Operation, int64) {
	f.t.Helper()
	ctx := context.Background()
	var op orch.Operation
	var jobID int64
	require.NoError(f.t, pgx.BeginFunc(ctx, f.Pool, func(tx pgx.Tx) error {
		q := schema.New(tx)
		var pid string
		require.NoError(f.t, tx.QueryRow(ctx, `SELECT product_id::text FROM engines WHERE user_id = $1`, user).Scan(&pid))
		e, err := q.EngineByUserForUpdate(ctx, pid, user)
		require.NoError(f.t, err)
		op = orch.Operation{ID: uuid.NewString(), ProductID: e.ProductID, EngineID: e.ID, UserID: user, Kind: kind,
			Actor: "acme", Status: orch.OpPending, Deadline: deadline}
		opts := &river.InsertOpts{ScheduledAt: time.Now().Add(time.Hour)}
		require.NoError(f.t, lifecycle.Enqueue(ctx, tx, f.River, op, payload,
			args(jobs.Lifecycle{EngineID: e.ID, OperationID: op.ID, Node: e.Node}), opts))
		if state == orch.StateProvisioning {
			// As a provision that never finished leaves it (no transition
			// leads back there).
			_, err := tx.Exec(ctx, `UPDATE engines SET status = 'provisioning' WHERE id = $1`, e.ID)
			require.NoError(f.t, err)
			e.Status = state
		}
		if state == "" {
			state = e.Status
		}
		_, err = q.SetEngineState(ctx, e, schema.EngineChange{Status: state, OperationID: &op.ID})
		require.NoError(f.t, err)
		return tx.QueryRow(ctx, `SELECT job_id FROM operations WHERE id = $1`, op.ID).Scan(&jobID)
	}))
	return op, jobID
}

// opEnds waits for the operation sweep to end op and returns its row.
func (f *fleet) opEnds(id string) orch.Operation {
	f.t.Helper()
	var op orch.Operation
	require.Eventually(f.t, func() bool {
		var err error
		op, _, err = schema.New(f.Pool).OperationByID(context.Background(), id)
		require.NoError(f.t, err)
		return op.Status.Done()
	}, 30*time.Second, 50*time.Millisecond, "operation %s ends", id)
	return op
}

// Every operation ends, whatever happens to its job: cancelled in the job
// UI, deleted, discarded, or past its deadline. The engine is left usable
// and its runtime in line with its row.
func TestAbandonedOperationsEnd(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{keyOverlap: 2 * time.Second})
	_, key := f.product("acme", orch.Policy{})
	ctx := context.Background()
	far := time.Now().Add(time.Hour)
	admit := func(user string) (string, string, string) {
		r := f.call("POST", "/engines/"+user+"/admit", key, map[string]any{"auto_provision": true})
		require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
		return r.str("engine", "engine_id"), r.str("engine", "url"), r.str("engine", "api_key")
	}

	t.Run("half-done rotate-key cancelled in the job UI", func(t *testing.T) {
		id, url, k1 := admit("rot")
		e, err := schema.New(f.Pool).EngineByID(ctx, id)
		require.NoError(t, err)
		// A rotate attempt got as far as recreating the engine on the new
		// key, with the old one only for a short overlap, then died.
		k2 := keys.Generate()
		enc, err := f.Keyring.Encrypt(k2)
		require.NoError(t, err)
		spec := orch.EngineSpec{EngineID: id, ProductID: e.ProductID, Node: e.Node, Image: e.EngineVersion, HostPort: e.Port,
			Env: map[string]string{"ENGINE_KEY_HASH": keys.Hash(k2), "SQLITE_DB_PATH": "/data/brain.sqlite", "CATALOG_DIR": "/catalog",
				"ENGINE_KEY_HASH_PREVIOUS": keys.Hash(k1), "ENGINE_KEY_PREVIOUS_EXPIRES_AT": time.Now().Add(2 * time.Second).UTC().Format(time.RFC3339)}}
		require.NoError(t, f.Backend.Ensure(ctx, spec))
		require.NoError(t, f.Backend.Start(ctx, id))
		require.Eventually(t, func() bool { return engineStatus(url+"/memories", k2) == http.StatusOK },
			20*time.Second, 50*time.Millisecond)
		op, jobID := f.abandon("rot", orch.OpRotateKey, func(l jobs.Lifecycle) river.JobArgs { return jobs.RotateKey{Lifecycle: l} },
			schema.OpPayload{KeyHash: keys.Hash(k2), KeyEnc: enc}, "", far)
		_, err = f.River.JobCancel(ctx, jobID)
		require.NoError(t, err)

		got := f.opEnds(op.ID)
		require.Equal(t, orch.OpFailed, got.Status)
		require.Equal(t, orch.CodeBackendFailed, got.ErrorCode)
		require.Contains(t, got.ErrorMessage, "cancelled")
		// The row kept the old key; the engine was recreated from the row,
		// so the product's key keeps working after the overlap, and the
		// never-committed key does not.
		time.Sleep(2500 * time.Millisecond) // past the half-done rotation's overlap: time itself is what is tested
		require.Eventually(t, func() bool { return engineStatus(url+"/memories", k1) == http.StatusOK },
			20*time.Second, 100*time.Millisecond, "the row's key works")
		require.Equal(t, http.StatusUnauthorized, engineCall(t, "GET", url+"/memories", k2, nil).Status)
		e, err = schema.New(f.Pool).EngineByID(ctx, id)
		require.NoError(t, err)
		require.Empty(t, e.OperationID)
		require.Equal(t, orch.StateRunning, e.Status)
		require.Contains(t, f.auditActions(id), string(orch.ActionReconcile))
		// And the engine takes new operations.
		r := f.call("POST", "/engines/rot/restart", key, nil)
		require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
	})

	t.Run("provision whose job was deleted", func(t *testing.T) {
		id, _, _ := admit("prov")
		op, jobID := f.abandon("prov", orch.OpProvision, func(l jobs.Lifecycle) river.JobArgs { return jobs.Provision{Lifecycle: l} },
			schema.OpPayload{}, orch.StateProvisioning, far)
		_, err := f.River.JobDelete(ctx, jobID)
		require.NoError(t, err)
		got := f.opEnds(op.ID)
		require.Equal(t, orch.OpFailed, got.Status)
		require.Contains(t, got.ErrorMessage, "deleted")
		e, err := schema.New(f.Pool).EngineByID(ctx, id)
		require.NoError(t, err)
		require.Equal(t, orch.StateFailed, e.Status, "a provision that cannot finish leaves a failed engine")
		require.Contains(t, e.LastError, "deleted")
		r := f.call("POST", "/engines/prov/admit", key, nil)
		require.Equal(t, "engine_unhealthy", r.Body["reason"])
		s := f.call("POST", "/engines/prov/start", key, nil)
		require.Equal(t, http.StatusOK, s.Status, "a failed engine can be started again: %v", s.Body)
	})

	t.Run("stop whose job was discarded", func(t *testing.T) {
		id, url, k := admit("disc")
		op, jobID := f.abandon("disc", orch.OpStop, func(l jobs.Lifecycle) river.JobArgs { return jobs.Stop{Lifecycle: l} },
			schema.OpPayload{}, "", far)
		// As River leaves a job whose last attempt failed or was cut off.
		_, err := f.Pool.Exec(ctx, `UPDATE river_job SET state = 'discarded', finalized_at = now() WHERE id = $1`, jobID)
		require.NoError(t, err)
		got := f.opEnds(op.ID)
		require.Equal(t, orch.OpFailed, got.Status)
		require.Contains(t, got.ErrorMessage, "gave up")
		require.Equal(t, http.StatusOK, engineCall(t, "GET", url+"/memories", k, nil).Status, "still running, as its row says")
		e, err := schema.New(f.Pool).EngineByID(ctx, id)
		require.NoError(t, err)
		require.Equal(t, orch.StateRunning, e.Status)
	})

	t.Run("destroy cancelled: the engine is destroyed anyway", func(t *testing.T) {
		id, _, _ := admit("gone")
		op, jobID := f.abandon("gone", orch.OpDestroy, func(l jobs.Lifecycle) river.JobArgs { return jobs.Destroy{Lifecycle: l} },
			schema.OpPayload{}, orch.StateDestroying, far)
		_, err := f.River.JobCancel(ctx, jobID)
		require.NoError(t, err)
		got := f.opEnds(op.ID)
		require.Equal(t, orch.OpSucceeded, got.Status)
		_, err = schema.New(f.Pool).EngineByID(ctx, id)
		require.True(t, orch.IsCode(err, orch.CodeEngineNotFound), "row removed: %v", err)
		info, err := f.Backend.Inspect(ctx, id)
		require.NoError(t, err)
		require.Equal(t, orch.RuntimeMissing, info.State)
	})

	t.Run("deadline passed while its job waits", func(t *testing.T) {
		id, _, _ := admit("late")
		op, jobID := f.abandon("late", orch.OpRestart, func(l jobs.Lifecycle) river.JobArgs { return jobs.Restart{Lifecycle: l} },
			schema.OpPayload{}, "", time.Now().Add(-time.Second))
		got := f.opEnds(op.ID)
		require.Equal(t, orch.OpFailed, got.Status)
		require.Equal(t, orch.CodeBootTimeout, got.ErrorCode)
		j, err := f.River.JobGet(ctx, jobID)
		require.NoError(t, err)
		require.Equal(t, "cancelled", string(j.State), "a job past its operation's deadline never runs")
		e, err := schema.New(f.Pool).EngineByID(ctx, id)
		require.NoError(t, err)
		require.Empty(t, e.OperationID)
	})
}

// engineStatus is the status of a GET on an engine with key; 0 when it
// does not answer (it may be restarting).
func engineStatus(url, key string) int {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return 0
	}
	req.Header.Set("X-Engine-Key", key)
	res, err := httpClient.Do(req)
	if err != nil {
		return 0
	}
	res.Body.Close()
	return res.StatusCode
}
