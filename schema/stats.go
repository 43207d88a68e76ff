package schema

import (
	"context"
	"fmt"
)

// Metrics is a product's rolling-hour activity and lifetime totals, all
// from the audit log.
type Metrics struct {
	Provisions1h    int64
	Crashes1h       int64
	Restarts1h      int64
	AvgBootMS       float64
	TotalProvisions int64
	TotalDestroys   int64
}

// ProductMetrics reads a product's metrics: one index range scan over the
// last hour of its audit rows plus the trigger-maintained lifetime totals.
func (q *Queries) ProductMetrics(ctx context.Context, productID string) (Metrics, error) {
	var m Metrics
	err := q.db.QueryRow(ctx, `
		WITH hour AS (
			SELECT action, duration_ms, metadata->>'reason' AS reason FROM audit_log
			WHERE product_id = $1 AND "timestamp" > now() - interval '1 hour'
			  AND action IN ('provision', 'health_failed', 'health_check', 'restart', 'auto_restart_start'))
		SELECT
			count(*) FILTER (WHERE action = 'provision'),
			-- A crash is an engine marked failed, or one that died and
			-- was brought back by Docker's restart policy at once.
			count(*) FILTER (WHERE action = 'health_failed' OR (action = 'health_check' AND reason = 'crash')),
			count(*) FILTER (WHERE action IN ('restart', 'auto_restart_start')),
			coalesce(avg(duration_ms) FILTER (WHERE action = 'provision'), 0)::float8,
			coalesce((SELECT n FROM audit_totals WHERE product_id = $1 AND action = 'provision'), 0),
			coalesce((SELECT n FROM audit_totals WHERE product_id = $1 AND action = 'destroy'), 0)
		FROM hour`, productID).Scan(&m.Provisions1h, &m.Crashes1h, &m.Restarts1h, &m.AvgBootMS, &m.TotalProvisions, &m.TotalDestroys)
	if err != nil {
		return m, fmt.Errorf("product metrics: %w", err)
	}
	return m, nil
}
