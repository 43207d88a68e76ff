package e2e_test

import (
	"context"
	"fmt"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/enginefleet/orchestrator/backend/docker/dockertest"

	"github.com/moby/moby/client"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
)

func TestContractFlowDocker(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{backend: "docker"})
	second := dockertest.EngineImage(t, "e2e-2")
	contractFlow(t, f, second)

	// Nothing of the engine is left in Docker.
	cli := dockertest.RequireDocker(t)
	ctx := context.Background()
	cs, err := cli.ContainerList(ctx, client.ContainerListOptions{All: true, Filters: make(client.Filters).Add("label", orch.LabelNode+"="+f.Node)})
	require.NoError(t, err)
	require.Empty(t, cs.Items)
	vs, err := cli.VolumeList(ctx, client.VolumeListOptions{Filters: make(client.Filters).Add("label", orch.LabelNode+"="+f.Node)})
	require.NoError(t, err)
	require.Empty(t, vs.Items)
}

// 500 concurrent admits over 25 new users: exactly 25 containers, 25
// distinct ports, 25 volumes, and every admit gets its user's engine.
func TestConcurrentAdmitsDocker(t *testing.T) {
	t.Parallel()
	// 25 engines boot at once on a 2-core runner beside the other parallel tests:
	// this test is about deduplication and ports, not boot speed.
	f := newFleet(t, fleetOpts{backend: "docker", ports: 60, bootTimeout: 2 * time.Minute})
	_, key := f.product("acme", orch.Policy{})
	var ok atomic.Int64
	engines := make([]string, 500)
	parallel(500, func(i int) {
		user := fmt.Sprintf("user-%d", i%25)
		r := f.call("POST", "/engines/"+user+"/admit", key, map[string]any{"auto_provision": true})
		if r.Status == http.StatusOK && r.Body["admitted"] == true {
			ok.Add(1)
			engines[i] = r.str("engine", "engine_id")
		} else {
			t.Errorf("admit %s: %d %v", user, r.Status, r.Body)
		}
	})
	require.EqualValues(t, 500, ok.Load())
	for i := 25; i < 500; i++ {
		require.Equal(t, engines[i%25], engines[i], "every admit of a user gets the same engine")
	}
	ctx := context.Background()
	rts, vols, err := f.Backend.List(ctx)
	require.NoError(t, err)
	require.Len(t, rts, 25)
	require.Len(t, vols, 25)
	ports := map[int]bool{}
	for _, r := range rts {
		require.Equal(t, orch.RuntimeRunning, r.State)
		ports[r.HostPort] = true
	}
	require.Len(t, ports, 25)
	var n int
	require.NoError(t, f.Pool.QueryRow(ctx, `SELECT count(DISTINCT port) FROM engines WHERE status = 'running'`).Scan(&n))
	require.Equal(t, 25, n)
}
