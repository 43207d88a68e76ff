// Package metrics is the orchestrator's Prometheus instrumentation:
// the counters and histograms the API and the workers update
// as things happen, and one collector that reads the fleet's gauges from
// Postgres at most once per cache period, however often and however many
// series are scraped. Served on its own listener (ORCH_METRICS_ADDR,
// path /metrics), never on the API's, whose GET /metrics is the product
// contract's JSON.
//
// It sits at the bottom of the dependency graph (root package and the
// Prometheus client only) so api and workers can both use it, and every
// method is safe on a nil *Metrics: code that is not given metrics (most
// tests) records nothing. Each Metrics has its own registry, so several
// in one process (parallel tests) never mix their counts.
package metrics

import (
	"context"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/pprof"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	orch "github.com/enginefleet/orchestrator"
)

// Namespace prefixes every metric name.
const Namespace = "orchestrator"

// Admit outcomes, the label of orchestrator_admit_duration_seconds.
const (
	AdmitWarm   = "warm"   // the engine was running: answered from one read
	AdmitCold   = "cold"   // provisioned (or joined a provision) for this admit
	AdmitWake   = "wake"   // woke a sleeping or stopped engine, or waited for a restart
	AdmitDenied = "denied" // admitted:false, or refused with 429 (rate limit, quota)
	AdmitError  = "error"  // any other error (boot timeout, port exhaustion, backend)
)

// Config configures New.
type Config struct {
	// Source reads the fleet's gauges; nil leaves them out (tests of the
	// counters, processes without a database).
	Source Source
	// CacheFor is how long one read of Source serves scrapes (default 5 s).
	CacheFor time.Duration
	// PortMin and PortMax are the engine port range (ORCH_PORT_MIN/MAX)
	// of every node, for orchestrator_port_range_usage_ratio.
	PortMin, PortMax int
	// Node is this process's node; its port usage is reported even with no engine.
	Node    string
	Version string
	Log     *slog.Logger // collection errors; nil = discard
}

// Metrics holds the orchestrator's metrics and their registry.
type Metrics struct {
	reg *prometheus.Registry

	provisions    *prometheus.CounterVec
	destroys      prometheus.Counter
	restarts      *prometheus.CounterVec
	crashes       *prometheus.CounterVec
	probeFailures prometheus.Counter
	rescued       prometheus.Counter
	rolloutEng    *prometheus.CounterVec
	rolloutGates  prometheus.Counter
	abandoned     *prometheus.CounterVec
	admit         *prometheus.HistogramVec
	boot          *prometheus.HistogramVec
	jobs          *prometheus.HistogramVec
	requests      *prometheus.HistogramVec
	steps         *prometheus.HistogramVec
	leader        atomic.Uint64               // math.Float64bits of the set value
	leaderFn      atomic.Pointer[func() bool] // when set, read at scrape time instead
	apiGuards
}

// New builds the metrics and registers them, with the Go runtime and
// process collectors and, when cfg.Source is set, the fleet collector.
func New(cfg Config) *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry()}
	m.provisions = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: "engine_provisions_total",
		Help: "Provisions finished by this process's workers, by outcome (succeeded, failed)."}, []string{"outcome"})
	m.destroys = prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Name: "engine_destroys_total",
		Help: "Engines destroyed by this process's workers."})
	m.restarts = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: "engine_restarts_total",
		Help: "Engine restarts finished by this process's workers, by trigger (manual: the API; auto: auto-restart after a failure) and outcome."},
		[]string{"trigger", "outcome"})
	m.crashes = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: "engine_crashes_total",
		Help: "Engines that went failed (audit health_failed), by reason (health: probes past the threshold; crash: the runtime reported the process dead)."},
		[]string{"reason"})
	m.probeFailures = prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Name: "health_probe_failures_total",
		Help: "Failed engine health probes of the health sweeps (timeouts, non-2xx, status not ok)."})
	m.rescued = prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Name: "jobs_rescued_total",
		Help: "Running jobs this process re-queued because their worker process died (or lost them)."})
	m.abandoned = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: "operations_abandoned_total",
		Help: "Operations this process ended because nothing else would: their job was cancelled, discarded or deleted, or their deadline passed (by reason)."},
		[]string{"reason"})
	m.rolloutEng = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: "rollout_engines_total",
		Help: "Engines of fleet rollouts whose step this process's rollout drivers settled, by result (upgraded, failed, skipped, rolled_back, rollback_failed)."},
		[]string{"result"})
	m.rolloutGates = prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Name: "rollout_gate_trips_total",
		Help: "Fleet rollouts this process's drivers stopped and started rolling back because a wave exceeded its failure budget."})
	m.admit = prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: Namespace, Name: "admit_duration_seconds",
		Help:    "POST /engines/{user_id}/admit latency by outcome (warm, cold, wake, denied, error).",
		Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120}}, []string{"outcome"})
	m.boot = prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: Namespace, Name: "engine_boot_duration_seconds",
		Help:    "Time from create/start until the engine's /health answered ok, for successful boots, by operation.",
		Buckets: []float64{.05, .1, .25, .5, 1, 2, 3, 5, 10, 20, 30, 60, 120}}, []string{"operation"})
	m.jobs = prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: Namespace, Name: "job_duration_seconds",
		Help:    "River job run time by kind and outcome (completed, failed, snoozed, cancelled).",
		Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}}, []string{"kind", "outcome"})
	m.requests = prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: Namespace, Name: "http_request_duration_seconds",
		Help:    "API request latency by method (standard methods, others as OTHER), route pattern (unmatched when none) and status code (unusual ones by class).",
		Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120}}, []string{"method", "route", "code"})
	m.steps = prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: Namespace, Name: "operation_step_duration_seconds",
		Help: "Where a lifecycle operation's time goes, by step: pickup (job available → a worker runs it), ensure (image, volume, " +
			"container), start, health (started → /health ok), commit (the outcome's transaction), wake (outcome committed → the waiting request has it).",
		Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120}}, []string{"step"})
	leader := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: Namespace, Name: "scheduler_leader",
		Help: "1 while this process's scheduler holds the leader lock."}, m.leaderValue)
	build := prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Name: "build_info",
		Help: "Always 1; the version label is the running build.", ConstLabels: prometheus.Labels{"version": cfg.Version}})
	build.Set(1)
	m.reg.MustRegister(m.provisions, m.destroys, m.restarts, m.crashes, m.probeFailures, m.rescued, m.rolloutEng, m.rolloutGates, m.abandoned, m.admit, m.boot, m.jobs,
		m.requests, m.steps, leader, build,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	// Series that alerts and dashboards rate() exist from the start at 0,
	// so the first increment is seen as one.
	for _, o := range []string{"succeeded", "failed"} {
		m.provisions.WithLabelValues(o)
		for _, tr := range []string{"manual", "auto"} {
			m.restarts.WithLabelValues(tr, o)
		}
	}
	for _, r := range []string{"health", "crash"} {
		m.crashes.WithLabelValues(r)
	}
	for _, r := range []string{"upgraded", "failed", "rolled_back", "rollback_failed"} {
		m.rolloutEng.WithLabelValues(r)
	}
	for _, s := range Steps {
		m.steps.WithLabelValues(s)
	}
	m.registerAPIGuards()
	if cfg.Source != nil {
		m.reg.MustRegister(newFleetCollector(cfg))
	}
	return m
}

// Handler serves the exposition format of every registered metric.
func (m *Metrics) Handler() http.Handler {
	if m == nil {
		return http.NotFoundHandler()
	}
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg, MaxRequestsInFlight: 4, Timeout: 20 * time.Second})
}

// Gatherer is the registry, for tests that read values without HTTP.
func (m *Metrics) Gatherer() prometheus.Gatherer { return m.reg }

// Serve serves GET /metrics (and nothing else) on l until ctx ends, then
// shuts down within 5 s. Binding is the caller's, so a bad
// ORCH_METRICS_ADDR stops the process at start.
func (m *Metrics) Serve(ctx context.Context, l net.Listener) error {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", m.Handler())
	// Go's profiler, for an operator diagnosing a replica under load: on
	// this private listener only, never on the API's.
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return srv.Shutdown(sctx)
}

// ObserveAdmit records one admit's latency under its outcome (Admit*).
func (m *Metrics) ObserveAdmit(outcome string, d time.Duration) {
	if m == nil {
		return
	}
	m.admit.WithLabelValues(outcome).Observe(d.Seconds())
}

// ObserveRequest records one API request. Every label comes from a fixed
// set, whatever the client sends, so no request can add series: route is
// the matched pattern ("/engines/{user_id}/admit"), never the raw path
// ("unmatched" when none matched); method is one of the standard methods,
// any other as "OTHER"; code is a status the API answers, any other as
// its class ("4xx").
func (m *Metrics) ObserveRequest(method, route string, code int, d time.Duration) {
	if m == nil {
		return
	}
	if route == "" {
		route = "unmatched"
	}
	m.requests.WithLabelValues(methodLabel(method), route, codeLabel(code)).Observe(d.Seconds())
}

// methodLabel is method if it is a standard one, else "OTHER".
func methodLabel(method string) string {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch,
		http.MethodDelete, http.MethodOptions, http.MethodConnect, http.MethodTrace:
		return method
	}
	return "OTHER"
}

// knownCodes are the statuses the API answers; they are labelled exactly
// (dashboards tell 429 from 401). Any other is labelled by its class.
var knownCodes = map[int]string{}

func init() {
	for _, c := range []int{200, 201, 202, 204, 301, 304, 400, 401, 403, 404, 405, 408, 409, 413, 415, 429, 431,
		500, 502, 503, 504} {
		knownCodes[c] = strconv.Itoa(c)
	}
}

// codeLabel is code itself when known, else its class ("4xx"), "other"
// outside 100..599.
func codeLabel(code int) string {
	if s, ok := knownCodes[code]; ok {
		return s
	}
	if code < 100 || code > 599 {
		return "other"
	}
	return strconv.Itoa(code/100) + "xx"
}

// The steps of a lifecycle operation, the label of
// orchestrator_operation_step_duration_seconds, in the order they happen.
const (
	StepPickup = "pickup" // the job became available → a worker runs it
	StepEnsure = "ensure" // the backend's Ensure: image, volume, container
	StepStart  = "start"  // the backend's Start
	StepHealth = "health" // started → /health answered ok
	StepCommit = "commit" // the outcome's transaction
	StepWake   = "wake"   // the outcome committed → the waiting request read it
)

// Steps lists the steps in order.
var Steps = []string{StepPickup, StepEnsure, StepStart, StepHealth, StepCommit, StepWake}

// ObserveStep records how long one step of an operation took (Step*).
// Any other step name is recorded as "other", so no caller can add series.
func (m *Metrics) ObserveStep(step string, d time.Duration) {
	if m == nil {
		return
	}
	switch step {
	case StepPickup, StepEnsure, StepStart, StepHealth, StepCommit, StepWake:
	default:
		step = "other"
	}
	m.steps.WithLabelValues(step).Observe(max(d, 0).Seconds())
}

// ObserveJob records one River job run.
func (m *Metrics) ObserveJob(kind, outcome string, d time.Duration) {
	if m == nil {
		return
	}
	m.jobs.WithLabelValues(kind, outcome).Observe(d.Seconds())
}

// Lifecycle records a committed lifecycle outcome: its audit action,
// whether the operation failed, and the boot duration when the engine
// booted (0 otherwise). Called once the outcome's transaction commits.
func (m *Metrics) Lifecycle(action orch.Action, failed bool, boot time.Duration) {
	if m == nil {
		return
	}
	outcome := "succeeded"
	if failed {
		outcome = "failed"
	}
	var op string
	switch action {
	case orch.ActionProvision, orch.ActionProvisionFailed:
		if action == orch.ActionProvisionFailed {
			outcome = "failed"
		}
		m.provisions.WithLabelValues(outcome).Inc()
		op = "provision"
	case orch.ActionDestroy:
		if !failed {
			m.destroys.Inc()
		}
	case orch.ActionRestart:
		m.restarts.WithLabelValues("manual", outcome).Inc()
		op = "restart"
	case orch.ActionAutoRestartSuccess, orch.ActionAutoRestartFailed:
		if action == orch.ActionAutoRestartFailed {
			outcome = "failed"
		}
		m.restarts.WithLabelValues("auto", outcome).Inc()
		op = "auto_restart"
	case orch.ActionStart, orch.ActionWake, orch.ActionUpgrade, orch.ActionRotateKey, orch.ActionRestore:
		op = string(action)
	}
	if boot > 0 && op != "" && outcome == "succeeded" {
		m.boot.WithLabelValues(op).Observe(boot.Seconds())
	}
}

// EngineCrashed counts an engine that went failed: reason "health" (its
// probes failed past the threshold) or "crash" (the runtime reported it
// dead). The health sweep and the crash check call it once the engine's
// failed state is committed.
func (m *Metrics) EngineCrashed(reason string) {
	if m == nil {
		return
	}
	if reason != "health" && reason != "crash" {
		reason = "other"
	}
	m.crashes.WithLabelValues(reason).Inc()
}

// HealthProbeFailures adds n failed health probes (a sweep batch's count).
func (m *Metrics) HealthProbeFailures(n int) {
	if m == nil || n <= 0 {
		return
	}
	m.probeFailures.Add(float64(n))
}

// JobsRescued adds n jobs re-queued from dead or job-losing workers.
func (m *Metrics) JobsRescued(n int) {
	if m == nil || n <= 0 {
		return
	}
	m.rescued.Add(float64(n))
}

// OperationAbandoned counts one operation ended by the operation sweep.
func (m *Metrics) OperationAbandoned(reason string) {
	if m == nil {
		return
	}
	m.abandoned.WithLabelValues(reason).Inc()
}

// SetSchedulerLeader reports whether this process's scheduler leads.
func (m *Metrics) SetSchedulerLeader(leader bool) {
	if m == nil {
		return
	}
	m.leader.Store(math.Float64bits(b2f(leader)))
}

// SchedulerLeaderFunc makes orchestrator_scheduler_leader read leader at
// each scrape (the scheduler's Leader method), instead of a set value.
func (m *Metrics) SchedulerLeaderFunc(leader func() bool) {
	if m == nil {
		return
	}
	m.leaderFn.Store(&leader)
}

func (m *Metrics) leaderValue() float64 {
	if f := m.leaderFn.Load(); f != nil {
		return b2f((*f)())
	}
	return math.Float64frombits(m.leader.Load())
}

// RolloutEngine counts an engine of a rollout whose step settled (result:
// its new rollout status).
func (m *Metrics) RolloutEngine(result string) {
	if m == nil {
		return
	}
	m.rolloutEng.WithLabelValues(result).Inc()
}

// RolloutGateTripped counts a rollout stopped by its failure budget.
func (m *Metrics) RolloutGateTripped() {
	if m == nil {
		return
	}
	m.rolloutGates.Inc()
}
