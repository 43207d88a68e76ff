package e2e_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
)

// The whole contract flow on a backend.
func contractFlow(t *testing.T, f *fleet, secondImage string) {
	ctx := context.Background()
	_, key := f.product("acme", orch.Policy{})

	// admit with auto_provision → a healthy engine and its key.
	r := f.call("POST", "/engines/alice/admit", key, map[string]any{"auto_provision": true})
	require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
	require.Equal(t, true, r.Body["admitted"])
	url, ekey, id := r.str("engine", "url"), r.str("engine", "api_key"), r.str("engine", "engine_id")
	require.Equal(t, "running", r.str("engine", "status"))
	require.NotEmpty(t, ekey)

	h := engineCall(t, "GET", url+"/health", "", nil)
	require.Equal(t, http.StatusOK, h.Status)
	require.Equal(t, http.StatusUnauthorized, engineCall(t, "GET", url+"/memories", "wrong", nil).Status)
	require.Equal(t, http.StatusCreated, engineCall(t, "POST", url+"/memories", ekey, map[string]any{"content": "the cat is called Miso"}).Status)

	// admit again: idempotent, same engine, warm.
	r2 := f.call("POST", "/engines/alice/admit", key, nil)
	require.Equal(t, http.StatusOK, r2.Status)
	require.Equal(t, id, r2.str("engine", "engine_id"))
	require.Equal(t, ekey, r2.str("engine", "api_key"))

	// GET shows the key; list does not.
	g := f.call("GET", "/engines/alice", key, nil)
	require.Equal(t, ekey, g.str("api_key"))
	l := f.call("GET", "/engines", key, nil)
	require.EqualValues(t, 1, l.Body["total"])
	require.NotContains(t, l.Body["engines"].([]any)[0].(map[string]any), "api_key")

	// stop → admit says engine_sleeping → start.
	s := f.call("POST", "/engines/alice/stop", key, nil)
	require.Equal(t, http.StatusOK, s.Status, "%v", s.Body)
	require.Equal(t, "stopped", s.str("status"))
	require.Equal(t, http.StatusConflict, f.call("POST", "/engines/alice/stop", key, nil).Status)
	a := f.call("POST", "/engines/alice/admit", key, nil)
	require.Equal(t, false, a.Body["admitted"])
	require.Equal(t, "engine_sleeping", a.Body["reason"])
	st := f.call("POST", "/engines/alice/start", key, nil)
	require.Equal(t, http.StatusOK, st.Status, "%v", st.Body)
	require.Equal(t, "running", st.str("status"))
	require.Equal(t, url, st.str("url"))
	require.Equal(t, "ENGINE_ALREADY_RUNNING", f.call("POST", "/engines/alice/start", key, nil).code())

	// rotate-key: the new key works, the old one still does during the overlap.
	rk := f.call("POST", "/engines/alice/rotate-key", key, nil)
	require.Equal(t, http.StatusOK, rk.Status, "%v", rk.Body)
	newKey := rk.str("api_key")
	require.NotEqual(t, ekey, newKey)
	require.Equal(t, http.StatusOK, engineCall(t, "GET", url+"/memories", newKey, nil).Status)
	require.Equal(t, http.StatusOK, engineCall(t, "GET", url+"/memories", ekey, nil).Status, "old key during overlap")
	require.Equal(t, newKey, f.call("GET", "/engines/alice", key, nil).str("api_key"))

	// upgrade to a second image: data kept.
	if secondImage != "" {
		u := f.call("POST", "/engines/alice/upgrade", key, map[string]any{"engine_version": secondImage})
		require.Equal(t, http.StatusOK, u.Status, "%v", u.Body)
		require.Equal(t, secondImage, f.call("GET", "/engines/alice", key, nil).str("engine_version"))
		m := engineCall(t, "GET", url+"/memories?q=Miso", newKey, nil)
		require.Equal(t, http.StatusOK, m.Status)
		require.Len(t, m.Body["memories"], 1, "memory survives the upgrade")
	}

	// destroy: container, volume, port and row gone.
	d := f.call("DELETE", "/engines/alice", key, nil)
	require.Equal(t, http.StatusOK, d.Status, "%v", d.Body)
	require.Equal(t, "destroyed", d.str("status"))
	require.Equal(t, id, d.str("engine_id"))
	require.Equal(t, "ENGINE_NOT_FOUND", f.call("GET", "/engines/alice", key, nil).code())
	info, err := f.Backend.Inspect(ctx, id)
	require.NoError(t, err)
	require.Equal(t, orch.RuntimeMissing, info.State)
	_, vols, err := f.Backend.List(ctx)
	require.NoError(t, err)
	require.Empty(t, vols)
	var n int
	require.NoError(t, f.Pool.QueryRow(ctx, `SELECT count(*) FROM engines`).Scan(&n))
	require.Zero(t, n)

	want := []string{"provision", "stop", "start", "rotate_key"}
	if secondImage != "" {
		want = append(want, "upgrade")
	}
	require.Equal(t, append(want, "destroy"), f.auditActions(id), "every action of the flow is audited, in order")
}

func TestContractFlowSubprocess(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{})
	contractFlow(t, f, "enginefleet/engine:e2e-2")
}

// Rotate-key's overlap ends: the old key is refused afterwards.
func TestRotateKeyOverlapEnds(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{keyOverlap: 2 * time.Second})
	_, key := f.product("acme", orch.Policy{})
	r := f.call("POST", "/engines/provision", key, map[string]any{"user_id": "bob"})
	require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
	url, old := r.str("url"), r.str("api_key")
	rk := f.call("POST", "/engines/bob/rotate-key", key, nil)
	require.Equal(t, http.StatusOK, rk.Status, "%v", rk.Body)
	require.Equal(t, http.StatusOK, engineCall(t, "GET", url+"/memories", old, nil).Status)
	require.Eventually(t, func() bool {
		return engineCall(t, "GET", url+"/memories", old, nil).Status == http.StatusUnauthorized
	}, 10*time.Second, 200*time.Millisecond, "old key must stop working after the overlap")
	require.Equal(t, http.StatusOK, engineCall(t, "GET", url+"/memories", rk.str("api_key"), nil).Status)
}
