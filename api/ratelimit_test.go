package api

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

// leaseCounter counts the limiter's round trips.
type leaseCounter struct{ n atomic.Int64 }

func (c *leaseCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	if strings.Contains(d.SQL, "rate_windows") {
		c.n.Add(1)
	}
	return ctx
}

func (c *leaseCounter) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// limiterReplica is an API replica on dbURL ("" = a new database) for
// calling rateLimit directly; it counts rate-window queries.
func limiterReplica(tb testing.TB, dbURL string) (*Server, *leaseCounter, string) {
	tb.Helper()
	if dbURL == "" {
		dbURL = testenv.DB(tb)
	}
	lc := &leaseCounter{}
	cfg, err := pgxpool.ParseConfig(dbURL)
	require.NoError(tb, err)
	cfg.ConnConfig.Tracer = lc
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	require.NoError(tb, err)
	tb.Cleanup(pool.Close)
	return New(Config{}, nil, pool, nil, testenv.Quiet()), lc, dbURL
}

func limitedProduct(tb testing.TB, s *Server, slug string, rpm *int) orch.Product {
	tb.Helper()
	p, err := schema.New(s.pool).InsertProduct(context.Background(), slug, slug, orch.Policy{RateLimitRPM: rpm}, keys.Hash(keys.Generate()))
	require.NoError(tb, err)
	return p
}

func withRPM(p orch.Product, rpm int) orch.Product {
	p.Policy.RateLimitRPM = &rpm
	return p
}

func TestRateLimitSharedAcrossReplicas(t *testing.T) {
	t.Parallel()
	const limit = 500 // leases of 25
	a, leasesA, dbURL := limiterReplica(t, "")
	b, leasesB, _ := limiterReplica(t, dbURL)
	p := limitedProduct(t, a, "acme", new(limit))

	testenv.AwayFromMinuteEnd(5 * time.Second)
	var admitted, denied atomic.Int64
	var wg sync.WaitGroup
	for i := range 32 {
		s := a
		if i%2 == 1 {
			s = b
		}
		wg.Go(func() {
			for range 60 {
				l, rem, err := s.rateLimit(context.Background(), p)
				if l != limit || rem < 0 || rem > limit {
					t.Errorf("limit %d remaining %d", l, rem)
				}
				switch {
				case err == nil:
					admitted.Add(1)
				case orch.IsCode(err, orch.CodeRateLimited):
					denied.Add(1)
				default:
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	require.Equal(t, int64(limit), admitted.Load(), "the two replicas together admit exactly the limit")
	require.Equal(t, int64(32*60-limit), denied.Load())
	leases := leasesA.n.Load() + leasesB.n.Load()
	require.LessOrEqual(t, leases, int64(limit/leaseSize(limit)+6), "a round trip per lease of %d, not per admit", leaseSize(limit))
	var used int
	require.NoError(t, a.pool.QueryRow(context.Background(), `SELECT sum(used) FROM rate_windows WHERE product_id = $1`, p.ID).Scan(&used))
	require.GreaterOrEqual(t, used, limit)
}

func TestRateLimitDeniesLocally(t *testing.T) {
	t.Parallel()
	s, leases, _ := limiterReplica(t, "")
	p := limitedProduct(t, s, "acme", new(5))
	testenv.AwayFromMinuteEnd(3 * time.Second)
	for i := range 5 {
		limit, rem, err := s.rateLimit(context.Background(), p)
		require.NoError(t, err)
		require.Equal(t, 5, limit)
		require.Equal(t, 4-i, rem)
	}
	before := leases.n.Load()
	for range 100 {
		limit, rem, err := s.rateLimit(context.Background(), p)
		require.True(t, orch.IsCode(err, orch.CodeRateLimited), "%v", err)
		require.Equal(t, 5, limit)
		require.Zero(t, rem)
		var de *orch.Error
		require.True(t, errors.As(err, &de))
		require.True(t, de.RetryAfter >= 1 && de.RetryAfter <= 60, "Retry-After %d", de.RetryAfter)
	}
	require.Equal(t, before, leases.n.Load(), "an exhausted window is denied without a round trip")

	// A raised limit is honoured at once, within the same window.
	for range 3 {
		_, _, err := s.rateLimit(context.Background(), withRPM(p, 8))
		require.NoError(t, err)
	}
	_, _, err := s.rateLimit(context.Background(), withRPM(p, 8))
	require.True(t, orch.IsCode(err, orch.CodeRateLimited), "%v", err)

	// The next window starts afresh (simulated: the shared row and the local window end).
	_, err = s.pool.Exec(context.Background(), `DELETE FROM rate_windows`)
	require.NoError(t, err)
	b := s.rates.bucket(p.ID)
	b.mu.Lock()
	b.windowEnd = time.Now().Add(-time.Millisecond)
	b.mu.Unlock()
	_, _, err = s.rateLimit(context.Background(), withRPM(p, 8))
	require.NoError(t, err)

	// No policy: no limit; zero: nothing admitted.
	limit, _, err := s.rateLimit(context.Background(), orch.Product{ID: p.ID})
	require.NoError(t, err)
	require.Zero(t, limit)
	_, _, err = s.rateLimit(context.Background(), withRPM(p, 0))
	require.True(t, orch.IsCode(err, orch.CodeRateLimited))
}

func TestRateLimitPrunesOldWindows(t *testing.T) {
	t.Parallel()
	s, _, _ := limiterReplica(t, "")
	p := limitedProduct(t, s, "acme", new(100))
	_, err := s.pool.Exec(context.Background(), `INSERT INTO rate_windows (product_id, window_start, used)
		VALUES ($1, date_trunc('minute', now()) - interval '10 minutes', 7)`, p.ID)
	require.NoError(t, err)
	_, _, err = s.rateLimit(context.Background(), p) // first lease of this replica prunes
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		var old, cur int
		s.pool.QueryRow(context.Background(), `SELECT count(*) FILTER (WHERE window_start < now() - interval '5 minutes'),
			count(*) FILTER (WHERE window_start = date_trunc('minute', now())) FROM rate_windows`).Scan(&old, &cur) //nolint:errcheck
		return old == 0 && cur == 1
	}, 5*time.Second, 10*time.Millisecond)
}

func TestLeaseSize(t *testing.T) {
	for _, c := range []struct{ limit, want int }{{1, 1}, {20, 1}, {60, 3}, {1000, 50}, {2000, 100}, {1 << 30, 100}} {
		require.Equal(t, c.want, leaseSize(c.limit), "limit %d", c.limit)
	}
}

// BenchmarkRateLimit measures what rate limiting adds to one admit, on a
// real Postgres: a product under its limit (leases of 100 permits: one
// round trip per 100 admits), the same from many goroutines, a product
// whose window is exhausted (denied locally), and a product with no limit.
func BenchmarkRateLimit(b *testing.B) {
	s, leases, _ := limiterReplica(b, "")
	ctx := context.Background()
	under, parallel := limitedProduct(b, s, "under", new(1<<30)), limitedProduct(b, s, "parallel", new(1<<30))
	small, exhausted := limitedProduct(b, s, "small", new(1200)), limitedProduct(b, s, "exhausted", new(1))
	free := limitedProduct(b, s, "free", nil)
	s.rateLimit(ctx, exhausted) //nolint:errcheck
	run := func(b *testing.B, p orch.Product) {
		start := leases.n.Load()
		b.ResetTimer()
		for b.Loop() {
			if _, _, err := s.rateLimit(ctx, p); err != nil && !orch.IsCode(err, orch.CodeRateLimited) {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(leases.n.Load()-start)/float64(b.N), "roundtrips/op")
	}
	b.Run("under-limit", func(b *testing.B) {
		run(b, under)
	})
	b.Run("under-limit-parallel", func(b *testing.B) {
		p := parallel
		start := leases.n.Load()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, _, err := s.rateLimit(ctx, p); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.ReportMetric(float64(leases.n.Load()-start)/float64(b.N), "roundtrips/op")
	})
	b.Run("limit-1200", func(b *testing.B) {
		// Leases of 60; admits past the limit are denied locally.
		p := small
		start := leases.n.Load()
		b.ResetTimer()
		for b.Loop() {
			s.rateLimit(ctx, p) //nolint:errcheck
		}
		b.ReportMetric(float64(leases.n.Load()-start)/float64(b.N), "roundtrips/op")
	})
	b.Run("exhausted", func(b *testing.B) {
		run(b, exhausted)
	})
	b.Run("no-limit", func(b *testing.B) {
		run(b, free)
	})
}
