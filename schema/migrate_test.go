package schema_test

import (
	"context"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/schema"
)

// Four replicas booting at once on an empty database end with one schema
// and no error.
func TestConcurrentMigrators(t *testing.T) {
	t.Parallel()
	url := testenv.EmptyDB(t)
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pool := testenv.Pool(t, url)
			errs[i] = schema.MigrateUp(ctx, pool, testenv.Quiet())
		}()
	}
	wg.Wait()
	for i, err := range errs {
		require.NoError(t, err, "migrator %d", i)
	}
	pool := testenv.Pool(t, url)
	ok, err := schema.Current(ctx, pool)
	require.NoError(t, err)
	require.True(t, ok)
	ms, _ := schema.Migrations()
	var n int
	require.NoError(t, pool.QueryRow(ctx, "SELECT count(*) FROM schema_migrations").Scan(&n))
	require.Equal(t, len(ms), n)
}

func TestCurrentFalseOnEmptyDatabase(t *testing.T) {
	t.Parallel()
	pool := testenv.Pool(t, testenv.EmptyDB(t))
	ok, err := schema.Current(context.Background(), pool)
	require.NoError(t, err)
	require.False(t, ok)
}

// The audit log rejects UPDATE and DELETE by hand; only the purge may delete.
func TestAuditLogAppendOnly(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := testenv.Pool(t, testenv.DB(t))
	_, err := pool.Exec(ctx, "INSERT INTO audit_log (action, actor) VALUES ('provision', 'system')")
	require.NoError(t, err)
	_, err = pool.Exec(ctx, "UPDATE audit_log SET actor = 'x'")
	require.ErrorContains(t, err, "append-only")
	_, err = pool.Exec(ctx, "DELETE FROM audit_log")
	require.ErrorContains(t, err, "append-only")
	_, err = pool.Exec(ctx, "TRUNCATE audit_log")
	require.ErrorContains(t, err, "append-only")
}

// Engines without a host port (kubernetes: port 0) share a node; a real
// port stays unique per node.
func TestPortZeroIsNotUnique(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := testenv.Pool(t, testenv.DB(t))
	var product string
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO products (slug, display_name, api_key_hash)
		VALUES ('p', 'P', 'h') RETURNING id`).Scan(&product))
	insert := func(user string, port int) error {
		_, err := pool.Exec(ctx, `INSERT INTO engines (id, product_id, user_id, status, node, port, engine_version,
			engine_key_hash, engine_key_enc) VALUES (gen_random_uuid(), $1, $2, 'running', 'cluster', $3, 'img', 'h', 'e')`,
			product, user, port)
		return err
	}
	require.NoError(t, insert("a", 0))
	require.NoError(t, insert("b", 0))
	require.NoError(t, insert("c", 9001))
	require.ErrorContains(t, insert("d", 9001), "engines_node_port_key")
	require.ErrorContains(t, insert("e", -1), "engines_port_range")
}
