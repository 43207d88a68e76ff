package lifecycle

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/metrics"
	"github.com/enginefleet/orchestrator/schema"
)

// Denials are summed up per product and reason and window: the first is
// written at once, the rest as one row when the window ends, and the
// counts add up to every denial.
func TestDeniedAuditAggregates(t *testing.T) {
	t.Parallel()
	pool := testenv.Pool(t, testenv.DB(t))
	q := schema.New(pool)
	var products []orch.Product
	for _, slug := range []string{"acme", "globex"} {
		p, err := q.InsertProduct(context.Background(), slug, slug, orch.Policy{}, keys.Hash(keys.Generate()))
		require.NoError(t, err)
		products = append(products, p)
	}
	d := newDeniedAudit(pool, testenv.Quiet(), nil)
	d.queue = make(chan denial, 10000)
	d.window, d.tick = 2*time.Second, 20*time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); d.run(ctx) }()

	const n = 4000
	for i := range n {
		reason := string(orch.CodeRateLimited)
		if i%4 == 0 {
			reason = "engine_not_found"
		}
		d.add(products[i%2], fmt.Sprintf("user-%d", i%1000), reason)
	}
	d.add(products[0], "solo", "engine_sleeping")
	d.add(products[0], "solo", "engine_sleeping")
	d.add(products[0], "solo", "engine_sleeping")

	type row struct {
		product, user, reason string
		count                 int
		samples               int
	}
	rows := func() []row {
		rs, err := pool.Query(context.Background(), `SELECT product_id::text, coalesce(user_id, ''), metadata->>'reason',
			(metadata->>'count')::int, coalesce(jsonb_array_length(metadata->'sample_user_ids'), 0)
			FROM audit_log WHERE action = 'admit_denied' ORDER BY id`)
		require.NoError(t, err)
		defer rs.Close()
		var out []row
		for rs.Next() {
			var r row
			require.NoError(t, rs.Scan(&r.product, &r.user, &r.reason, &r.count, &r.samples))
			out = append(out, r)
		}
		require.NoError(t, rs.Err())
		return out
	}
	total := func(rs []row) int {
		s := 0
		for _, r := range rs {
			s += r.count
		}
		return s
	}
	// Leading rows come at once (one per product and reason); the sums when
	// the window ends.
	// Keys: acme engine_not_found, acme rate_limited, globex rate_limited, acme engine_sleeping.
	require.Eventually(t, func() bool { return len(rows()) >= 4 }, 5*time.Second, 20*time.Millisecond)
	require.Eventually(t, func() bool { return total(rows()) == n+3 }, 10*time.Second, 50*time.Millisecond)
	rs := rows()
	require.Len(t, rs, 8, "a leading row and a sum per product and reason: %v", rs)
	for _, r := range rs {
		require.LessOrEqual(t, r.samples, deniedSampleUsers)
		if r.reason == "engine_sleeping" {
			require.Equal(t, "solo", r.user, "one user only: the sum names them")
		}
		if r.count > 1 && r.reason != "engine_sleeping" {
			require.Empty(t, r.user, "several users: sampled, not named")
			require.Equal(t, deniedSampleUsers, r.samples)
		}
	}

	// What is pending when the replica stops is written.
	d.add(products[1], "late", "engine_unhealthy")
	d.add(products[1], "late2", "engine_unhealthy")
	cancel()
	<-done
	require.Equal(t, n+5, total(rows()))
}

// A full queue drops denials (counted) instead of blocking admit.
func TestDeniedAuditDropsWhenFull(t *testing.T) {
	m := metrics.New(metrics.Config{})
	d := newDeniedAudit(nil, testenv.Quiet(), m)
	d.queue = make(chan denial, 10)
	for range 100 {
		d.add(orch.Product{ID: "p"}, "u", string(orch.CodeRateLimited))
	}
	require.Len(t, d.queue, 10)
	require.EqualValues(t, 90, testenv.GatherMetric(t, m.Gatherer(), "orchestrator_admit_denied_audit_dropped_total", nil).GetCounter().GetValue())
}

// The activity throttle holds a bounded number of engines, and still
// allows one write per engine per minute.
func TestActivityBounded(t *testing.T) {
	var a activity
	now := time.Now()
	require.True(t, a.due("e1", now))
	require.False(t, a.due("e1", now.Add(59*time.Second)))
	require.True(t, a.due("e1", now.Add(61*time.Second)))
	for i := range 1_000_000 {
		a.due(fmt.Sprintf("engine-%d", i), now)
	}
	n := 0
	for i := range a.shards {
		n += a.shards[i].last.Len()
	}
	require.LessOrEqual(t, n, activityShards*2*activityShardSize)
	// A recently touched engine is not due again (unless its shard overflowed).
	require.False(t, a.due("engine-999999", now.Add(time.Second)))
	// A minute later the generations have turned over: everything is due.
	later := now.Add(2 * activityEvery)
	require.True(t, a.due("engine-999999", later))
}
