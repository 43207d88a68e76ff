package api_test

import (
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
