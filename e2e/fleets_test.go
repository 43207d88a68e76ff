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
	"github.com/enginefleet/orchestrator/backend/docker"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/schema"
)

// Two deployments (two databases) on one Docker host under the same
// ORCH_NODE: each one's reconcile only ever touches its own fleet's
// containers, however old the other's look to it. A container an older
// version made (no fleet label) is adopted by the fleet whose database has
// its engine, and removed by neither.
func TestTwoFleetsShareADockerHost(t *testing.T) {
	t.Parallel()
	node := "e2e-shared-" + randHex(4)
	grace := time.Nanosecond // everything unknown is past its grace
	a := newFleet(t, fleetOpts{backend: "docker", node: node, orphanGrace: grace})
	b := newFleet(t, fleetOpts{backend: "docker", node: node, orphanGrace: grace})
	require.NotEqual(t, a.Fleet, b.Fleet, "a fleet id per database")
	cli := dockertest.RequireDocker(t)
	ctx := context.Background()

	provision := func(f *fleet, user string) (id, url, key string) {
		_, pkey := f.product("acme-"+user, orch.Policy{})
		r := f.call("POST", "/engines/provision", pkey, map[string]any{"user_id": user})
		require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
		return r.str("engine_id"), r.str("url"), r.str("api_key")
	}
	aID, aURL, _ := provision(a, "ann")
	bID, bURL, _ := provision(b, "bob")
	// a's engine as an older version left it: its container has no fleet
	// label (a's database has its row).
	legacyID, legacyURL, _ := provision(a, "leo")
	_, err := cli.ContainerRemove(ctx, orch.ContainerName(legacyID), client.ContainerRemoveOptions{Force: true})
	require.NoError(t, err)
	older, err := docker.New(docker.Config{Network: e2eNetwork, Node: node}, testenv.Quiet()) // labels no fleet
	require.NoError(t, err)
	e, err := schema.New(a.Pool).EngineByID(ctx, legacyID)
	require.NoError(t, err)
	require.NoError(t, older.Ensure(ctx, engineSpec(e.ID, e.ProductID, e.EngineVersion, e.Port, e.KeyHash)))
	require.NoError(t, older.Start(ctx, legacyID))
	// And a container of no fleet that no database knows.
	stray := uuid.NewString()
	_, err = cli.ContainerCreate(ctx, client.ContainerCreateOptions{Name: orch.ContainerName(stray), Image: a.Image,
		Config: &container.Config{Labels: map[string]string{orch.LabelManaged: "true", orch.LabelEngineID: stray,
			orch.LabelNode: node, dockertest.LabelTest: "true"}}})
	require.NoError(t, err)
	t.Cleanup(func() {
		cli.ContainerRemove(context.Background(), orch.ContainerName(stray), client.ContainerRemoveOptions{Force: true})
	}) //nolint:errcheck
	// And an orphan of a's own fleet: a provision killed before its row.
	orphan := uuid.NewString()
	require.NoError(t, a.Backend.Ensure(ctx, engineSpec(orphan, uuid.NewString(), a.Image, a.PortMax, "unused")))

	listed := func(f *fleet) map[string]bool {
		rts, _, err := f.Backend.List(ctx)
		require.NoError(t, err)
		out := map[string]bool{}
		for _, r := range rts {
			out[r.EngineID] = r.NoFleet
		}
		return out
	}
	require.Equal(t, map[string]bool{aID: false, legacyID: true, stray: true, orphan: false}, listed(a))
	require.Equal(t, map[string]bool{bID: false, legacyID: true, stray: true}, listed(b), "b never sees a's")

	for i := 0; i < 2; i++ {
		_, err := b.Workers.Reconcile.Reconcile(ctx, schema.Lease{Job: int64(-10 - i)})
		require.NoError(t, err)
		_, err = a.Workers.Reconcile.Reconcile(ctx, schema.Lease{Job: int64(-20 - i)})
		require.NoError(t, err)
	}
	exists := func(id string) bool {
		_, err := cli.ContainerInspect(ctx, orch.ContainerName(id), client.ContainerInspectOptions{})
		return err == nil
	}
	require.True(t, exists(aID), "b's reconcile left a's engine alone")
	require.True(t, exists(bID), "a's reconcile left b's engine alone")
	require.True(t, exists(legacyID), "an unlabelled engine with a's row is adopted by a, removed by no one")
	require.True(t, exists(stray), "an unlabelled container nobody knows is only reported")
	require.False(t, exists(orphan), "a's own orphan is still removed by a")
	for _, url := range []string{aURL, bURL, legacyURL} {
		require.Equal(t, http.StatusOK, engineCall(t, "GET", url+"/health", "", nil).Status, url)
	}
	require.NotContains(t, b.auditActions(aID), "reconcile")
}

// engineSpec is the backend spec of an engine as the workers make it.
func engineSpec(id, productID, image string, port int, keyHash string) orch.EngineSpec {
	return orch.EngineSpec{EngineID: id, ProductID: productID, Image: image, HostPort: port,
		Env: map[string]string{"ENGINE_KEY_HASH": keyHash, "SQLITE_DB_PATH": "/data/brain.sqlite", "CATALOG_DIR": "/catalog"}}
}
