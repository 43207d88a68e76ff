package lifecycle

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

// A product's jobs lose priority as its operations in flight grow, so a
// burst of one product queues behind another's single provision: River
// fetches by priority first.
func TestBusyProductQueuesBehind(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := testenv.Pool(t, testenv.DB(t))
	rc, err := river.NewClient(riverpgxv5.New(pool), &river.Config{})
	require.NoError(t, err)
	kr, err := keys.NewKeyring(keys.GenerateMasterKey(), nil)
	require.NoError(t, err)
	c := New(Config{DefaultImage: "enginefleet/engine:1", PortMin: 20000, PortMax: 20999, Node: "prio", BootTimeout: 30 * time.Second},
		pool, rc, kr, testenv.Quiet())
	q := schema.New(pool)
	product := func(slug string) orch.Product {
		p, err := q.InsertProduct(ctx, slug, slug, orch.Policy{}, keys.Hash(keys.Generate()))
		require.NoError(t, err)
		return p
	}
	busy, quiet := product("busy"), product("quiet")
	priorityOf := func(p orch.Product, user string) int {
		got, err := c.Provision(ctx, p, user, "", false)
		require.NoError(t, err)
		var prio int
		require.NoError(t, pool.QueryRow(ctx, `SELECT j.priority FROM river_job j JOIN operations o ON o.job_id = j.id WHERE o.id = $1`,
			got.OperationID).Scan(&prio))
		return prio
	}
	var prios []int
	for i := range 70 {
		prios = append(prios, priorityOf(busy, fmt.Sprintf("u%d", i)))
	}
	require.Equal(t, []int{1, 1, 1, 1}, prios[:4], "a few in flight: first priority")
	require.Equal(t, 2, prios[4])
	require.Equal(t, 3, prios[16])
	require.Equal(t, 4, prios[64], "a burst: last")
	require.Equal(t, 1, priorityOf(quiet, "solo"), "another product's provision goes first")
}

func TestPriorityTiers(t *testing.T) {
	t.Parallel()
	for n, want := range map[int]int{0: 1, 3: 1, 4: 2, 15: 2, 16: 3, 63: 3, 64: 4, 10000: 4} {
		require.Equal(t, want, Priority(n), "%d in flight", n)
	}
}
