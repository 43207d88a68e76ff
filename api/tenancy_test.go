package api_test

import (
	"context"
	"net/http"
	"sort"
	"strings"
	"testing"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
)

// engineRoutes lists every registered product route about one user's
// engine ({user_id} in the path), with a body that passes validation.
func engineRoutes(t *testing.T, h *harness) []operation {
	t.Helper()
	var out []operation
	for _, op := range operations(t, h) {
		if op.scheme == "platformKey" && strings.Contains(op.path, "{user_id}") {
			out = append(out, op)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].method+out[i].path < out[j].method+out[j].path })
	return out
}

// coreEngineRoute: the contract's routes on one engine, whose answer for a
// missing user is 404 ENGINE_NOT_FOUND.
func coreEngineRoute(r operation) bool {
	if r.path == "/engines/{user_id}" {
		return r.method == "GET" || r.method == "DELETE"
	}
	for _, suffix := range []string{"/start", "/stop", "/restart", "/rotate-key", "/upgrade"} {
		if r.method == "POST" && r.path == "/engines/{user_id}"+suffix {
			return true
		}
	}
	return false
}

func routeBody(path string) any {
	switch {
	case strings.HasSuffix(path, "/upgrade"):
		return map[string]any{"engine_version": "enginefleet/engine:2"}
	case strings.HasSuffix(path, "/restore"):
		return map[string]any{"backup_id": uuid.NewString()}
	}
	return nil
}

// engineState is what a foreign product's calls must never change.
func engineState(t *testing.T, h *harness, id string) string {
	t.Helper()
	var s string
	require.NoError(t, h.Pool.QueryRow(context.Background(), `SELECT status || '|' || coalesce(operation_id::text, '') || '|' ||
		engine_key_hash || '|' || engine_version || '|' || updated_at::text FROM engines WHERE id = $1`, id).Scan(&s))
	return s
}

// TestTenantIsolation: every product route called with another product's
// user_id answers exactly as for a user that does not exist, changes
// nothing of the other product, and lists never show its engines.
func TestTenantIsolation(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", testConfig())
	idA, keyA := h.register("product-a", nil)
	idB, keyB := h.register("product-b", nil)

	// Both have a "shared" user (user ids are per product); each has its own too.
	port := 20500
	next := func() int { port++; return port }
	engines := map[string]orch.Engine{}
	for _, u := range []string{"shared", "a-only", "a-start", "a-stop", "a-restart", "a-rotate", "a-upgrade", "a-delete"} {
		st := orch.StateRunning
		if u == "a-start" {
			st = orch.StateStopped
		}
		engines["A:"+u] = h.insertEngine(idA, u, next(), st)
	}
	for _, u := range []string{"shared", "b-only"} {
		engines["B:"+u] = h.insertEngine(idB, u, next(), orch.StateRunning)
	}
	before := map[string]string{}
	for k, e := range engines {
		if strings.HasPrefix(k, "B:") {
			before[k] = engineState(t, h, e.ID)
		}
	}

	routes := engineRoutes(t, h)
	require.GreaterOrEqual(t, len(routes), 8, "engine routes: %v", routes)
	for _, pair := range []struct {
		key, foreign string
	}{{keyA, "b-only"}, {keyB, "a-only"}, {keyB, "a-start"}} {
		for _, r := range routes {
			name := r.method + " " + r.path + " as " + pair.foreign
			path := func(user string) string { return strings.ReplaceAll(r.path, "{user_id}", user) }
			fStatus, fBody, _ := h.do(r.method, path(pair.foreign), routeBody(r.path), platform(pair.key))
			mStatus, mBody, _ := h.do(r.method, path("ghost-"+uuid.NewString()[:8]), routeBody(r.path), platform(pair.key))
			require.Equal(t, mStatus, fStatus, "%s: foreign %v, missing %v", name, fBody, mBody)
			require.Equal(t, errCode(mBody), errCode(fBody), name)
			if strings.HasSuffix(r.path, "/admit") {
				require.Equal(t, http.StatusOK, fStatus, name)
				require.Equal(t, map[string]any{"admitted": false, "engine": nil, "reason": "engine_not_found"}, fBody, name)
				require.Equal(t, fBody, mBody, name)
				continue
			}
			if !coreEngineRoute(r) {
				continue // newer routes (backups…): answering as for a missing user is what is asked
			}
			require.Equal(t, http.StatusNotFound, fStatus, "%s: %v", name, fBody)
			require.Equal(t, "ENGINE_NOT_FOUND", errCode(fBody), name)
		}
	}

	// Admit with auto_provision for the other product's user provisions the
	// caller's own engine, exactly as for a new user, and leaves B's alone.
	async := map[string]string{"X-Platform-Key": keyA, "Prefer": "respond-async"}
	fStatus, fBody, _ := h.do("POST", "/engines/b-only/admit", map[string]any{"auto_provision": true}, async)
	mStatus, mBody, _ := h.do("POST", "/engines/ghost-new/admit", map[string]any{"auto_provision": true}, async)
	require.Equal(t, http.StatusAccepted, mStatus, mBody)
	require.Equal(t, mStatus, fStatus, fBody)
	newEngine := fBody["engine"].(map[string]any)
	require.NotEqual(t, engines["B:b-only"].ID, newEngine["engine_id"])
	require.Equal(t, "provisioning", newEngine["status"])

	// The caller's own engines answer (202 with Prefer: respond-async): the
	// routes above were refused because of whose engine it was, not because
	// they do not work.
	for _, c := range []struct{ method, path string }{
		{"POST", "/engines/a-start/start"}, {"POST", "/engines/a-stop/stop"}, {"POST", "/engines/a-restart/restart"},
		{"POST", "/engines/a-rotate/rotate-key"}, {"POST", "/engines/a-upgrade/upgrade"}, {"DELETE", "/engines/a-delete"},
	} {
		status, body, _ := h.do(c.method, c.path, routeBody(c.path), async)
		require.Equal(t, http.StatusAccepted, status, "%s %s: %v", c.method, c.path, body)
	}
	status, body, _ := h.do("GET", "/engines/shared", nil, platform(keyA))
	require.Equal(t, http.StatusOK, status)
	require.Equal(t, engines["A:shared"].ID, body["engine_id"])
	keyAShared, _ := h.Keyring.Decrypt(engines["A:shared"].KeyEnc)
	require.Equal(t, keyAShared, body["api_key"])

	// B's engines are exactly as they were.
	for k, st := range before {
		require.Equal(t, st, engineState(t, h, engines[k].ID), "%s changed by the other product's calls", k)
	}

	// Operations: B's operation is A's "not found".
	status, body, _ = h.do("POST", "/engines/b-only/restart", nil, map[string]string{"X-Platform-Key": keyB, "Prefer": "respond-async"})
	require.Equal(t, http.StatusAccepted, status, body)
	opB := body["operation_id"].(string)
	fStatus, fBody, _ = h.do("GET", "/operations/"+opB, nil, platform(keyA))
	mStatus, mBody, _ = h.do("GET", "/operations/"+uuid.NewString(), nil, platform(keyA))
	require.Equal(t, http.StatusNotFound, fStatus)
	require.Equal(t, mStatus, fStatus)
	require.Equal(t, errCode(mBody), errCode(fBody))
	status, _, _ = h.do("GET", "/operations/"+opB, nil, platform(keyB))
	require.Equal(t, http.StatusOK, status)

	// Lists show only the caller's engines, with every filter.
	for _, q := range []string{"", "?status=running", "?status=stopped", "?limit=1000"} {
		for _, who := range []struct{ key, product string }{{keyA, idA}, {keyB, idB}} {
			status, body, _ := h.do("GET", "/engines"+q, nil, platform(who.key))
			require.Equal(t, http.StatusOK, status)
			var want int
			cond := ""
			if strings.HasPrefix(q, "?status=") {
				cond = " AND status = '" + strings.TrimPrefix(q, "?status=") + "'"
			}
			require.NoError(t, h.Pool.QueryRow(context.Background(), `SELECT count(*) FROM engines WHERE product_id = $1`+cond, who.product).Scan(&want))
			require.Equal(t, float64(want), body["total"], q)
			list := body["engines"].([]any)
			require.Len(t, list, want, q)
			for _, e := range list {
				var owner string
				require.NoError(t, h.Pool.QueryRow(context.Background(), `SELECT product_id::text FROM engines WHERE id = $1`,
					e.(map[string]any)["engine_id"]).Scan(&owner))
				require.Equal(t, who.product, owner, "list shows another product's engine")
				require.NotContains(t, e, "api_key")
			}
		}
	}

	// Fleet views, once they exist, count only the caller's engines.
	paths := h.Server.API().OpenAPI().Paths
	if item, ok := paths["/status"]; ok && item.Get != nil {
		var want int
		require.NoError(t, h.Pool.QueryRow(context.Background(), `SELECT count(*) FROM engines WHERE product_id = $1`, idB).Scan(&want))
		status, body, _ := h.do("GET", "/status", nil, platform(keyB))
		require.Equal(t, http.StatusOK, status)
		require.Equal(t, float64(want), body["total"])
	}
	if item, ok := paths["/metrics"]; ok && item.Get != nil {
		status, _, _ := h.do("GET", "/metrics", nil, platform(keyB))
		require.Equal(t, http.StatusOK, status)
	}
}
