package api_test

import (
	"context"
	"net/http"
	"testing"

	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

// seedProduct registers a product directly and returns its id and key.
func seedProduct(t *testing.T, h *harness, slug string) (string, string) {
	t.Helper()
	key := keys.Generate()
	p, err := schema.New(h.Pool).InsertProduct(context.Background(), slug, slug, orch.Policy{}, keys.Hash(key))
	require.NoError(t, err)
	return p.ID, key
}

// seedEngines inserts n engine rows in a state, for fleet queries.
func seedEngines(t *testing.T, h *harness, productID string, state orch.State, n int, port *int) {
	t.Helper()
	ctx := context.Background()
	for i := 0; i < n; i++ {
		*port++
		_, err := h.Pool.Exec(ctx, `INSERT INTO engines (id, product_id, user_id, status, port, engine_version, engine_key_hash, engine_key_enc)
			VALUES (gen_random_uuid(), $1, $2, $3, $4, 'img', 'h', 'e')`, productID, string(state)+"-"+keys.Generate()[:8], string(state), *port)
		require.NoError(t, err)
	}
}

func TestStatusHealthBoundaries(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", testConfig())
	cases := []struct {
		running, failed int
		health          string
	}{
		{0, 0, "ok"}, {10, 0, "ok"}, {19, 1, "degraded"}, {10, 1, "degraded"}, {9, 1, "critical"}, {0, 3, "critical"},
	}
	port := 20000
	for i, c := range cases {
		pid, key := seedProduct(t, h, "p"+string(rune('a'+i)))
		seedEngines(t, h, pid, orch.StateRunning, c.running, &port)
		seedEngines(t, h, pid, orch.StateFailed, c.failed, &port)
		status, body, _ := h.do("GET", "/status", nil, platform(key))
		require.Equal(t, 200, status)
		require.Equal(t, c.health, body["health"], "running=%d failed=%d", c.running, c.failed)
		require.EqualValues(t, c.running+c.failed, body["total"])
		require.EqualValues(t, c.failed, body["unhealthy_count"])
		require.EqualValues(t, c.running, body["by_status"].(map[string]any)["running"])
	}
}

// /metrics against a hand-built audit history: rows inside and outside
// the hour, other products' rows, and lifetime totals.
func TestMetricsFromAuditLog(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", testConfig())
	ctx := context.Background()
	pid, key := seedProduct(t, h, "mine")
	other, _ := seedProduct(t, h, "other")
	insMeta := func(product, action, ago string, dur *int, meta string) {
		_, err := h.Pool.Exec(ctx, `INSERT INTO audit_log (product_id, action, actor, "timestamp", duration_ms, metadata)
			VALUES ($1, $2, 'system', now() - $3::interval, $4, $5::jsonb)`, product, action, ago, dur, meta)
		require.NoError(t, err)
	}
	ins := func(product, action, ago string, dur *int) { insMeta(product, action, ago, dur, "{}") }
	d := func(n int) *int { return &n }
	ins(pid, "provision", "10 minutes", d(400))
	ins(pid, "provision", "20 minutes", d(600))
	ins(pid, "provision", "2 hours", d(10000)) // outside the hour: total only
	ins(pid, "destroy", "3 hours", nil)
	ins(pid, "health_failed", "5 minutes", nil)
	insMeta(pid, "health_check", "6 minutes", nil, `{"reason": "crash", "recovered_by": "runtime"}`) // Docker restarted it
	insMeta(pid, "health_check", "7 minutes", nil, `{"sampled": true}`)                              // a sampled probe: no crash
	ins(pid, "auto_restart_start", "4 minutes", nil)
	ins(pid, "restart", "3 minutes", nil)
	ins(pid, "restart", "90 minutes", nil)
	ins(other, "provision", "1 minute", d(1))
	ins(other, "health_failed", "1 minute", nil)

	status, body, _ := h.do("GET", "/metrics", nil, platform(key))
	require.Equal(t, 200, status)
	require.Equal(t, map[string]any{"provisions_1h": 2.0, "crashes_1h": 2.0, "restarts_1h": 2.0, "avg_boot_ms": 500.0,
		"total_provisions": 3.0, "total_destroys": 1.0}, body)
}

// A Prometheus pointed at the API's /metrics (the products' JSON) fails its
// scrape with a body that names the right listener; a product's client
// without a key gets the usual answer.
func TestPrometheusScrapeOfAPIMetricsPointsElsewhere(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", testConfig())
	for _, hdr := range []map[string]string{
		{"User-Agent": "Prometheus/3.1.0", "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"},
		{"Accept": "text/plain;version=0.0.4"},
	} {
		status, body, _ := h.do("GET", "/metrics", nil, hdr)
		require.Equal(t, http.StatusUnauthorized, status)
		require.Equal(t, "INVALID_PLATFORM_KEY", errCode(body))
		msg, _ := body["error"].(map[string]any)["message"].(string)
		require.Contains(t, msg, "ORCH_METRICS_ADDR", "headers %v", hdr)
	}
	status, body, _ := h.do("GET", "/metrics", nil, map[string]string{"Accept": "application/json"})
	require.Equal(t, http.StatusUnauthorized, status)
	msg, _ := body["error"].(map[string]any)["message"].(string)
	require.NotContains(t, msg, "ORCH_METRICS_ADDR")
}
