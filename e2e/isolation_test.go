package e2e_test

import (
	"context"
	"net/http"
	"testing"

	"github.com/enginefleet/orchestrator/backend/docker/dockertest"

	"github.com/moby/moby/client"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/schema"
)

// An engine left on a network where containers reach each other (as an
// older version left every engine) is moved by reconcile onto the
// isolated engines' network: recreated on its volume, healthy, audited.
func TestReconcileIsolatesEnginesDocker(t *testing.T) {
	t.Parallel()
	open := "enginefleet_e2e_open_" + randHex(4)
	t.Cleanup(func() { dockertest.RemoveNetworkIfEmpty(open) }) // after the fleet's engines are gone
	f := newFleet(t, fleetOpts{backend: "docker"})
	cli := dockertest.RequireDocker(t)
	ctx := context.Background()
	_, key := f.product("acme", orch.Policy{})
	r := f.call("POST", "/engines/provision", key, map[string]any{"user_id": "dave"})
	require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
	id, url, ekey := r.str("engine_id"), r.str("url"), r.str("api_key")
	require.Equal(t, http.StatusCreated, engineCall(t, "POST", url+"/memories", ekey, map[string]any{"content": "kept across the move"}).Status)

	n, err := cli.NetworkCreate(ctx, open, client.NetworkCreateOptions{Driver: "bridge", Labels: map[string]string{dockertest.LabelTest: "true"}})
	require.NoError(t, err)
	_, err = cli.NetworkConnect(ctx, n.ID, client.NetworkConnectOptions{Container: orch.ContainerName(id)})
	require.NoError(t, err)
	rts, _, err := f.Backend.List(ctx)
	require.NoError(t, err)
	require.Len(t, rts, 1)
	require.True(t, rts[0].Unisolated)

	repairs, err := f.Workers.Reconcile.Reconcile(ctx, schema.Lease{Job: -7})
	require.NoError(t, err)
	require.Equal(t, 1, repairs)
	rts, _, err = f.Backend.List(ctx)
	require.NoError(t, err)
	require.Len(t, rts, 1)
	require.False(t, rts[0].Unisolated)
	require.Equal(t, orch.RuntimeRunning, rts[0].State)
	m := engineCall(t, "GET", url+"/memories?q=move", ekey, nil)
	require.Equal(t, http.StatusOK, m.Status)
	require.Len(t, m.Body["memories"], 1, "same volume")
	var repair string
	require.NoError(t, f.Pool.QueryRow(ctx, `SELECT metadata->>'repair' FROM audit_log WHERE engine_id = $1 AND action = 'reconcile'`, id).Scan(&repair))
	require.Equal(t, "moved_to_isolated_network", repair)
	users, err := cli.NetworkInspect(ctx, n.ID, client.NetworkInspectOptions{})
	require.NoError(t, err)
	require.Empty(t, users.Network.Containers, "nothing of the engine is left on the open network")
}
