package metrics

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Snapshot is the fleet as Postgres sees it, read by a Source in one go.
type Snapshot struct {
	PostgresUp bool // the database answered a ping
	Migrated   bool // every migration (ours and River's) is applied
	// Engines counts engines by product slug and state; every product
	// appears with every state (zeros included).
	Engines []EngineCount
	// PortsUsed is, per node, how many engines hold a port in the range.
	PortsUsed map[string]int
	// Jobs counts River jobs by queue and state (available, scheduled,
	// running, retryable).
	Jobs []JobCount
	// AuditBytes is pg_total_relation_size of the audit log (with indexes and TOAST).
	AuditBytes int64
	// BackupAge is the age of the oldest "latest backup" across engines
	// (an engine never backed up counts from its creation); nil when the
	// backups table does not exist.
	BackupAge *time.Duration
}

// EngineCount is one (product, state) cell of the fleet.
type EngineCount struct {
	Product string
	State   string
	N       int
}

// JobCount is one (queue, state) cell of the River queue.
type JobCount struct {
	Queue string
	State string
	N     int
}

// Source reads a Snapshot. schema.Queries implements it over a pool. On
// error the snapshot still says whether Postgres answered and is
// otherwise ignored.
type Source interface {
	MetricsSnapshot(ctx context.Context, portMin, portMax int) (Snapshot, error)
}

// fleetCollector turns Snapshots into gauges. A scrape reuses the last
// snapshot while it is younger than the cache period; concurrent scrapes
// wait for one read instead of each querying.
type fleetCollector struct {
	cfg Config
	log *slog.Logger

	mu       sync.Mutex
	at       time.Time
	snap     Snapshot
	snapErr  error
	lastTook time.Duration

	engines, portsRatio, portsUsed, jobs, auditBytes, backupAge, pgUp, ready, collectSeconds *prometheus.Desc
}

func newFleetCollector(cfg Config) *fleetCollector {
	if cfg.CacheFor <= 0 {
		cfg.CacheFor = 5 * time.Second
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(Namespace, "", name), help, labels, nil)
	}
	return &fleetCollector{cfg: cfg, log: log,
		engines:    d("engines", "Engines by product and state, from Postgres (every replica reports the whole fleet: aggregate with max).", "product", "state"),
		portsRatio: d("port_range_usage_ratio", "Share of the node's engine port range (ORCH_PORT_MIN..ORCH_PORT_MAX) held by engines.", "node"),
		portsUsed:  d("port_range_used", "Engine ports held on the node.", "node"),
		jobs:       d("river_jobs", "River jobs by queue and state (available, scheduled, running, retryable).", "queue", "state"),
		auditBytes: d("audit_log_size_bytes", "Size of the audit_log table with its indexes (pg_total_relation_size)."),
		backupAge:  d("backup_oldest_age_seconds", "Age of the oldest latest-backup across engines (an engine never backed up counts from its creation)."),
		pgUp:       d("postgres_up", "1 when Postgres answered this process's ping."),
		ready:      d("ready", "1 when GET /health would answer ok: Postgres reachable and every migration applied."),
		collectSeconds: d("fleet_collect_duration_seconds",
			"How long the last read of the fleet gauges from Postgres took."),
	}
}

// Describe implements prometheus.Collector.
func (c *fleetCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.engines, c.portsRatio, c.portsUsed, c.jobs, c.auditBytes, c.backupAge,
		c.pgUp, c.ready, c.collectSeconds} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *fleetCollector) Collect(ch chan<- prometheus.Metric) {
	snap, took, err := c.snapshot()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	gauge(c.pgUp, b2f(snap.PostgresUp))
	gauge(c.ready, b2f(snap.PostgresUp && snap.Migrated && err == nil))
	gauge(c.collectSeconds, took.Seconds())
	if err != nil {
		return // no stale fleet numbers: absent is honest
	}
	for _, e := range snap.Engines {
		gauge(c.engines, float64(e.N), e.Product, e.State)
	}
	size := c.cfg.PortMax - c.cfg.PortMin + 1
	used := map[string]int{}
	if c.cfg.Node != "" {
		used[c.cfg.Node] = 0
	}
	for node, n := range snap.PortsUsed {
		used[node] = n
	}
	for node, n := range used {
		gauge(c.portsUsed, float64(n), node)
		if size > 0 {
			gauge(c.portsRatio, float64(n)/float64(size), node)
		}
	}
	for _, j := range snap.Jobs {
		gauge(c.jobs, float64(j.N), j.Queue, j.State)
	}
	gauge(c.auditBytes, float64(snap.AuditBytes))
	if snap.BackupAge != nil {
		gauge(c.backupAge, snap.BackupAge.Seconds())
	}
}

// snapshot returns the cached snapshot, reading a new one when it is older
// than the cache period.
func (c *fleetCollector) snapshot() (Snapshot, time.Duration, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.at.IsZero() && time.Since(c.at) < c.cfg.CacheFor {
		return c.snap, c.lastTook, c.snapErr
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	snap, err := c.cfg.Source.MetricsSnapshot(ctx, c.cfg.PortMin, c.cfg.PortMax)
	if err != nil {
		c.log.Warn("read fleet metrics", "error", err)
	}
	c.snap, c.snapErr, c.at = snap, err, time.Now()
	c.lastTook = c.at.Sub(start)
	return snap, c.lastTook, err
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
