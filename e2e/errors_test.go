package e2e_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
)

// Every documented error code on its path, with the documented status.
func TestErrorCodes(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{ports: 2})
	two := 2
	_, key := f.product("acme", orch.Policy{MaxEngines: &two})

	cases := []struct {
		name         string
		method, path string
		key          string
		body         any
		status       int
		code         string
	}{
		{"no platform key", "GET", "/engines", "", nil, 401, "INVALID_PLATFORM_KEY"},
		{"unknown platform key", "GET", "/engines", "nope", nil, 401, "INVALID_PLATFORM_KEY"},
		{"bad user id", "GET", "/engines/" + strings.Repeat("x", 129), key, nil, 400, "INVALID_REQUEST"},
		{"bad user id chars", "POST", "/engines/provision", key, map[string]any{"user_id": "a b"}, 400, "INVALID_REQUEST"},
		{"bad user id on admit", "POST", "/engines/a%20b/admit", key, nil, 400, "INVALID_REQUEST"},
		{"bad user id on backups", "GET", "/engines/-x/backups", key, nil, 400, "INVALID_REQUEST"},
		{"bad user id, no key", "DELETE", "/engines/a%20b", "", nil, 401, "INVALID_PLATFORM_KEY"},
		{"malformed json", "POST", "/engines/provision", key, "{", 400, "INVALID_REQUEST"},
		{"missing engine", "GET", "/engines/ghost", key, nil, 404, "ENGINE_NOT_FOUND"},
		{"start missing", "POST", "/engines/ghost/start", key, nil, 404, "ENGINE_NOT_FOUND"},
		{"stop missing", "POST", "/engines/ghost/stop", key, nil, 404, "ENGINE_NOT_FOUND"},
		{"rotate missing", "POST", "/engines/ghost/rotate-key", key, nil, 404, "ENGINE_NOT_FOUND"},
		{"destroy missing", "DELETE", "/engines/ghost", key, nil, 404, "ENGINE_NOT_FOUND"},
		{"missing operation", "GET", "/operations/00000000-0000-0000-0000-000000000000", key, nil, 404, "OPERATION_NOT_FOUND"},
		{"bad status filter", "GET", "/engines?status=zombie", key, nil, 400, "INVALID_REQUEST"},
	}
	for _, c := range cases {
		var r resp
		if s, ok := c.body.(string); ok {
			r = rawCall(t, f, c.method, c.path, c.key, s)
		} else {
			r = f.call(c.method, c.path, c.key, c.body)
		}
		require.Equal(t, c.status, r.Status, "%s: %v", c.name, r.Body)
		require.Equal(t, c.code, r.code(), c.name)
		require.NotEmpty(t, r.str("error", "message"), c.name)
	}

	// ENGINE_ALREADY_EXISTS, ENGINE_ALREADY_RUNNING, ENGINE_NOT_RUNNING.
	require.Equal(t, 200, f.call("POST", "/engines/provision", key, map[string]any{"user_id": "u1"}).Status)
	r := f.call("POST", "/engines/provision", key, map[string]any{"user_id": "u1"})
	require.Equal(t, 409, r.Status)
	require.Equal(t, "ENGINE_ALREADY_EXISTS", r.code())
	r = f.call("POST", "/engines/u1/start", key, nil)
	require.Equal(t, 409, r.Status)
	require.Equal(t, "ENGINE_ALREADY_RUNNING", r.code())
	require.Equal(t, 200, f.call("POST", "/engines/u1/stop", key, nil).Status)
	for _, p := range []string{"/engines/u1/stop", "/engines/u1/rotate-key"} {
		r = f.call("POST", p, key, nil)
		require.Equal(t, 409, r.Status, p)
		require.Equal(t, "ENGINE_NOT_RUNNING", r.code(), p)
	}

	// QUOTA_EXCEEDED at max_engines (provision and admit), with Retry-After.
	require.Equal(t, 200, f.call("POST", "/engines/provision", key, map[string]any{"user_id": "u2"}).Status)
	r = f.call("POST", "/engines/provision", key, map[string]any{"user_id": "u3"})
	require.Equal(t, 429, r.Status)
	require.Equal(t, "QUOTA_EXCEEDED", r.code())
	require.NotEmpty(t, r.Header.Get("Retry-After"))
	r = f.call("POST", "/engines/u3/admit", key, map[string]any{"auto_provision": true})
	require.Equal(t, 429, r.Status)
	require.Equal(t, "QUOTA_EXCEEDED", r.code())

	// PORT_EXHAUSTION with a range of 2 ports, for a product without quota.
	_, key2 := f.product("other", orch.Policy{})
	r = f.call("POST", "/engines/provision", key2, map[string]any{"user_id": "v1"})
	require.Equal(t, 503, r.Status)
	require.Equal(t, "PORT_EXHAUSTION", r.code())
	// Destroy releases a port.
	require.Equal(t, 200, f.call("DELETE", "/engines/u2", key, nil).Status)
	require.Equal(t, 200, f.call("POST", "/engines/provision", key2, map[string]any{"user_id": "v1"}).Status)
}

func rawCall(t *testing.T, f *fleet, method, path, key, body string) resp {
	req, err := http.NewRequest(method, f.URL+path, strings.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Platform-Key", key)
	res, err := httpClient.Do(req)
	require.NoError(t, err)
	defer res.Body.Close()
	out := resp{Status: res.StatusCode, Header: res.Header}
	require.NoError(t, decodeJSON(res.Body, &out.Body))
	return out
}

// BOOT_TIMEOUT with an engine made slow to boot: 504, the engine is failed
// and audited provision_failed.
func TestBootTimeout(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{bootTimeout: 2 * time.Second, engineEnv: map[string]string{"ENGINE_BOOT_DELAY_S": "30"}})
	_, key := f.product("acme", orch.Policy{})
	r := f.call("POST", "/engines/provision", key, map[string]any{"user_id": "slow"})
	require.Equal(t, 504, r.Status, "%v", r.Body)
	require.Equal(t, "BOOT_TIMEOUT", r.code())
	g := f.call("GET", "/engines/slow", key, nil)
	require.Equal(t, "failed", g.str("status"))
	require.Equal(t, []string{"provision_failed"}, f.auditActions(g.str("engine_id")))
	a := f.call("POST", "/engines/slow/admit", key, map[string]any{"auto_provision": true})
	require.Equal(t, false, a.Body["admitted"])
	require.Equal(t, "engine_unhealthy", a.Body["reason"])
}

// 1,000 concurrent admits for one new user create exactly one engine and
// all 1,000 get it.
func TestThousandAdmitsOneUser(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{})
	_, key := f.product("acme", orch.Policy{})
	var ok atomic.Int64
	ids := make([]string, 1000)
	parallel(1000, func(i int) {
		r := f.call("POST", "/engines/dave/admit", key, map[string]any{"auto_provision": true})
		if r.Status == 200 && r.Body["admitted"] == true {
			ok.Add(1)
			ids[i] = r.str("engine", "engine_id")
		}
	})
	require.EqualValues(t, 1000, ok.Load())
	for _, id := range ids {
		require.Equal(t, ids[0], id)
	}
	var n int
	require.NoError(t, f.Pool.QueryRow(context.Background(), `SELECT count(*) FROM engines`).Scan(&n))
	require.Equal(t, 1, n)
	rts, _, err := f.Backend.List(context.Background())
	require.NoError(t, err)
	require.Len(t, rts, 1)
	require.Equal(t, []string{"provision"}, f.auditActions(ids[0]))
}

// Prefer: respond-async answers 202 with an operation to follow.
func TestAsyncOperations(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{})
	_, key := f.product("acme", orch.Policy{})
	r := f.call("POST", "/engines/provision", key, map[string]any{"user_id": "erin"}, "Prefer", "respond-async")
	require.Equal(t, http.StatusAccepted, r.Status, "%v", r.Body)
	require.Equal(t, "provisioning", r.str("status"))
	op := r.str("operation_id")
	require.NotEmpty(t, op)
	require.Eventually(t, func() bool {
		return f.call("GET", "/operations/"+op, key, nil).str("status") == "succeeded"
	}, 20*time.Second, 50*time.Millisecond)
	o := f.call("GET", "/operations/"+op, key, nil)
	require.Equal(t, "provision", o.str("kind"))
	require.Equal(t, "running", f.call("GET", "/engines/erin", key, nil).str("status"))

	s := f.call("POST", "/engines/erin/stop", key, nil, "Prefer", "respond-async")
	require.Equal(t, http.StatusAccepted, s.Status)
	require.Eventually(t, func() bool {
		return f.call("GET", "/operations/"+s.str("operation_id"), key, nil).str("status") == "succeeded"
	}, 20*time.Second, 50*time.Millisecond)
	require.Equal(t, "stopped", f.call("GET", "/engines/erin", key, nil).str("status"))

	// Another product cannot see the operation.
	_, other := f.product("other", orch.Policy{})
	require.Equal(t, "OPERATION_NOT_FOUND", f.call("GET", "/operations/"+op, other, nil).code())

	// A failing operation reports its error code.
	f2 := newFleet(t, fleetOpts{bootTimeout: time.Second, engineEnv: map[string]string{"ENGINE_BOOT_DELAY_S": "30"}})
	_, k2 := f2.product("acme", orch.Policy{})
	r2 := f2.call("POST", "/engines/provision", k2, map[string]any{"user_id": "slow"}, "Prefer", "respond-async")
	require.Equal(t, http.StatusAccepted, r2.Status)
	require.Eventually(t, func() bool {
		return f2.call("GET", "/operations/"+r2.str("operation_id"), k2, nil).str("status") == "failed"
	}, 20*time.Second, 50*time.Millisecond)
	require.Equal(t, "BOOT_TIMEOUT", f2.call("GET", "/operations/"+r2.str("operation_id"), k2, nil).str("error_code"))
}

// Operations requested back to back, each right after the previous one
// answered: River marks a job completed a moment after its operation is
// done, and the next operation's job must not be taken for a duplicate.
func TestBackToBackOperations(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{})
	_, key := f.product("acme", orch.Policy{})
	require.Equal(t, 200, f.call("POST", "/engines/provision", key, map[string]any{"user_id": "bb"}).Status)
	for i := 0; i < 5; i++ {
		r := f.call("POST", "/engines/bb/restart", key, nil)
		require.Equal(t, http.StatusOK, r.Status, "restart %d: %v", i, r.Body)
		s := f.call("POST", "/engines/bb/stop", key, nil)
		require.Equal(t, http.StatusOK, s.Status, "stop %d: %v", i, s.Body)
		st := f.call("POST", "/engines/bb/start", key, nil)
		require.Equal(t, http.StatusOK, st.Status, "start %d: %v", i, st.Body)
	}
}

// An engine that dies while booting (here: its port is taken) is started
// again within the boot deadline and comes up once the cause is gone, long
// before the boot timeout.
func TestEngineDiesWhileBooting(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{ports: 1, bootTimeout: 60 * time.Second})
	_, key := f.product("acme", orch.Policy{})
	squatter, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", f.PortMin))
	require.NoError(t, err)
	start := time.Now()
	r := f.call("POST", "/engines/provision", key, map[string]any{"user_id": "phoenix"}, "Prefer", "respond-async")
	require.Equal(t, http.StatusAccepted, r.Status)
	// The first attempt fails on the taken port (the only one: the engine
	// cannot move), as its job's recorded error says.
	testenv.Await(t, 20*time.Second, "the first attempt fails on the taken port", func() error {
		var errs []string
		err := f.Pool.QueryRow(context.Background(), `SELECT coalesce(array_agg(e->>'error'), '{}')
			FROM river_job, unnest(errors) e WHERE kind = 'engine_provision'`).Scan(&errs)
		if err != nil {
			return err
		}
		return testenv.Check(len(errs) > 0 && strings.Contains(errs[0], "port"), "job errors %q", errs)
	})
	squatter.Close()
	op := r.str("operation_id")
	require.Eventually(t, func() bool {
		return f.call("GET", "/operations/"+op, key, nil).str("status") == "succeeded"
	}, 20*time.Second, 100*time.Millisecond)
	require.Less(t, time.Since(start), 20*time.Second, "well before the 60 s boot timeout")
	require.Equal(t, "running", f.call("GET", "/engines/phoenix", key, nil).str("status"))
}

// An upgrade to an image that is not there fails at once with a message
// naming it (no retries: publishing the image is someone's job), and the
// engine keeps running its old image.
func TestUpgradeToMissingImageDocker(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{backend: "docker"})
	_, key := f.product("acme", orch.Policy{})
	e := f.provisionUser(key, "ann")
	missing := "enginefleet/engine:missing-" + randHex(4)

	start := time.Now()
	r := f.call("POST", "/engines/ann/upgrade", key, map[string]any{"engine_version": missing})
	took := time.Since(start)
	require.Equal(t, http.StatusBadGateway, r.Status, "%v", r.Body)
	require.Equal(t, "BACKEND_FAILED", r.code())
	require.Contains(t, r.Body["error"].(map[string]any)["message"], missing)
	require.Less(t, took, 30*time.Second, "not retried (five attempts would take longer)")
	t.Logf("upgrade to a missing image answered in %s: %v", took.Round(time.Millisecond), r.Body["error"])

	var attempts int
	require.NoError(t, f.Pool.QueryRow(t.Context(), `SELECT max(attempt) FROM river_job WHERE kind = 'engine_upgrade'`).Scan(&attempts))
	require.Equal(t, 1, attempts)
	g := f.call("GET", "/engines/ann", key, nil)
	require.Equal(t, "running", g.str("status"))
	require.Equal(t, f.Image, g.str("engine_version"))
	require.Equal(t, http.StatusOK, engineCall(t, "GET", e.URL+"/health", "", nil).Status)
}
