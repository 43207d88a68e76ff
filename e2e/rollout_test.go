package e2e_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/internal/testenv"
)

// Fleet rollouts end to end: waves, bake, the health gate and its
// rollback, lazy upgrades of sleeping engines, one rollout per engine.

// rolloutOf polls GET /rollouts/{id} until its status is one of want
// (or the budget ends) and returns the last body.
func (f *fleet) waitRollout(id string, hdr map[string]string, budget time.Duration, want ...string) resp {
	f.t.Helper()
	var r resp
	deadline := time.Now().Add(budget)
	for {
		r = do(f.t, "GET", f.URL+"/rollouts/"+id, nil, hdr)
		require.Equal(f.t, http.StatusOK, r.Status, "%v", r.Body)
		if slices.Contains(want, r.str("status")) {
			return r
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("rollout %s is %s after %s, want %v: %v", id, r.str("status"), budget, want, r.Body)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func counts(r resp) map[string]int {
	out := map[string]int{}
	m, _ := r.Body["counts"].(map[string]any)
	for k, v := range m {
		out[k] = int(v.(float64))
	}
	return out
}

// brainHash is the SHA-256 of an engine's GET /memory/export: the bytes
// depend only on the brain's contents.
func brainHash(t testing.TB, url, key string) string {
	t.Helper()
	req, err := http.NewRequest("GET", url+"/memory/export", nil)
	require.NoError(t, err)
	req.Header.Set("X-Engine-Key", key)
	res, err := httpClient.Do(req)
	require.NoError(t, err)
	defer res.Body.Close()
	require.Equal(t, http.StatusOK, res.StatusCode)
	h := sha256.New()
	_, err = io.Copy(h, res.Body)
	require.NoError(t, err)
	return hex.EncodeToString(h.Sum(nil))
}

// rolloutAudit lists the rollout's own audit actions in order.
func (f *fleet) rolloutAudit(id string) []string {
	f.t.Helper()
	rows, err := f.Pool.Query(context.Background(), `SELECT action FROM audit_log
		WHERE metadata->>'rollout_id' = $1 AND action LIKE 'rollout%' ORDER BY id`, id)
	require.NoError(f.t, err)
	defer rows.Close()
	var out []string
	for rows.Next() {
		var a string
		require.NoError(f.t, rows.Scan(&a))
		out = append(out, a)
	}
	return out
}

// A product's rollout goes wave by wave over its own engines only, leaves
// a stopped engine for its next start (which takes the new image), and
// owns its engines: a second rollout over them is refused while it runs.
func TestRolloutWavesComplete(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{ports: 20})
	_, key := f.product("acme", orchPolicy())
	_, otherKey := f.product("other", orchPolicy())
	hdr := map[string]string{"X-Platform-Key": key}
	for i := range 8 {
		r := f.call("POST", "/engines/provision", key, map[string]any{"user_id": fmt.Sprintf("u%d", i)})
		require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
	}
	require.Equal(t, http.StatusOK, f.call("POST", "/engines/provision", otherKey, map[string]any{"user_id": "o1"}).Status)
	require.Equal(t, http.StatusOK, f.call("POST", "/engines/u7/stop", key, nil).Status)

	r := f.call("POST", "/rollouts", key, map[string]any{"image": "enginefleet/engine:e2e-2",
		"waves": []map[string]any{{"count": 1}, {"percent": 50}, {"percent": 100}}, "bake_seconds": 1, "in_use_seconds": 0, "max_concurrent": 3})
	require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
	id := r.str("rollout_id")
	require.Equal(t, float64(8), r.Body["engines"])
	var sizes []int
	for _, w := range r.Body["waves"].([]any) {
		sizes = append(sizes, int(w.(map[string]any)["engines"].(float64)))
	}
	require.Equal(t, []int{1, 3, 4}, sizes, "1 engine, then up to 50 %, then the rest")

	// One rollout per engine: the operator's fleet-wide one is refused
	// while the product's runs.
	r2 := do(t, "POST", f.URL+"/rollouts", map[string]any{"image": "enginefleet/engine:e2e-3"}, map[string]string{"X-Admin-Key": adminKey})
	require.Equal(t, http.StatusConflict, r2.Status, "%v", r2.Body)
	require.Equal(t, "OPERATION_IN_PROGRESS", r2.code())
	// Another product neither sees nor acts on it.
	require.Equal(t, http.StatusNotFound, f.call("GET", "/rollouts/"+id, otherKey, nil).Status)
	require.Equal(t, http.StatusNotFound, f.call("POST", "/rollouts/"+id+"/pause", otherKey, nil).Status)

	done := f.waitRollout(id, hdr, 2*time.Minute, "completed", "rolled_back", "aborted")
	require.Equal(t, "completed", done.str("status"), "%v", done.Body)
	require.Equal(t, map[string]int{"upgraded": 7, "lazy": 1}, counts(done))
	for i := range 7 {
		e := f.call("GET", fmt.Sprintf("/engines/u%d", i), key, nil)
		require.Equal(t, "enginefleet/engine:e2e-2", e.str("engine_version"), "u%d", i)
		require.Equal(t, "running", e.str("status"))
	}
	require.Equal(t, "enginefleet/engine:e2e-1", f.call("GET", "/engines/o1", otherKey, nil).str("engine_version"), "another product's engine is untouched")
	require.Equal(t, "enginefleet/engine:e2e-1", f.call("GET", "/engines/u7", key, nil).str("engine_version"), "a stopped engine is not started to be upgraded")

	// The stopped engine takes the new image when it starts.
	require.Equal(t, http.StatusOK, f.call("POST", "/engines/u7/start", key, nil).Status)
	e := f.call("GET", "/engines/u7", key, nil)
	require.Equal(t, "enginefleet/engine:e2e-2", e.str("engine_version"))
	require.Equal(t, "running", e.str("status"))
	require.Equal(t, map[string]int{"upgraded": 8}, counts(f.waitRollout(id, hdr, time.Second, "completed")))

	require.Equal(t, []string{"rollout_create", "rollout_wave_baked", "rollout_wave", "rollout_wave_baked", "rollout_wave",
		"rollout_wave_baked", "rollout_done"}, f.rolloutAudit(id))

	// Finished, it owns nothing: a new rollout over the same engines is accepted.
	r3 := do(t, "POST", f.URL+"/rollouts", map[string]any{"image": "enginefleet/engine:e2e-3", "bake_seconds": 0, "in_use_seconds": 0},
		map[string]string{"X-Admin-Key": adminKey})
	require.Equal(t, http.StatusOK, r3.Status, "%v", r3.Body)
	require.Equal(t, float64(9), r3.Body["engines"], "every product's engines")
	list := do(t, "GET", f.URL+"/rollouts", nil, map[string]string{"X-Admin-Key": adminKey})
	require.Len(t, list.Body["rollouts"], 2)
	require.Len(t, f.call("GET", "/rollouts", key, nil).Body["rollouts"], 1, "a product lists its own")
	f.waitRollout(r3.str("rollout_id"), map[string]string{"X-Admin-Key": adminKey}, 2*time.Minute, "completed")
}

// A release that boots and then fails its health checks stops the rollout
// in its first wave: every engine it upgraded goes back to its previous
// image with its brain byte-identical, the later waves are never touched.
func TestRolloutBadImageRollsBack(t *testing.T) {
	t.Parallel()
	bad := filepath.Join(t.TempDir(), "engine-breaks-after-boot")
	require.NoError(t, os.WriteFile(bad, []byte("#!/bin/sh\nexport ENGINE_UNHEALTHY_AFTER_S=1\nexec "+testenv.EngineBinary(t)+" \"$@\"\n"), 0o755))
	f := newFleet(t, fleetOpts{ports: 20, scheduler: true, healthInterval: time.Second, allowImages: "enginefleet/engine," + bad})
	_, key := f.product("acme", orchPolicy())
	hdr := map[string]string{"X-Platform-Key": key}
	brains := map[string]string{}
	for i := range 6 {
		u := fmt.Sprintf("u%d", i)
		r := f.call("POST", "/engines/provision", key, map[string]any{"user_id": u})
		require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
		url, ek := r.str("url"), r.str("api_key")
		for j := range 3 {
			m := engineCall(t, "POST", url+"/memories", ek, map[string]any{"content": fmt.Sprintf("%s remembers %d", u, j)})
			require.Equal(t, http.StatusCreated, m.Status, "%v", m.Body)
		}
		brains[u] = brainHash(t, url, ek)
	}

	r := f.call("POST", "/rollouts", key, map[string]any{"image": bad, "waves": []map[string]any{{"count": 2}, {"percent": 100}},
		"bake_seconds": 5, "failure_budget": 0, "in_use_seconds": 0, "max_concurrent": 2})
	require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
	id := r.str("rollout_id")
	done := f.waitRollout(id, hdr, 2*time.Minute, "rolled_back", "completed", "aborted")
	require.Equal(t, "rolled_back", done.str("status"), "%v", done.Body)
	require.Contains(t, done.str("stop_reason"), "wave 1 of 2")
	c := counts(done)
	require.Equal(t, 4, c["cancelled"], "the second wave never started: %v", c)
	require.Equal(t, 2, c["rolled_back"], "%v", c)
	require.NotEmpty(t, done.Body["failures"])

	for i := range 6 {
		u := fmt.Sprintf("u%d", i)
		e := f.call("GET", "/engines/"+u, key, nil)
		require.Equal(t, "enginefleet/engine:e2e-1", e.str("engine_version"), u)
		require.Equal(t, "running", e.str("status"), u)
		require.Equal(t, brains[u], brainHash(t, e.str("url"), e.str("api_key")), "%s's brain is byte-identical", u)
	}
	acts := f.rolloutAudit(id)
	require.Equal(t, "rollout_create", acts[0])
	require.Contains(t, acts, "rollout_engine_fail")
	require.Contains(t, acts, "rollout_gate")
	require.Equal(t, "rollout_done", acts[len(acts)-1])
	require.NotContains(t, acts, "rollout_wave", "no second wave")
}
