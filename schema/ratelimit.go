package schema

import (
	"context"
	"fmt"
	"time"
)

// RateLease is the answer of LeasePermits.
type RateLease struct {
	Granted     int           // permits granted to the caller, 0..n
	Used        int           // permits the window has given out in total, capped at the limit
	WindowStart time.Time     // the window, by the database clock
	Left        time.Duration // time until the window ends, by the database clock
}

// LeasePermits takes up to n admit permits for a product from its current
// one-minute window (chosen by the database clock, so replicas with skewed
// clocks still share one window). Permits are handed out in the order the
// leases commit until the window has given out limit: every replica leasing
// from the same row, together they never get more than limit per window.
//
// The counter only grows by n on each lease and is clipped to the limit
// before adding, so it needs no read-before-write: the caller's grant is
// the part of [used-n, used) that lies below the limit.
func (q *Queries) LeasePermits(ctx context.Context, productID string, n, limit int) (RateLease, error) {
	var l RateLease
	var used int
	var left float64
	err := q.db.QueryRow(ctx, `INSERT INTO rate_windows AS r (product_id, window_start, used)
		VALUES ($1, date_trunc('minute', now()), $2)
		ON CONFLICT (product_id, window_start) DO UPDATE SET used = LEAST(r.used, $3) + $2
		RETURNING r.used, r.window_start, extract(epoch FROM r.window_start + interval '1 minute' - now())::float8`,
		productID, n, limit).Scan(&used, &l.WindowStart, &left)
	if err != nil {
		return l, fmt.Errorf("lease rate permits: %w", err)
	}
	before := used - n
	l.Granted = max(0, min(n, limit-before))
	l.Used = min(used, limit)
	l.Left = time.Duration(left * float64(time.Second))
	return l, nil
}

// PruneRateWindows deletes rate windows that ended more than keep ago.
func (q *Queries) PruneRateWindows(ctx context.Context, keep time.Duration) (int64, error) {
	tag, err := q.db.Exec(ctx, `DELETE FROM rate_windows WHERE window_start < now() - interval '1 minute' - make_interval(secs => $1)`,
		keep.Seconds())
	if err != nil {
		return 0, fmt.Errorf("prune rate windows: %w", err)
	}
	return tag.RowsAffected(), nil
}
