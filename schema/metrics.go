package schema

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/metrics"
)

// MetricsSource reads the fleet gauges of package metrics (engines by
// product and state, port usage, River queue depth, audit log size,
// backup age, readiness) from Postgres.
type MetricsSource struct {
	pool     *pgxpool.Pool
	migrated atomic.Bool // migrations only move forward: once current, not checked again
}

// NewMetricsSource binds a MetricsSource to a pool.
func NewMetricsSource(pool *pgxpool.Pool) *MetricsSource { return &MetricsSource{pool: pool} }

// MetricsSnapshot implements metrics.Source: a ping, the migration check
// (until it passes once), then every query in one batch (one round trip).
// The backups table may not exist (an older schema): its gauge is then
// left out rather than failing the rest.
func (s *MetricsSource) MetricsSnapshot(ctx context.Context, portMin, portMax int) (metrics.Snapshot, error) {
	var snap metrics.Snapshot
	if err := s.pool.Ping(ctx); err != nil {
		return snap, fmt.Errorf("ping: %w", err)
	}
	snap.PostgresUp = true
	if !s.migrated.Load() {
		ok, err := Current(ctx, s.pool)
		if err != nil {
			return snap, err
		}
		if !ok {
			return snap, nil // the rest needs the schema
		}
		s.migrated.Store(true)
	}
	snap.Migrated = true

	states := make([]string, 0, len(orch.States))
	for _, st := range orch.States {
		states = append(states, string(st))
	}
	b := &pgx.Batch{}
	b.Queue(`
		WITH c AS (SELECT product_id, status, count(*) AS n FROM engines GROUP BY product_id, status)
		SELECT p.slug, s.state, coalesce(c.n, 0)
		FROM products p CROSS JOIN unnest($1::text[]) AS s(state)
		LEFT JOIN c ON c.product_id = p.id AND c.status = s.state
		ORDER BY 1, 2`, states).Query(func(rows pgx.Rows) error {
		var err error
		snap.Engines, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (metrics.EngineCount, error) {
			var e metrics.EngineCount
			return e, r.Scan(&e.Product, &e.State, &e.N)
		})
		return err
	})
	b.Queue(`SELECT node, count(*) FROM engines WHERE port BETWEEN $1 AND $2 GROUP BY node`, portMin, portMax).
		Query(func(rows pgx.Rows) error {
			snap.PortsUsed = map[string]int{}
			var node string
			var n int
			_, err := pgx.ForEachRow(rows, []any{&node, &n}, func() error { snap.PortsUsed[node] = n; return nil })
			return err
		})
	b.Queue(`
		SELECT queue, state::text, count(*) FROM river_job
		WHERE state IN ('available', 'scheduled', 'running', 'retryable')
		GROUP BY 1, 2 ORDER BY 1, 2`).Query(func(rows pgx.Rows) error {
		var err error
		snap.Jobs, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (metrics.JobCount, error) {
			var j metrics.JobCount
			return j, r.Scan(&j.Queue, &j.State, &j.N)
		})
		return err
	})
	var hasBackups bool
	b.Queue(`SELECT coalesce(pg_total_relation_size(to_regclass('audit_log')), 0), to_regclass('backups') IS NOT NULL`).
		QueryRow(func(row pgx.Row) error { return row.Scan(&snap.AuditBytes, &hasBackups) })
	if err := s.pool.SendBatch(ctx, b).Close(); err != nil {
		return snap, fmt.Errorf("fleet metrics: %w", err)
	}
	if hasBackups {
		// Per engine its latest backup, or its creation when it has none;
		// the oldest of those is how stale the least recently saved brain is.
		var secs float64
		err := s.pool.QueryRow(ctx, `
			SELECT coalesce(extract(epoch FROM now() - min(coalesce(b.last, e.created_at))), 0)::float8
			FROM engines e
			LEFT JOIN (SELECT engine_id, max(created_at) AS last FROM backups GROUP BY engine_id) b ON b.engine_id = e.id`).Scan(&secs)
		if err != nil {
			return snap, fmt.Errorf("backup age: %w", err)
		}
		age := time.Duration(secs * float64(time.Second))
		snap.BackupAge = &age
	}
	return snap, nil
}
