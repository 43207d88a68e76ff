package metrics_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/metrics"
)

// find returns the metric named name whose labels include want, or nil.
func find(t *testing.T, g prometheus.Gatherer, name string, want map[string]string) *dto.Metric {
	t.Helper()
	return testenv.GatherMetric(t, g, name, want)
}

func counter(t *testing.T, g prometheus.Gatherer, name string, labels map[string]string) float64 {
	t.Helper()
	m := find(t, g, name, labels)
	require.NotNil(t, m, "%s%v", name, labels)
	return m.GetCounter().GetValue()
}

func gauge(t *testing.T, g prometheus.Gatherer, name string, labels map[string]string) float64 {
	t.Helper()
	m := find(t, g, name, labels)
	require.NotNil(t, m, "%s%v", name, labels)
	return m.GetGauge().GetValue()
}

func histCount(t *testing.T, g prometheus.Gatherer, name string, labels map[string]string) uint64 {
	t.Helper()
	m := find(t, g, name, labels)
	if m == nil {
		return 0
	}
	return m.GetHistogram().GetSampleCount()
}

// Code that is not given metrics records nothing and does not panic.
func TestNilMetricsAreSafe(t *testing.T) {
	t.Parallel()
	var m *metrics.Metrics
	m.ObserveAdmit(metrics.AdmitWarm, time.Millisecond)
	m.ObserveRequest("GET", "/status", 200, time.Millisecond)
	m.ObserveJob("engine_provision", "completed", time.Second)
	m.Lifecycle(orch.ActionProvision, false, time.Second)
	m.EngineCrashed("health")
	m.HealthProbeFailures(3)
	m.ObserveStep(metrics.StepHealth, time.Millisecond)
	m.SetSchedulerLeader(true)
	m.SchedulerLeaderFunc(func() bool { return true })
	req, _ := http.NewRequest("GET", "/metrics", nil)
	w := &recorder{header: http.Header{}}
	m.Handler().ServeHTTP(w, req)
	require.Equal(t, http.StatusNotFound, w.status)
}

type recorder struct {
	header http.Header
	status int
	body   strings.Builder
}

func (r *recorder) Header() http.Header { return r.header }
func (r *recorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = 200
	}
	return r.body.Write(b)
}
func (r *recorder) WriteHeader(code int) { r.status = code }

// Committed lifecycle outcomes land on the right counters and the boot
// histogram; failures never count as boots.
func TestLifecycleCounters(t *testing.T) {
	t.Parallel()
	m := metrics.New(metrics.Config{Version: "test"})
	g := m.Gatherer()
	m.Lifecycle(orch.ActionProvision, false, 1500*time.Millisecond)
	m.Lifecycle(orch.ActionProvisionFailed, true, 60*time.Second)
	m.Lifecycle(orch.ActionRestart, false, 300*time.Millisecond)
	m.Lifecycle(orch.ActionAutoRestartSuccess, false, 200*time.Millisecond)
	m.Lifecycle(orch.ActionAutoRestartFailed, true, 0)
	m.Lifecycle(orch.ActionDestroy, false, 0)
	m.Lifecycle(orch.ActionDestroy, true, 0) // a destroy that failed destroyed nothing
	m.Lifecycle(orch.ActionWake, false, 100*time.Millisecond)
	m.Lifecycle(orch.ActionStop, false, 0)
	m.EngineCrashed("crash")
	m.EngineCrashed("health")
	m.EngineCrashed("weird")
	m.HealthProbeFailures(4)
	m.HealthProbeFailures(0)
	m.SetSchedulerLeader(true)

	require.Equal(t, 1.0, counter(t, g, "orchestrator_engine_provisions_total", map[string]string{"outcome": "succeeded"}))
	require.Equal(t, 1.0, counter(t, g, "orchestrator_engine_provisions_total", map[string]string{"outcome": "failed"}))
	require.Equal(t, 1.0, counter(t, g, "orchestrator_engine_restarts_total", map[string]string{"trigger": "manual", "outcome": "succeeded"}))
	require.Equal(t, 0.0, counter(t, g, "orchestrator_engine_restarts_total", map[string]string{"trigger": "manual", "outcome": "failed"}))
	require.Equal(t, 1.0, counter(t, g, "orchestrator_engine_restarts_total", map[string]string{"trigger": "auto", "outcome": "succeeded"}))
	require.Equal(t, 1.0, counter(t, g, "orchestrator_engine_restarts_total", map[string]string{"trigger": "auto", "outcome": "failed"}))
	require.Equal(t, 1.0, counter(t, g, "orchestrator_engine_destroys_total", nil))
	require.Equal(t, 1.0, counter(t, g, "orchestrator_engine_crashes_total", map[string]string{"reason": "crash"}))
	require.Equal(t, 1.0, counter(t, g, "orchestrator_engine_crashes_total", map[string]string{"reason": "health"}))
	require.Equal(t, 1.0, counter(t, g, "orchestrator_engine_crashes_total", map[string]string{"reason": "other"}))
	require.Equal(t, 4.0, counter(t, g, "orchestrator_health_probe_failures_total", nil))
	require.Equal(t, 1.0, gauge(t, g, "orchestrator_scheduler_leader", nil))
	require.Equal(t, 1.0, gauge(t, g, "orchestrator_build_info", map[string]string{"version": "test"}))

	require.EqualValues(t, 1, histCount(t, g, "orchestrator_engine_boot_duration_seconds", map[string]string{"operation": "provision"}))
	require.EqualValues(t, 1, histCount(t, g, "orchestrator_engine_boot_duration_seconds", map[string]string{"operation": "restart"}))
	require.EqualValues(t, 1, histCount(t, g, "orchestrator_engine_boot_duration_seconds", map[string]string{"operation": "auto_restart"}))
	require.EqualValues(t, 1, histCount(t, g, "orchestrator_engine_boot_duration_seconds", map[string]string{"operation": "wake"}))
	require.EqualValues(t, 0, histCount(t, g, "orchestrator_engine_boot_duration_seconds", map[string]string{"operation": "stop"}))
	m.SetSchedulerLeader(false)
	require.Equal(t, 0.0, gauge(t, g, "orchestrator_scheduler_leader", nil))
	var leads atomic.Bool
	m.SchedulerLeaderFunc(leads.Load)
	require.Equal(t, 0.0, gauge(t, g, "orchestrator_scheduler_leader", nil))
	leads.Store(true)
	require.Equal(t, 1.0, gauge(t, g, "orchestrator_scheduler_leader", nil), "read at scrape time")
}

// Two Metrics in one process (parallel tests, several fleets) keep
// separate counts.
func TestMetricsAreIndependent(t *testing.T) {
	t.Parallel()
	a, b := metrics.New(metrics.Config{}), metrics.New(metrics.Config{})
	a.Lifecycle(orch.ActionDestroy, false, 0)
	require.Equal(t, 1.0, counter(t, a.Gatherer(), "orchestrator_engine_destroys_total", nil))
	require.Equal(t, 0.0, counter(t, b.Gatherer(), "orchestrator_engine_destroys_total", nil))
}

type fakeSource struct {
	calls atomic.Int32
	delay time.Duration
	snap  metrics.Snapshot
	err   error
}

func (f *fakeSource) MetricsSnapshot(ctx context.Context, portMin, portMax int) (metrics.Snapshot, error) {
	f.calls.Add(1)
	time.Sleep(f.delay) // a slow read on purpose: concurrent scrapes arrive while it runs
	return f.snap, f.err
}

// The fleet gauges come from one read per cache period, however many
// scrapes (even concurrent ones) ask.
func TestFleetCollectorReadsOncePerPeriod(t *testing.T) {
	t.Parallel()
	age := 90 * time.Minute
	src := &fakeSource{delay: 20 * time.Millisecond, snap: metrics.Snapshot{PostgresUp: true, Migrated: true,
		Engines:    []metrics.EngineCount{{Product: "acme", State: "running", N: 3}, {Product: "acme", State: "failed", N: 1}},
		PortsUsed:  map[string]int{"n1": 8, "n2": 2},
		Jobs:       []metrics.JobCount{{Queue: "node:n1", State: "available", N: 5}},
		AuditBytes: 8192, BackupAge: &age}}
	m := metrics.New(metrics.Config{Source: src, CacheFor: 300 * time.Millisecond, PortMin: 9001, PortMax: 9010, Node: "n3"})
	g := m.Gatherer()
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); _, err := g.Gather(); require.NoError(t, err) }()
	}
	wg.Wait()
	require.EqualValues(t, 1, src.calls.Load(), "concurrent scrapes share one read")

	require.Equal(t, 3.0, gauge(t, g, "orchestrator_engines", map[string]string{"product": "acme", "state": "running"}))
	require.Equal(t, 1.0, gauge(t, g, "orchestrator_engines", map[string]string{"product": "acme", "state": "failed"}))
	require.Equal(t, 0.8, gauge(t, g, "orchestrator_port_range_usage_ratio", map[string]string{"node": "n1"}))
	require.Equal(t, 0.2, gauge(t, g, "orchestrator_port_range_usage_ratio", map[string]string{"node": "n2"}))
	require.Equal(t, 0.0, gauge(t, g, "orchestrator_port_range_usage_ratio", map[string]string{"node": "n3"}), "this node, even empty")
	require.Equal(t, 8.0, gauge(t, g, "orchestrator_port_range_used", map[string]string{"node": "n1"}))
	require.Equal(t, 5.0, gauge(t, g, "orchestrator_river_jobs", map[string]string{"queue": "node:n1", "state": "available"}))
	require.Equal(t, 8192.0, gauge(t, g, "orchestrator_audit_log_size_bytes", nil))
	require.Equal(t, age.Seconds(), gauge(t, g, "orchestrator_backup_oldest_age_seconds", nil))
	require.Equal(t, 1.0, gauge(t, g, "orchestrator_postgres_up", nil))
	require.Equal(t, 1.0, gauge(t, g, "orchestrator_ready", nil))
	require.EqualValues(t, 1, src.calls.Load(), "still cached")

	time.Sleep(350 * time.Millisecond) // the cache period (300 ms) passes: time itself is what is tested
	_, err := g.Gather()
	require.NoError(t, err)
	require.EqualValues(t, 2, src.calls.Load(), "read again once the period passed")
}

// When Postgres is down the collector says so and reports no stale fleet
// numbers; without a backups table the backup age is absent.
func TestFleetCollectorOnErrors(t *testing.T) {
	t.Parallel()
	down := &fakeSource{err: errors.New("ping: connection refused")}
	g := metrics.New(metrics.Config{Source: down, PortMin: 1, PortMax: 10}).Gatherer()
	require.Equal(t, 0.0, gauge(t, g, "orchestrator_postgres_up", nil))
	require.Equal(t, 0.0, gauge(t, g, "orchestrator_ready", nil))
	require.Nil(t, find(t, g, "orchestrator_audit_log_size_bytes", nil))
	require.Nil(t, find(t, g, "orchestrator_port_range_usage_ratio", nil))

	unmigrated := &fakeSource{snap: metrics.Snapshot{PostgresUp: true}}
	g = metrics.New(metrics.Config{Source: unmigrated}).Gatherer()
	require.Equal(t, 1.0, gauge(t, g, "orchestrator_postgres_up", nil))
	require.Equal(t, 0.0, gauge(t, g, "orchestrator_ready", nil))

	noBackups := &fakeSource{snap: metrics.Snapshot{PostgresUp: true, Migrated: true}}
	g = metrics.New(metrics.Config{Source: noBackups}).Gatherer()
	require.Equal(t, 1.0, gauge(t, g, "orchestrator_ready", nil))
	require.Nil(t, find(t, g, "orchestrator_backup_oldest_age_seconds", nil))
}

// Serve answers GET /metrics in the exposition format and nothing else.
func TestServe(t *testing.T) {
	t.Parallel()
	m := metrics.New(metrics.Config{})
	m.ObserveAdmit(metrics.AdmitCold, 2*time.Second)
	m.ObserveRequest("POST", "/engines/{user_id}/admit", 200, time.Millisecond)
	m.ObserveJob("engine_provision", "completed", time.Second)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Serve(ctx, l) }()
	base := "http://" + l.Addr().String()

	res, err := http.Get(base + "/metrics")
	require.NoError(t, err)
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	require.Equal(t, http.StatusOK, res.StatusCode)
	require.True(t, strings.HasPrefix(res.Header.Get("Content-Type"), "text/plain"), res.Header.Get("Content-Type"))
	for _, want := range []string{
		`orchestrator_admit_duration_seconds_count{outcome="cold"} 1`,
		`orchestrator_http_request_duration_seconds_count{code="200",method="POST",route="/engines/{user_id}/admit"} 1`,
		`orchestrator_job_duration_seconds_count{kind="engine_provision",outcome="completed"} 1`,
		`orchestrator_engine_restarts_total{outcome="succeeded",trigger="auto"} 0`,
		"go_goroutines", "process_start_time_seconds",
	} {
		require.Contains(t, string(body), want)
	}
	for _, path := range []string{"/", "/health", "/engines"} {
		res, err := http.Get(base + path)
		require.NoError(t, err)
		res.Body.Close()
		require.Equal(t, http.StatusNotFound, res.StatusCode, path)
	}
	cancel()
	require.NoError(t, <-done)
}

// Request labels come from fixed sets: unusual methods are OTHER, unusual
// statuses their class, a missing route "unmatched".
func TestRequestLabelsBounded(t *testing.T) {
	t.Parallel()
	m := metrics.New(metrics.Config{})
	for _, tc := range []struct {
		method string
		code   int
	}{{"BREW", 418}, {"get", 299}, {"PROPFIND", 207}, {"X", 1000}, {"POST", 429}, {"DELETE", 200}} {
		m.ObserveRequest(tc.method, "", tc.code, time.Millisecond)
	}
	g := m.Gatherer()
	for _, want := range []map[string]string{
		{"method": "OTHER", "route": "unmatched", "code": "4xx"},
		{"method": "OTHER", "route": "unmatched", "code": "2xx"},
		{"method": "OTHER", "route": "unmatched", "code": "other"},
		{"method": "POST", "route": "unmatched", "code": "429"},
		{"method": "DELETE", "route": "unmatched", "code": "200"},
	} {
		require.NotNil(t, find(t, g, "orchestrator_http_request_duration_seconds", want), "%v", want)
	}
	require.Nil(t, find(t, g, "orchestrator_http_request_duration_seconds", map[string]string{"method": "BREW"}))
}

// An operation's steps are recorded under their own names, every step's
// series exists from the start, and an unknown name cannot add a series.
func TestStepsBounded(t *testing.T) {
	t.Parallel()
	m := metrics.New(metrics.Config{})
	g := m.Gatherer()
	const name = "orchestrator_operation_step_duration_seconds"
	for _, s := range metrics.Steps {
		require.NotNil(t, find(t, g, name, map[string]string{"step": s}), s)
		require.Zero(t, histCount(t, g, name, map[string]string{"step": s}), s)
	}
	m.ObserveStep(metrics.StepHealth, 30*time.Millisecond)
	m.ObserveStep(metrics.StepHealth, 10*time.Millisecond)
	m.ObserveStep("user-supplied", time.Second)
	m.ObserveStep(metrics.StepWake, -time.Second) // clocks apart: never negative
	h := find(t, g, name, map[string]string{"step": metrics.StepHealth}).GetHistogram()
	require.Equal(t, uint64(2), h.GetSampleCount())
	require.InDelta(t, 0.040, h.GetSampleSum(), 1e-9)
	require.Equal(t, uint64(1), histCount(t, g, name, map[string]string{"step": "other"}))
	require.Nil(t, find(t, g, name, map[string]string{"step": "user-supplied"}))
	require.Zero(t, find(t, g, name, map[string]string{"step": metrics.StepWake}).GetHistogram().GetSampleSum())
}
