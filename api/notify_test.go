package api_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

// A waiting request learns its operation's outcome even when no NOTIFY
// reaches its replica (here: no listener at all, as when its connection
// went half-open): the slow poll is the safety net.
func TestWaitWithoutNotify(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := testenv.Pool(t, testenv.DB(t))
	rc, err := river.NewClient(riverpgxv5.New(pool), &river.Config{})
	require.NoError(t, err)
	kr, err := keys.NewKeyring(keys.GenerateMasterKey(), nil)
	require.NoError(t, err)
	srv := newAPI(testConfig(), pool, rc, kr, testenv.Quiet()) // never Run: no LISTEN
	ts := httptest.NewServer(srv.Handler())
	t.Cleanup(ts.Close)
	h := &harness{t: t, URL: ts.URL, Pool: pool, Keyring: kr, Server: srv}
	status, body, _ := h.do("POST", "/products/register", map[string]any{"slug": "acme", "display_name": "Acme"},
		map[string]string{"X-Admin-Key": testAdminKey})
	require.Equal(t, http.StatusOK, status, "%v", body)
	pid, key := body["product_id"].(string), body["platform_api_key"].(string)
	enc, err := kr.Encrypt(keys.Generate())
	require.NoError(t, err)
	eid := uuid.NewString()
	require.NoError(t, schema.New(pool).InsertEngine(ctx, orch.Engine{ID: eid, ProductID: pid, UserID: "u", Status: orch.StateRunning,
		Node: "local", Port: 20001, EngineVersion: "enginefleet/engine:test", KeyHash: "h", KeyEnc: enc}))

	type answer struct {
		status int
		took   time.Duration
	}
	done := make(chan answer, 1)
	start := time.Now()
	go func() {
		status, _, _ := h.do("POST", "/engines/u/stop", nil, map[string]string{"X-Platform-Key": key})
		done <- answer{status, time.Since(start)}
	}()
	var opID string
	require.Eventually(t, func() bool {
		return pool.QueryRow(ctx, `SELECT id::text FROM operations WHERE engine_id = $1`, eid).Scan(&opID) == nil
	}, 10*time.Second, 10*time.Millisecond)
	// The worker's commit, as it lands (its NOTIFY reaches nobody here).
	_, err = pool.Exec(ctx, `UPDATE engines SET status = 'stopped' WHERE id = $1`, eid)
	require.NoError(t, err)
	require.NoError(t, schema.New(pool).SetOperation(ctx, opID, orch.OpSucceeded, "", ""))
	select {
	case a := <-done:
		require.Equal(t, http.StatusOK, a.status)
		t.Logf("answered %s after the request, without a notification", a.took.Round(time.Millisecond))
	case <-time.After(15 * time.Second):
		t.Fatal("a waiting request depends on NOTIFY arriving (its wait would last 45 s)")
	}
}
