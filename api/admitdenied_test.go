package api_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"runtime"
	"testing"
	"time"

	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/api"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
)

// newStoppableReplica is newHarness whose background work (listener,
// audit writer) stop ends and waits for, as a draining process does.
func newStoppableReplica(t *testing.T, cfg api.Config) (*harness, func()) {
	t.Helper()
	dbURL := testenv.DB(t)
	pool := testenv.Pool(t, dbURL)
	rc, err := river.NewClient(riverpgxv5.New(pool), &river.Config{})
	require.NoError(t, err)
	kr, err := keys.NewKeyring(keys.GenerateMasterKey(), nil)
	require.NoError(t, err)
	srv := newAPI(cfg, pool, rc, kr, testenv.Quiet())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); srv.Run(ctx) }()
	ts := httptest.NewServer(srv.Handler())
	stop := func() { ts.Close(); cancel(); <-done }
	t.Cleanup(stop)
	return &harness{t: t, URL: ts.URL, DBURL: dbURL, Pool: pool, Keyring: kr, Server: srv}, stop
}

// Denied admits for ever-new user ids cost neither a goroutine nor an
// audit row each: one row at once, the rest summed up in one more.
func TestAdmitDeniedAuditBounded(t *testing.T) {
	t.Parallel()
	h, stop := newStoppableReplica(t, testConfig())
	id, key := h.register("acme", nil)
	const n = 500
	base := runtime.NumGoroutine()
	peak := base
	for i := range n {
		status, body, _ := h.do("POST", fmt.Sprintf("/engines/user-%d/admit", i), nil, platform(key))
		require.Equal(t, http.StatusOK, status)
		require.Equal(t, "engine_not_found", body["reason"])
		peak = max(peak, runtime.NumGoroutine())
	}
	require.Less(t, peak-base, 50, "goroutines grew with the denials")
	// The first denial is in the log at once.
	require.Eventually(t, func() bool {
		return countRows(t, h.Pool, `SELECT count(*) FROM audit_log WHERE product_id = $1 AND action = 'admit_denied'`, id) >= 1
	}, 5*time.Second, 20*time.Millisecond)
	stop() // writes the window's sum
	require.Equal(t, 2, countRows(t, h.Pool, `SELECT count(*) FROM audit_log WHERE product_id = $1 AND action = 'admit_denied'`, id))
	require.Equal(t, n, countRows(t, h.Pool, `SELECT coalesce(sum((metadata->>'count')::int), 0) FROM audit_log
		WHERE product_id = $1 AND action = 'admit_denied' AND metadata->>'reason' = 'engine_not_found'`, id))
}
