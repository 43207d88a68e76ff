package e2e_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/metrics"
	"github.com/enginefleet/orchestrator/schema"
)

// fleetSource is a metrics.Source bound to a fleet once the fleet exists
// (its metrics are made before it, to be handed to its API and workers).
type fleetSource struct {
	src              atomic.Pointer[schema.MetricsSource]
	portMin, portMax int
}

func (s *fleetSource) MetricsSnapshot(ctx context.Context, _, _ int) (metrics.Snapshot, error) {
	src := s.src.Load()
	if src == nil {
		return metrics.Snapshot{}, errors.New("no fleet yet")
	}
	return src.MetricsSnapshot(ctx, s.portMin, s.portMax)
}

// scrape reads a metrics listener's /metrics in the exposition format.
type scrape map[string]*dto.MetricFamily

func scrapeMetrics(t *testing.T, url string) scrape {
	t.Helper()
	res, err := http.Get(url)
	require.NoError(t, err)
	defer res.Body.Close()
	require.Equal(t, http.StatusOK, res.StatusCode)
	require.True(t, strings.HasPrefix(res.Header.Get("Content-Type"), "text/plain"), res.Header.Get("Content-Type"))
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(res.Body)
	require.NoError(t, err)
	return mfs
}

// get returns the sample of name whose labels include want: a counter's
// or gauge's value, a histogram's count; 0 when there is none.
func (s scrape) get(name string, want map[string]string) float64 {
	m := testenv.MatchMetric(s[name], want)
	switch {
	case m == nil:
		return 0
	case m.Counter != nil:
		return m.GetCounter().GetValue()
	case m.Gauge != nil:
		return m.GetGauge().GetValue()
	case m.Histogram != nil:
		return float64(m.GetHistogram().GetSampleCount())
	}
	return 0
}

// After a scripted sequence (provision, warm/denied/cold admits, a crash,
// a restart, a destroy) a scrape of the metrics listener shows exactly
// the expected counter deltas and histogram counts, and the fleet gauges
// read from Postgres.
func TestPrometheusMetricsAfterScriptedSequence(t *testing.T) {
	t.Parallel()
	src := &fleetSource{}
	f := newFleet(t, fleetOpts{metrics: &metrics.Config{Source: src, CacheFor: 50 * time.Millisecond, PortMin: 1, PortMax: 40},
		events: true, bootTimeout: 20 * time.Second})
	src.portMin, src.portMax = f.PortMin, f.PortMax
	src.src.Store(schema.NewMetricsSource(f.Pool))
	metricsURL := f.MetricsURL

	_, key := f.product("acme", orch.Policy{})
	waitCatchUp(t, f.Pool, time.Time{})
	before := scrapeMetrics(t, metricsURL)

	r := f.call("POST", "/engines/provision", key, map[string]any{"user_id": "u1"})
	require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
	u1Key := r.str("api_key")
	r = f.call("POST", "/engines/u1/admit", key, nil)
	require.Equal(t, true, r.Body["admitted"], "warm: %v", r.Body)
	r = f.call("POST", "/engines/nobody/admit", key, nil)
	require.Equal(t, "engine_not_found", r.Body["reason"], "denied: %v", r.Body)
	r = f.call("POST", "/engines/u2/admit", key, map[string]any{"auto_provision": true})
	require.Equal(t, true, r.Body["admitted"], "cold: %v", r.Body)

	// Crash: the engine process dies; the backend's event stream reports
	// it and the engine goes failed (auto-restart is off in this fleet).
	require.NoError(t, syscall.Kill(pidOf(t, engineRef{Key: u1Key}), syscall.SIGKILL))
	require.Eventually(t, func() bool {
		return f.call("GET", "/engines/u1", key, nil).str("status") == "failed"
	}, 15*time.Second, 50*time.Millisecond, "crash detected")
	r = f.call("POST", "/engines/u1/restart", key, nil)
	require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
	require.Equal(t, "running", f.call("GET", "/engines/u1", key, nil).str("status"))
	r = f.call("DELETE", "/engines/u2", key, nil)
	require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)

	// Workers record a job's metrics after committing its outcome (which
	// is what answered the request): scrape until the last job's are in.
	after := scrapeMetrics(t, metricsURL)
	delta := func(name string, labels map[string]string) float64 {
		return after.get(name, labels) - before.get(name, labels)
	}
	require.Eventually(t, func() bool {
		after = scrapeMetrics(t, metricsURL)
		return delta("orchestrator_job_duration_seconds", map[string]string{"kind": "engine_destroy", "outcome": "completed"}) >= 1 &&
			delta("orchestrator_http_request_duration_seconds", map[string]string{"method": "DELETE", "route": "/engines/{user_id}", "code": "200"}) >= 1
	}, 10*time.Second, 50*time.Millisecond)
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"orchestrator_engine_provisions_total", map[string]string{"outcome": "succeeded"}, 2},
		{"orchestrator_engine_provisions_total", map[string]string{"outcome": "failed"}, 0},
		{"orchestrator_engine_destroys_total", nil, 1},
		{"orchestrator_engine_restarts_total", map[string]string{"trigger": "manual", "outcome": "succeeded"}, 1},
		{"orchestrator_engine_restarts_total", map[string]string{"trigger": "auto", "outcome": "succeeded"}, 0},
		{"orchestrator_engine_crashes_total", map[string]string{"reason": "crash"}, 1},
		{"orchestrator_engine_crashes_total", map[string]string{"reason": "health"}, 0},
		{"orchestrator_engine_boot_duration_seconds", map[string]string{"operation": "provision"}, 2},
		{"orchestrator_engine_boot_duration_seconds", map[string]string{"operation": "restart"}, 1},
		{"orchestrator_admit_duration_seconds", map[string]string{"outcome": "warm"}, 1},
		{"orchestrator_admit_duration_seconds", map[string]string{"outcome": "cold"}, 1},
		{"orchestrator_admit_duration_seconds", map[string]string{"outcome": "denied"}, 1},
		{"orchestrator_admit_duration_seconds", map[string]string{"outcome": "wake"}, 0},
		{"orchestrator_admit_duration_seconds", map[string]string{"outcome": "error"}, 0},
		{"orchestrator_job_duration_seconds", map[string]string{"kind": "engine_provision", "outcome": "completed"}, 2},
		{"orchestrator_job_duration_seconds", map[string]string{"kind": "engine_restart", "outcome": "completed"}, 1},
		{"orchestrator_job_duration_seconds", map[string]string{"kind": "engine_destroy", "outcome": "completed"}, 1},
		{"orchestrator_http_request_duration_seconds", map[string]string{"method": "POST", "route": "/engines/{user_id}/admit", "code": "200"}, 3},
		{"orchestrator_http_request_duration_seconds", map[string]string{"method": "DELETE", "route": "/engines/{user_id}", "code": "200"}, 1},
	} {
		require.Equal(t, c.want, delta(c.name, c.labels), "%s%v", c.name, c.labels)
	}
	require.GreaterOrEqual(t, delta("orchestrator_job_duration_seconds", map[string]string{"kind": "engine_runtime_event", "outcome": "completed"}), 1.0,
		"the crash check ran as a job")

	// Fleet gauges, from Postgres.
	require.Equal(t, 1.0, after.get("orchestrator_engines", map[string]string{"product": "acme", "state": "running"}))
	require.Equal(t, 0.0, after.get("orchestrator_engines", map[string]string{"product": "acme", "state": "failed"}))
	require.NotNil(t, after["orchestrator_engines"])
	require.Len(t, after["orchestrator_engines"].GetMetric(), len(orch.States), "every state of the product, zeros included")
	require.Equal(t, 1.0, after.get("orchestrator_port_range_used", map[string]string{"node": f.Node}))
	require.InDelta(t, 1.0/40, after.get("orchestrator_port_range_usage_ratio", map[string]string{"node": f.Node}), 1e-9)
	require.Equal(t, 1.0, after.get("orchestrator_ready", nil))
	require.Equal(t, 1.0, after.get("orchestrator_postgres_up", nil))
	require.Positive(t, after.get("orchestrator_audit_log_size_bytes", nil))
	require.NotNil(t, after["orchestrator_backup_oldest_age_seconds"], "the backups table exists: the age is reported")

	// The API's own GET /metrics is the products' JSON, not this.
	r = f.call("GET", "/metrics", key, nil)
	require.Equal(t, http.StatusOK, r.Status)
	require.EqualValues(t, 2, r.Body["provisions_1h"])
	r = do(t, "GET", f.URL+"/metrics", nil, nil)
	require.Equal(t, http.StatusUnauthorized, r.Status)
	require.Equal(t, "INVALID_PLATFORM_KEY", r.code())
}

// The real binary: Prometheus metrics on ORCH_METRICS_ADDR, a listener of
// their own (not the API's, whose /metrics is the products' JSON and which
// serves the River UI); request and job log lines carry what operators
// filter on, and never a key.
func TestServeMetricsListener(t *testing.T) {
	t.Parallel()
	metricsAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	pf := newProcFleet(t, "ORCH_METRICS_ADDR="+metricsAddr, "ORCH_LOG_FORMAT=json", "ORCH_LOG_LEVEL=info")
	p := pf.start("api,worker")
	metricsURL := "http://" + metricsAddr

	s := scrapeMetrics(t, metricsURL+"/metrics")
	require.Equal(t, 1.0, s.get("orchestrator_ready", nil))
	require.Equal(t, 1.0, s.get("orchestrator_postgres_up", nil))
	require.Equal(t, 1.0, s.get("orchestrator_build_info", nil))
	require.Equal(t, 0.0, s.get("orchestrator_scheduler_leader", nil), "no scheduler role here")
	require.NotNil(t, s["go_goroutines"])
	for _, path := range []string{"/health", "/engines", "/admin/jobs/", "/"} {
		res, err := http.Get(metricsURL + path)
		require.NoError(t, err)
		res.Body.Close()
		require.Equal(t, http.StatusNotFound, res.StatusCode, "metrics listener %s", path)
	}
	r := do(t, "GET", p.url()+"/metrics", nil, nil)
	require.Equal(t, http.StatusUnauthorized, r.Status, "the API's /metrics is the product contract")
	require.Equal(t, "INVALID_PLATFORM_KEY", r.code())
	req, err := http.NewRequest("GET", p.url()+"/admin/jobs/", nil)
	require.NoError(t, err)
	req.SetBasicAuth("admin", adminKey)
	res, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	page, _ := io.ReadAll(res.Body)
	res.Body.Close()
	require.Equal(t, http.StatusOK, res.StatusCode)
	require.Contains(t, string(page), "<title>River</title>")

	key := pf.register(p, "acme")
	r = do(t, "POST", p.url()+"/engines/log-user/admit", map[string]any{"auto_provision": true}, map[string]string{"X-Platform-Key": key})
	require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
	engineKey := r.str("engine", "api_key")
	require.NotEmpty(t, engineKey)
	require.Eventually(t, func() bool { // recorded just after the answer
		s = scrapeMetrics(t, metricsURL+"/metrics")
		return s.get("orchestrator_admit_duration_seconds", map[string]string{"outcome": "cold"}) == 1 &&
			s.get("orchestrator_engine_provisions_total", map[string]string{"outcome": "succeeded"}) == 1
	}, 10*time.Second, 50*time.Millisecond)
	require.Equal(t, 1.0, s.get("orchestrator_admit_duration_seconds", map[string]string{"outcome": "cold"}))
	require.Equal(t, 1.0, s.get("orchestrator_engine_provisions_total", map[string]string{"outcome": "succeeded"}))
	require.Equal(t, 1.0, s.get("orchestrator_engine_boot_duration_seconds", map[string]string{"operation": "provision"}))
	require.NoError(t, p.stop(t))

	// One JSON line per request and per job, with their fields.
	lf, err := os.Open(pf.logPath)
	require.NoError(t, err)
	defer lf.Close()
	var request, job, listening bool
	sc := bufio.NewScanner(lf)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		require.NotContains(t, line, key, "a platform key in the logs")
		require.NotContains(t, line, engineKey, "an engine key in the logs")
		switch {
		case strings.Contains(line, `"msg":"request"`) && strings.Contains(line, `"route":"/engines/{user_id}/admit"`):
			request = true
			for _, f := range []string{`"method":"POST"`, `"status":200`, `"duration_ms":`, `"request_id":"`, `"product":"acme"`} {
				require.Contains(t, line, f, line)
			}
		case strings.Contains(line, `"msg":"job"`) && strings.Contains(line, `"job_kind":"engine_provision"`):
			job = true
			for _, f := range []string{`"engine_id":"`, `"attempt":1`, `"duration_ms":`, `"outcome":"succeeded"`} {
				require.Contains(t, line, f, line)
			}
		case strings.Contains(line, `"msg":"metrics listening"`):
			listening = true
			require.Contains(t, line, metricsAddr)
		}
	}
	require.NoError(t, sc.Err())
	require.True(t, request, "a request line for the admit")
	require.True(t, job, "a job line for the provision")
	require.True(t, listening, "the metrics listener is logged")
}
