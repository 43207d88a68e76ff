package e2e_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/enginefleet/orchestrator/backend/docker/dockertest"

	"github.com/google/uuid"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/client"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/schema"
)

// Drift: a container removed behind our back is recreated on its volume by
// reconcile (data intact); an unknown labelled container is removed once
// past the grace period, and left alone before it.
func TestReconcileDriftDocker(t *testing.T) {
	t.Parallel()
	const grace = 5 * time.Second // container times are whole seconds
	f := newFleet(t, fleetOpts{backend: "docker", orphanGrace: grace})
	cli := dockertest.RequireDocker(t)
	ctx := context.Background()
	_, key := f.product("acme", orch.Policy{})
	r := f.call("POST", "/engines/provision", key, map[string]any{"user_id": "carol"})
	require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
	id, url, ekey := r.str("engine_id"), r.str("url"), r.str("api_key")
	require.Equal(t, http.StatusCreated, engineCall(t, "POST", url+"/memories", ekey, map[string]any{"content": "kept across drift"}).Status)

	// Behind our back: the container disappears.
	_, err := cli.ContainerRemove(ctx, orch.ContainerName(id), client.ContainerRemoveOptions{Force: true})
	require.NoError(t, err)
	// And a stranger with our labels appears.
	stranger := uuid.NewString()
	_, err = cli.ContainerCreate(ctx, client.ContainerCreateOptions{Name: "engine-" + stranger, Image: f.Image,
		Config: &container.Config{Labels: map[string]string{orch.LabelManaged: "true", orch.LabelEngineID: stranger,
			orch.LabelNode: f.Node, orch.LabelFleet: f.Fleet, "orchestrator.test": "true"}}})
	require.NoError(t, err)
	created := time.Now() // no earlier than the daemon's creation time

	n, err := f.Workers.Reconcile.Reconcile(ctx, schema.Lease{Job: -1})
	require.NoError(t, err)
	require.Equal(t, 1, n, "only the missing container is repaired; the stranger is inside its grace period")
	m := engineCall(t, "GET", url+"/memories?q=drift", ekey, nil)
	require.Equal(t, http.StatusOK, m.Status)
	require.Len(t, m.Body["memories"], 1, "recreated on the same volume")

	// The grace period passes (and a second more: container times are
	// whole seconds): time itself is what is tested.
	time.Sleep(time.Until(created.Add(grace + time.Second)))
	n, err = f.Workers.Reconcile.Reconcile(ctx, schema.Lease{Job: -2})
	require.NoError(t, err)
	require.Equal(t, 1, n)
	info, err := f.Backend.Inspect(ctx, stranger)
	require.NoError(t, err)
	require.Equal(t, orch.RuntimeMissing, info.State, "orphan removed after the grace period")
	require.Contains(t, f.auditActions(id), "reconcile")
}
