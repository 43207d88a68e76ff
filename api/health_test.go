package api_test

import (
	"io"
	"net/http"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/internal/testenv"
)

func TestHealthOK(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", testConfig())
	status, body, _ := h.do("GET", "/health", nil, nil)
	require.Equal(t, http.StatusOK, status)
	require.Equal(t, map[string]any{"status": "ok"}, body)
}

func TestHealthMigrationsMissing(t *testing.T) {
	t.Parallel()
	h := newHarness(t, testenv.EmptyDB(t), testConfig())
	status, body, _ := h.do("GET", "/health", nil, nil)
	require.Equal(t, http.StatusServiceUnavailable, status)
	require.Equal(t, "unavailable", body["status"])
	require.Equal(t, "migrations not applied", body["reason"])
}

func TestHealthPostgresUnreachable(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", testConfig())
	h.Pool.Close() // the database is gone for this replica
	status, body, _ := h.do("GET", "/health", nil, nil)
	require.Equal(t, http.StatusServiceUnavailable, status)
	require.Equal(t, "postgres unreachable", body["reason"])
}

func TestUnknownRouteEnvelope(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", testConfig())
	status, body, _ := h.do("GET", "/nope", nil, nil)
	require.Equal(t, http.StatusNotFound, status)
	require.Equal(t, "NOT_FOUND", errCode(body))

	// A known path under a method it does not serve: 405 with Allow.
	status, body, hdr := h.do("PUT", "/engines", nil, nil)
	require.Equal(t, http.StatusMethodNotAllowed, status, "%v", body)
	require.Equal(t, "METHOD_NOT_ALLOWED", errCode(body))
	require.Equal(t, "GET", hdr.Get("Allow"))
	status, _, hdr = h.do("GET", "/engines/ann/admit", nil, nil)
	require.Equal(t, http.StatusMethodNotAllowed, status)
	require.Equal(t, "POST", hdr.Get("Allow"))
	status, _, hdr = h.do("PATCH", "/engines/ann", nil, nil)
	require.Equal(t, http.StatusMethodNotAllowed, status)
	require.Equal(t, "GET, DELETE", hdr.Get("Allow"))
}

// The served OpenAPI document is the generated one, without a key.
func TestServesOpenAPIDocument(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", testConfig())
	res, err := http.Get(h.URL + "/openapi.yaml")
	require.NoError(t, err)
	defer res.Body.Close()
	require.Equal(t, http.StatusOK, res.StatusCode)
	b, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	require.Contains(t, string(b), "openapi: 3.1.0")
	require.Contains(t, string(b), "/engines/{user_id}/admit")
}
