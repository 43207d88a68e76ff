package metrics_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/metrics"
	"github.com/enginefleet/orchestrator/schema"
)

// The snapshot read from a real database: engines by product and state
// (zeros included), ports per node, River jobs, audit size, backup age,
// and no backup age at all when the backups table does not exist.
func TestSnapshotFromPostgres(t *testing.T) {
	t.Parallel()
	pool := testenv.Pool(t, testenv.DB(t))
	ctx := context.Background()
	q := schema.New(pool)
	p, err := q.InsertProduct(ctx, "acme", "Acme", orch.Policy{}, keys.Hash(keys.Generate()))
	require.NoError(t, err)
	_, err = q.InsertProduct(ctx, "empty", "Empty", orch.Policy{}, keys.Hash(keys.Generate()))
	require.NoError(t, err)
	insert := func(i int, node string, st orch.State) {
		require.NoError(t, q.InsertEngine(ctx, orch.Engine{ID: uuid.NewString(), ProductID: p.ID, UserID: fmt.Sprintf("u%d", i),
			Status: orch.StateProvisioning, Node: node, Port: 9001 + i, EngineVersion: "e:1", KeyHash: "h", KeyEnc: "x"}))
		if st != orch.StateProvisioning {
			_, err := pool.Exec(ctx, `UPDATE engines SET status = $1 WHERE user_id = $2`, string(st), fmt.Sprintf("u%d", i))
			require.NoError(t, err)
		}
	}
	insert(0, "n1", orch.StateRunning)
	insert(1, "n1", orch.StateRunning)
	insert(2, "n1", orch.StateFailed)
	insert(3, "n2", orch.StateSleeping)
	insert(20, "n2", orch.StateRunning) // port 9021: outside the range asked for
	_, err = pool.Exec(ctx, `UPDATE engines SET created_at = now() - interval '2 hours' WHERE user_id = 'u3'`)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `INSERT INTO river_job (args, kind, max_attempts, queue, state, scheduled_at)
		VALUES ('{}', 'k', 5, 'node:n1', 'available', now()), ('{}', 'k', 5, 'node:n1', 'available', now()),
		       ('{}', 'k', 5, 'fleet', 'scheduled', now() + interval '1 hour'), ('{}', 'k', 5, 'fleet', 'retryable', now() + interval '1 minute')`)
	require.NoError(t, err)

	src := schema.NewMetricsSource(pool)
	snap, err := src.MetricsSnapshot(ctx, 9001, 9010)
	require.NoError(t, err)
	require.True(t, snap.PostgresUp)
	require.True(t, snap.Migrated)
	cells := map[string]int{}
	for _, e := range snap.Engines {
		cells[e.Product+"/"+e.State] = e.N
	}
	require.Len(t, cells, 2*len(orch.States), "every product with every state")
	require.Equal(t, 3, cells["acme/running"])
	require.Equal(t, 1, cells["acme/failed"])
	require.Equal(t, 1, cells["acme/sleeping"])
	require.Equal(t, 0, cells["acme/stopped"])
	require.Equal(t, 0, cells["empty/running"])
	require.Equal(t, map[string]int{"n1": 3, "n2": 1}, snap.PortsUsed)
	require.ElementsMatch(t, []metrics.JobCount{{Queue: "fleet", State: "retryable", N: 1}, {Queue: "fleet", State: "scheduled", N: 1}, {Queue: "node:n1", State: "available", N: 2}}, snap.Jobs)
	require.Positive(t, snap.AuditBytes)

	// No backups yet: the oldest engine (2 h) is the stalest brain.
	if snap.BackupAge != nil { // the backups table exists in this schema
		require.InDelta(t, (2 * time.Hour).Seconds(), snap.BackupAge.Seconds(), 60)
		_, err = pool.Exec(ctx, `INSERT INTO backups (id, engine_id, product_id, user_id, node, path, size_bytes, sha256, engine_version, trigger, created_at)
			SELECT gen_random_uuid(), id, product_id, user_id, node, 'p/' || user_id, 1, 's', 'e:1', 'manual', now() - interval '30 minutes'
			FROM engines WHERE user_id = 'u3'`)
		require.NoError(t, err)
		snap, err = src.MetricsSnapshot(ctx, 9001, 9010)
		require.NoError(t, err)
		require.NotNil(t, snap.BackupAge)
		require.Less(t, snap.BackupAge.Seconds(), (2*time.Hour).Seconds()-60)
		require.Greater(t, snap.BackupAge.Seconds(), (30*time.Minute).Seconds()-60)
	}
	_, err = pool.Exec(ctx, `DROP TABLE IF EXISTS backups`)
	require.NoError(t, err)
	snap, err = src.MetricsSnapshot(ctx, 9001, 9010)
	require.NoError(t, err, "a schema without the backups table still reports the rest")
	require.Nil(t, snap.BackupAge)
	require.Equal(t, 3, snap.PortsUsed["n1"])

	// The collector over it, as the metrics listener serves it.
	g := metrics.New(metrics.Config{Source: src, PortMin: 9001, PortMax: 9010, Node: "n1"}).Gatherer()
	require.Equal(t, 3.0, gauge(t, g, "orchestrator_engines", map[string]string{"product": "acme", "state": "running"}))
	require.Equal(t, 0.3, gauge(t, g, "orchestrator_port_range_usage_ratio", map[string]string{"node": "n1"}))
	require.Equal(t, 1.0, gauge(t, g, "orchestrator_ready", nil))
}
