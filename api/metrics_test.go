package api_test

import (
	"fmt"
	"net/http"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/metrics"
)

// histCount is a histogram's sample count for the series with labels.
func histCount(t *testing.T, g prometheus.Gatherer, name string, labels map[string]string) uint64 {
	t.Helper()
	return testenv.GatherMetric(t, g, name, labels).GetHistogram().GetSampleCount()
}

// Admits that are refused count as denied: admitted:false and 429s alike;
// requests are timed by route pattern, unknown paths as "unmatched".
func TestAdmitAndRequestMetrics(t *testing.T) {
	t.Parallel()
	m := metrics.New(metrics.Config{})
	cfg := testConfig()
	cfg.Metrics = m
	h := newHarness(t, "", cfg)
	st, body, _ := h.do("POST", "/products/register", map[string]any{"slug": "acme", "display_name": "Acme",
		"policy": map[string]any{"rate_limit_rpm": 1}}, admin())
	require.Equal(t, http.StatusOK, st, "%v", body)
	key := body["platform_api_key"].(string)

	// engine_not_found, then RATE_LIMITED (a minute window may roll over
	// between two admits: go on until one is refused).
	admits, limited := 0, 0
	for admits < 4 && limited == 0 {
		st, body, _ = h.do("POST", "/engines/nobody/admit", nil, platform(key))
		admits++
		switch st {
		case http.StatusOK:
			require.Equal(t, false, body["admitted"])
		case http.StatusTooManyRequests:
			limited++
		default:
			t.Fatalf("admit: %d %v", st, body)
		}
	}
	require.Equal(t, 1, limited)
	st, _, _ = h.do("GET", "/no/such/route", nil, nil)
	require.Equal(t, http.StatusNotFound, st)

	g := m.Gatherer()
	require.EqualValues(t, admits, histCount(t, g, "orchestrator_admit_duration_seconds", map[string]string{"outcome": "denied"}))
	require.EqualValues(t, 0, histCount(t, g, "orchestrator_admit_duration_seconds", map[string]string{"outcome": "error"}))
	require.EqualValues(t, 1, histCount(t, g, "orchestrator_http_request_duration_seconds",
		map[string]string{"method": "POST", "route": "/engines/{user_id}/admit", "code": "429"}))
	require.EqualValues(t, 1, histCount(t, g, "orchestrator_http_request_duration_seconds",
		map[string]string{"method": "POST", "route": "/products/register", "code": "200"}))
	require.EqualValues(t, 1, histCount(t, g, "orchestrator_http_request_duration_seconds",
		map[string]string{"method": "GET", "route": "unmatched", "code": "404"}))
}

// However many made-up methods and paths clients send, the request
// histogram keeps a bounded set of series: every label comes from a fixed
// set (methods outside the standard ones are OTHER, unknown paths are
// unmatched).
func TestRequestMetricSeriesBounded(t *testing.T) {
	t.Parallel()
	m := metrics.New(metrics.Config{})
	cfg := testConfig()
	cfg.Metrics = m
	h := newHarness(t, "", cfg)
	series := func() (n int, methods map[string]bool) {
		methods = map[string]bool{}
		mfs, err := m.Gatherer().Gather()
		require.NoError(t, err)
		for _, mf := range mfs {
			if mf.GetName() != "orchestrator_http_request_duration_seconds" {
				continue
			}
			for _, s := range mf.GetMetric() {
				n++
				for _, l := range s.GetLabel() {
					if l.GetName() == "method" {
						methods[l.GetValue()] = true
					}
				}
			}
		}
		return n, methods
	}
	for i := range 300 {
		method := fmt.Sprintf("BOGUS%d", i)
		path := fmt.Sprintf("/made/up/%d", i)
		if i%3 == 0 {
			path = fmt.Sprintf("/engines/user%d", i) // a real route under a made-up method
		}
		req, err := http.NewRequest(method, h.URL+path, nil)
		require.NoError(t, err)
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
	}
	n, methods := series()
	require.LessOrEqual(t, n, 4, "series after 300 made-up methods and paths: %v", methods)
	require.Equal(t, map[string]bool{"OTHER": true}, methods)
	require.EqualValues(t, 200, histCount(t, m.Gatherer(), "orchestrator_http_request_duration_seconds",
		map[string]string{"method": "OTHER", "route": "unmatched", "code": "404"}))
}
