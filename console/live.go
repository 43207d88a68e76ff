package console

import (
	"context"
	"encoding/json"
	"math"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/schema"
)

// Live numbers: the pages poll small JSON documents (every few seconds,
// paused while the tab is hidden) rather than hold a server-sent event
// stream: a stream would hold an API replica's graceful drain open, and a
// browser's six connections per host with it. One read of Postgres serves
// every poll of a scope for liveTTL, however many tabs are open.

const liveTTL = 2 * time.Second

// Live is GET /console/api/live.
type Live struct {
	At          time.Time      `json:"at"`
	Total       int            `json:"total"`
	ByState     map[string]int `json:"by_state"`
	InFlightOps int            `json:"in_flight_ops"`
	FailedOps1h int            `json:"failed_ops_1h"`
	Stuck       int            `json:"stuck"`
	// Minutes are per-minute counts of the last hour (61 entries, oldest first).
	Minutes struct {
		Start      time.Time `json:"start"`
		Restarts   []int     `json:"restarts"`
		Crashes    []int     `json:"crashes"`
		Provisions []int     `json:"provisions"`
		FailedOps  []int     `json:"failed_ops"`
	} `json:"minutes"`
	RestartsPerMin float64        `json:"restarts_per_min"` // mean of the last 5 whole minutes
	Ports          []NodePorts    `json:"ports,omitempty"`
	PortsUsed      int            `json:"ports_used"` // all nodes together
	Jobs           map[string]int `json:"jobs,omitempty"`
	BackupAgeS     *float64       `json:"oldest_backup_age_s,omitempty"`
	Admit          *AdmitLatency  `json:"admit,omitempty"`
}

// NodePorts is a node's engine port usage.
type NodePorts struct {
	Node string `json:"node"`
	Used int    `json:"used"`
	Size int    `json:"size"`
}

type liveCache struct {
	mu      sync.Mutex
	byScope map[string]liveEntry
}

type liveEntry struct {
	at   time.Time
	live Live
}

// readLive returns the scope's live numbers, from the cache when fresh.
func (c *Console) readLive(ctx context.Context, scope string) (Live, error) {
	c.live.mu.Lock()
	defer c.live.mu.Unlock() // one reader at a time: concurrent polls wait for it
	if e, ok := c.live.byScope[scope]; ok && time.Since(e.at) < liveTTL {
		return e.live, nil
	}
	l, err := c.loadLive(ctx, scope)
	if err != nil {
		return l, err
	}
	if c.live.byScope == nil {
		c.live.byScope = map[string]liveEntry{}
	}
	c.live.byScope[scope] = liveEntry{at: time.Now(), live: l}
	return l, nil
}

func (c *Console) loadLive(ctx context.Context, scope string) (Live, error) {
	var l Live
	h, err := schema.New(c.pool).ConsoleHeadline(ctx, scope)
	if err != nil {
		return l, err
	}
	l.At, l.Total, l.InFlightOps, l.FailedOps1h, l.Stuck = h.At, h.Total, h.InFlightOps, h.FailedOps1h, h.Stuck
	l.ByState = map[string]int{}
	for _, st := range orch.States {
		l.ByState[string(st)] = h.ByState[st]
	}
	n := len(h.Minutes)
	l.Minutes.Start = h.Minutes[0].Start
	l.Minutes.Restarts, l.Minutes.Crashes = make([]int, n), make([]int, n)
	l.Minutes.Provisions, l.Minutes.FailedOps = make([]int, n), make([]int, n)
	for i, m := range h.Minutes {
		l.Minutes.Restarts[i], l.Minutes.Crashes[i], l.Minutes.Provisions[i], l.Minutes.FailedOps[i] = m.Restarts, m.Crashes, m.Provisions, m.FailedOps
	}
	sum := 0
	for _, v := range l.Minutes.Restarts[n-6 : n-1] {
		sum += v
	}
	l.RestartsPerMin = float64(sum) / 5
	if scope != "" {
		return l, nil // the rest is the whole fleet's: admins only
	}
	// The fleet gauges the Prometheus collector reads (metrics package),
	// from the same query.
	snap, err := c.metrics.MetricsSnapshot(ctx, c.cfg.PortMin, c.cfg.PortMax)
	if err != nil {
		return l, err
	}
	size := c.cfg.PortMax - c.cfg.PortMin + 1
	for node, used := range snap.PortsUsed {
		l.Ports = append(l.Ports, NodePorts{Node: node, Used: used, Size: size})
		l.PortsUsed += used
	}
	sort.Slice(l.Ports, func(i, j int) bool { return l.Ports[i].Node < l.Ports[j].Node })
	l.Jobs = map[string]int{"available": 0, "scheduled": 0, "running": 0, "retryable": 0}
	for _, j := range snap.Jobs {
		l.Jobs[j.State] += j.N
	}
	if snap.BackupAge != nil {
		s := snap.BackupAge.Seconds()
		l.BackupAgeS = &s
	}
	l.Admit = c.admit.latency(time.Now())
	return l, nil
}

func (c *Console) liveJSON(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := queryCtx(r)
	defer cancel()
	l, err := c.readLive(ctx, sessionFrom(r.Context()).Scope())
	if err != nil {
		c.failErr(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, l)
}

// EngineLive is GET /console/api/engines/{id}: what the engine page follows.
type EngineLive struct {
	ID             string          `json:"engine_id"`
	Status         string          `json:"status"`
	HealthFailures int             `json:"health_failures"`
	RestartAttempt int             `json:"restart_attempts"`
	LastHealthAt   *time.Time      `json:"last_health_at"`
	LastError      string          `json:"last_error"`
	UpdatedAt      time.Time       `json:"updated_at"`
	Gone           bool            `json:"gone"`
	Operations     []OperationLive `json:"operations"`
}

// OperationLive is an operation as the pages follow it.
type OperationLive struct {
	ID           string    `json:"operation_id"`
	Kind         string    `json:"kind"`
	Status       string    `json:"status"`
	Actor        string    `json:"actor"`
	ErrorCode    string    `json:"error_code,omitempty"`
	ErrorMessage string    `json:"error_message,omitempty"`
	CreatedAt    time.Time `json:"created_at"`
	UpdatedAt    time.Time `json:"updated_at"`
	ElapsedS     float64   `json:"elapsed_s"`
	ExpectedS    float64   `json:"expected_s"` // how long it may take (progress)
	Done         bool      `json:"done"`
}

func (c *Console) opLive(o orch.Operation, now time.Time) OperationLive {
	end := now
	if o.Status.Done() {
		end = o.UpdatedAt
	}
	return OperationLive{ID: o.ID, Kind: string(o.Kind), Status: string(o.Status), Actor: o.Actor, ErrorCode: string(o.ErrorCode),
		ErrorMessage: o.ErrorMessage, CreatedAt: o.CreatedAt, UpdatedAt: o.UpdatedAt, Done: o.Status.Done(),
		ElapsedS: math.Round(end.Sub(o.CreatedAt).Seconds()*10) / 10, ExpectedS: c.expected(o.Kind).Seconds()}
}

// expected is how long an operation of kind may take, for the progress
// bar: what the lifecycle core waits for it, else a generous guess.
func (c *Console) expected(kind orch.OpKind) time.Duration {
	if c.cfg.OpTimeout != nil {
		if d := c.cfg.OpTimeout(kind); d > 0 {
			return d
		}
	}
	switch kind {
	case orch.OpStop, orch.OpDestroy, orch.OpBackup:
		return time.Minute
	}
	return 90 * time.Second
}

func (c *Console) engineJSON(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := queryCtx(r)
	defer cancel()
	s := sessionFrom(r.Context())
	id := r.PathValue("id")
	q := schema.New(c.pool)
	out := EngineLive{ID: id, Operations: []OperationLive{}}
	e, _, err := q.ConsoleEngine(ctx, s.Scope(), id)
	switch {
	case orch.IsCode(err, orch.CodeEngineNotFound):
		out.Gone = true
	case err != nil:
		c.failErr(w, r, err)
		return
	default:
		out.Status, out.HealthFailures, out.RestartAttempt = string(e.Status), e.HealthFailures, e.RestartAttempts
		out.LastHealthAt, out.LastError, out.UpdatedAt = e.LastHealthAt, e.LastError, e.UpdatedAt
	}
	ops, err := q.ConsoleEngineOperations(ctx, id, 10)
	if err != nil {
		c.failErr(w, r, err)
		return
	}
	now := time.Now()
	for _, o := range ops {
		if s.Scope() != "" && o.ProductID != s.Scope() {
			continue
		}
		out.Operations = append(out.Operations, c.opLive(o, now))
	}
	if out.Gone && len(out.Operations) == 0 {
		c.fail(w, r, http.StatusNotFound, "engine not found")
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (c *Console) operationJSON(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := queryCtx(r)
	defer cancel()
	o, err := schema.New(c.pool).ConsoleOperation(ctx, sessionFrom(r.Context()).Scope(), r.PathValue("id"))
	if err != nil {
		c.failErr(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, c.opLive(o, time.Now()))
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v) //nolint:errcheck
}

// AdmitLatency is this API replica's admit latency over the last minute
// or so, from its Prometheus histogram (other replicas keep their own).
type AdmitLatency struct {
	WindowS float64  `json:"window_s"`
	Count   uint64   `json:"count"` // admits answered in the window (all outcomes)
	Cold    uint64   `json:"cold"`  // of which provisioned or woke an engine
	WarmP50 *float64 `json:"warm_p50_ms,omitempty"`
	WarmP95 *float64 `json:"warm_p95_ms,omitempty"`
}

// admitSampler keeps snapshots of the admit histogram, taken when the
// live numbers are read (at most every sampleEvery), so a latency over a
// recent window is the difference of two cumulative snapshots.
type admitSampler struct {
	gatherer prometheus.Gatherer
	mu       sync.Mutex
	samples  []admitSample
}

type admitSample struct {
	at    time.Time
	warm  []bucket // cumulative counts by upper bound
	count uint64
	cold  uint64
}

type bucket struct {
	le    float64
	count uint64
}

const (
	sampleEvery  = 5 * time.Second
	admitWindow  = time.Minute
	sampleMaxAge = 10 * time.Minute
)

func (a *admitSampler) latency(now time.Time) *AdmitLatency {
	if a.gatherer == nil {
		return nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if n := len(a.samples); n == 0 || now.Sub(a.samples[n-1].at) >= sampleEvery {
		if s, ok := a.gather(now); ok {
			a.samples = append(a.samples, s)
		}
	}
	for len(a.samples) > 1 && now.Sub(a.samples[0].at) > sampleMaxAge {
		a.samples = a.samples[1:]
	}
	if len(a.samples) == 0 {
		return nil
	}
	cur := a.samples[len(a.samples)-1]
	// The newest sample at least a window old, else the oldest there is
	// (the first minute after start: since start).
	base := admitSample{at: cur.at}
	for i := len(a.samples) - 2; i >= 0; i-- {
		base = a.samples[i]
		if cur.at.Sub(a.samples[i].at) >= admitWindow {
			break
		}
	}
	out := &AdmitLatency{WindowS: math.Round(cur.at.Sub(base.at).Seconds()), Count: cur.count - base.count, Cold: cur.cold - base.cold}
	if len(a.samples) == 1 {
		out.Count, out.Cold = 0, 0
		return out
	}
	diff := make([]bucket, len(cur.warm))
	for i, b := range cur.warm {
		diff[i] = b
		if i < len(base.warm) {
			diff[i].count -= base.warm[i].count
		}
	}
	out.WarmP50, out.WarmP95 = quantile(0.5, diff), quantile(0.95, diff)
	return out
}

// gather reads the admit histogram: warm admits' buckets, and counts of all and cold ones.
func (a *admitSampler) gather(now time.Time) (admitSample, bool) {
	mfs, err := a.gatherer.Gather()
	if err != nil {
		return admitSample{}, false
	}
	s := admitSample{at: now}
	for _, mf := range mfs {
		if mf.GetName() != "orchestrator_admit_duration_seconds" {
			continue
		}
		for _, m := range mf.GetMetric() {
			h := m.GetHistogram()
			outcome := labelValue(m, "outcome")
			s.count += h.GetSampleCount()
			if outcome == "cold" || outcome == "wake" {
				s.cold += h.GetSampleCount()
			}
			if outcome != "warm" {
				continue
			}
			for _, b := range h.GetBucket() {
				s.warm = append(s.warm, bucket{le: b.GetUpperBound(), count: b.GetCumulativeCount()})
			}
			s.warm = append(s.warm, bucket{le: math.Inf(1), count: h.GetSampleCount()})
		}
	}
	return s, true
}

func labelValue(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// quantile estimates the q-quantile in milliseconds from cumulative
// buckets, interpolating linearly inside a bucket (as PromQL's
// histogram_quantile does); nil with no observation.
func quantile(q float64, bs []bucket) *float64 {
	if len(bs) == 0 || bs[len(bs)-1].count == 0 {
		return nil
	}
	total := float64(bs[len(bs)-1].count)
	rank := q * total
	lower, prev := 0.0, 0.0
	for _, b := range bs {
		if float64(b.count) >= rank {
			upper := b.le
			if math.IsInf(upper, 1) {
				upper = lower // above the last bound: say the last bound
			}
			in := float64(b.count) - prev
			v := upper
			if in > 0 {
				v = lower + (upper-lower)*(rank-prev)/in
			}
			ms := math.Round(v*1000*100) / 100
			return &ms
		}
		lower, prev = b.le, float64(b.count)
	}
	return nil
}
