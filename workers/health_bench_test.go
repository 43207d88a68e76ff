package workers_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
	"github.com/enginefleet/orchestrator/workers"
)

// writeCounter counts the statements that write, split into ours
// (engines, audit_log) and River's (river_job), and the engine rows ours
// touched.
type writeCounter struct {
	app, river, engineRows atomic.Int64
}

type sqlKey struct{}

func (c *writeCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	return context.WithValue(ctx, sqlKey{}, d.SQL)
}

func (c *writeCounter) TraceQueryEnd(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryEndData) {
	sql, _ := ctx.Value(sqlKey{}).(string)
	if d.Err != nil {
		return
	}
	u := strings.ToUpper(sql)
	writes := strings.Contains(u, "INSERT ") || strings.Contains(u, "UPDATE ") || strings.Contains(u, "DELETE ")
	switch {
	case !writes:
	case strings.Contains(sql, "river_job"):
		c.river.Add(1)
	case strings.Contains(sql, "engines") || strings.Contains(sql, "audit_log"):
		c.app.Add(1)
		if strings.Contains(sql, "UPDATE engines") {
			c.engineRows.Add(d.CommandTag.RowsAffected())
		}
	}
}

// BenchmarkHealthSweep runs whole sweeps (sweep job → batch jobs → probes
// → batched writes) over N running engines served by httptest servers on
// loopback, and reports wall time and Postgres write statements per
// sweep. Target: ≤ 2 s for 500 engines.
func BenchmarkHealthSweep(b *testing.B) {
	for _, n := range []int{100, 500} {
		b.Run(fmt.Sprintf("engines=%d", n), func(b *testing.B) { benchSweep(b, n) })
	}
}

func benchSweep(b *testing.B, n int) {
	ctx := context.Background()
	pcfg, err := pgxpool.ParseConfig(testenv.DB(b))
	require.NoError(b, err)
	counter := &writeCounter{}
	pcfg.ConnConfig.Tracer = counter
	pcfg.MaxConns = 20
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	require.NoError(b, err)
	b.Cleanup(pool.Close)
	log := testenv.Quiet()

	const node = "bench"
	w := workers.New(workers.Config{Node: node, Engines: workers.EngineConfig{ProbeTimeout: 2 * time.Second},
		Health: workers.HealthConfig{Interval: 30 * time.Second}}, pool, nil, log)
	rc, err := river.NewClient(riverpgxv5.New(pool), w.RiverConfig(log))
	require.NoError(b, err)
	require.NoError(b, rc.Start(ctx))
	b.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		rc.Stop(sctx) //nolint:errcheck
	})
	seedFakeEngines(b, pool, node, n)

	done, cancel := rc.Subscribe(river.EventKindJobCompleted, river.EventKindJobFailed)
	defer cancel()
	batches := (n + 99) / 100
	sweep := func() {
		if _, err := rc.Insert(ctx, jobs.HealthSweep{Tick: time.Now()}, nil); err != nil {
			b.Fatal(err)
		}
		left := batches + 1
		timeout := time.After(30 * time.Second)
		for left > 0 {
			select {
			case ev := <-done:
				if ev.Job.Kind == (jobs.HealthSweep{}).Kind() || ev.Job.Kind == (jobs.HealthSweepBatch{}).Kind() {
					if ev.Kind != river.EventKindJobCompleted {
						b.Fatalf("%s failed: %v", ev.Job.Kind, ev.Job.Errors)
					}
					left--
				}
			case <-timeout:
				b.Fatal("sweep did not finish in 30 s")
			}
		}
	}
	sweep() // warm up connections
	counter.app.Store(0)
	counter.river.Store(0)
	counter.engineRows.Store(0)
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		sweep()
	}
	elapsed := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(elapsed.Milliseconds())/float64(b.N), "ms/sweep")
	b.ReportMetric(float64(counter.app.Load())/float64(b.N), "app_writes/sweep")
	b.ReportMetric(float64(counter.river.Load())/float64(b.N), "river_writes/sweep")
	b.ReportMetric(float64(counter.engineRows.Load())/float64(b.N), "engine_rows/sweep")

	var healthy int
	require.NoError(b, pool.QueryRow(ctx, `SELECT count(*) FROM engines WHERE last_health_at > $1`, start).Scan(&healthy))
	require.Equal(b, n, healthy)
}

// seedFakeEngines starts n /health servers and records them as running
// engines of one product on node.
func seedFakeEngines(tb testing.TB, pool *pgxpool.Pool, node string, n int) []string {
	tb.Helper()
	ctx := context.Background()
	p, err := schema.New(pool).InsertProduct(ctx, "bench", "bench", orch.Policy{}, keys.Hash(keys.Generate()))
	require.NoError(tb, err)
	ok := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"status":"ok","uptime_seconds":1,"subsystems":{}}`)) //nolint:errcheck
	})
	ids := make([]string, n)
	rows := make([][]any, n)
	for i := range rows {
		s := httptest.NewServer(ok)
		tb.Cleanup(s.Close)
		addr := s.Listener.Addr().String()
		port, err := strconv.Atoi(addr[strings.LastIndex(addr, ":")+1:])
		require.NoError(tb, err)
		ids[i] = fmt.Sprintf("00000000-0000-4000-8000-%012d", i+1)
		rows[i] = []any{ids[i], p.ID, fmt.Sprintf("fake-%d", i), "running", node, port, "fake", "h", "e"}
	}
	_, err = pool.CopyFrom(ctx, pgx.Identifier{"engines"},
		[]string{"id", "product_id", "user_id", "status", "node", "port", "engine_version", "engine_key_hash", "engine_key_enc"},
		pgx.CopyFromRows(rows))
	require.NoError(tb, err)
	return ids
}
