package e2e_test

import (
	"context"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/moby/moby/client"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/backend/docker"
	"github.com/enginefleet/orchestrator/backend/docker/dockertest"
	"github.com/enginefleet/orchestrator/internal/testenv"
)

// The Postgres restore drill as an operator runs it (`orchestrator drill`,
// docs/production.md): on a live Docker fleet of two products, pg_dump of
// its database, a restore into a fresh Postgres server, a fresh API on the
// copy; /status is the live fleet's and every running engine answers to
// the key the copy holds. An engine that does not answer fails the drill.
func TestPostgresRestoreDrill(t *testing.T) {
	t.Parallel()
	cli := dockertest.RequireDocker(t)
	image := dockertest.EngineImage(t, "e2e-1")
	pf := newProcFleet(t)
	node := "e2e-drill-" + randHex(4)
	be, err := docker.New(docker.Config{Network: e2eNetwork, Node: node, Fleet: fleetID(t, testenv.Pool(t, pf.dbURL))}, testenv.Quiet())
	require.NoError(t, err)
	f := &fleet{t: t, Backend: be, Node: node}
	t.Cleanup(f.removeEngines)
	pf.env = append(pf.env, "ORCH_ENGINE_BACKEND=docker", "ORCH_ENGINE_IMAGE="+image, "ORCH_NODE="+node,
		"ORCH_ENGINE_NETWORK="+e2eNetwork)
	apiP, workerP := pf.start("api"), pf.start("worker")

	keys := map[string]string{"acme": pf.register(apiP, "acme"), "beta": pf.register(apiP, "beta")}
	call := func(slug, method, path string, body any) resp {
		return do(t, method, apiP.url()+path, body, map[string]string{"X-Platform-Key": keys[slug]})
	}
	for _, u := range []struct{ slug, user string }{{"acme", "ann"}, {"acme", "bob"}, {"beta", "cat"}} {
		r := call(u.slug, "POST", "/engines/provision", map[string]any{"user_id": u.user})
		require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
		require.Equal(t, http.StatusCreated, engineCall(t, "POST", r.str("url")+"/memories", r.str("api_key"),
			map[string]any{"content": "before the drill"}).Status)
	}
	r := call("acme", "POST", "/engines/bob/stop", map[string]any{})
	require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)

	pg := testenv.OwnPostgres(t) // a fresh server, as after losing the live one
	target := func(name string) string {
		conn, err := pgx.Connect(t.Context(), strings.Replace(pg.URL, "/orch?", "/postgres?", 1))
		require.NoError(t, err)
		defer conn.Close(context.Background())
		_, err = conn.Exec(t.Context(), "CREATE DATABASE "+name)
		require.NoError(t, err)
		return strings.Replace(pg.URL, "/orch?", "/"+name+"?", 1)
	}
	drill := func(targetURL string) (string, error) {
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, orchestratorBinary(t), "drill", "--target", targetURL)
		cmd.Env = pf.env
		out, err := cmd.CombinedOutput()
		t.Logf("orchestrator drill:\n%s", out)
		return string(out), err
	}

	restored := target("restored")
	out, err := drill(restored)
	require.NoError(t, err)
	assert.Contains(t, out, "drill: product acme: /status 2 engines (running 1, stopped 1)")
	assert.Contains(t, out, "drill: product beta: /status 1 engines (running 1)")
	assert.Contains(t, out, "drill: ok: 2 products, 3 engines as expected, 2 running engines reachable with their keys (1 not running")

	// The copy holds the fleet; the live fleet is untouched (its platform
	// keys were rotated on the copy only).
	pool := testenv.Pool(t, restored)
	var n int
	require.NoError(t, pool.QueryRow(t.Context(), `SELECT count(*) FROM engines`).Scan(&n))
	assert.Equal(t, 3, n)
	for slug := range keys {
		st := call(slug, "GET", "/status", nil)
		assert.Equal(t, http.StatusOK, st.Status, "live platform key of %s still works: %v", slug, st.Body)
	}

	// A target that is not empty is refused before anything is restored.
	out, err = drill(restored)
	require.Error(t, err)
	assert.Contains(t, out, "not empty")

	// An engine the live database says is running but that does not
	// answer fails the drill, naming it. The worker is stopped first, so
	// nothing starts it again meanwhile.
	require.NoError(t, workerP.stop(t))
	_, err = cli.ContainerStop(t.Context(), orch.ContainerName(engineOf(t, pf, "ann")), client.ContainerStopOptions{})
	require.NoError(t, err)
	out, err = drill(target("restored_again"))
	require.Error(t, err)
	assert.Contains(t, out, "FAIL: product acme: engine of user ann: not reachable at its URL")
	assert.Contains(t, out, "drill: product beta: 1 running engines admitted and answering to their keys")
}

// engineOf is the engine id of a user of any product of pf's database.
func engineOf(t *testing.T, pf *procFleet, user string) string {
	t.Helper()
	var id string
	require.NoError(t, testenv.Pool(t, pf.dbURL).QueryRow(t.Context(), `SELECT id FROM engines WHERE user_id = $1`, user).Scan(&id))
	return id
}
