package api_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/api"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/lifecycle"
	"github.com/enginefleet/orchestrator/webhooks"
)

const testAdminKey = "test-admin-key-0123456789"

// harness is one API replica on a fresh database, served over real HTTP.
type harness struct {
	t       *testing.T
	URL     string
	DBURL   string
	Pool    *pgxpool.Pool
	Keyring *keys.Keyring
	Server  replica
}

func testConfig() api.Config {
	return api.Config{AdminKey: testAdminKey, PortMin: 20000, PortMax: 20999}
}

// testCoreConfig is the lifecycle core under the tests' API replicas.
func testCoreConfig() lifecycle.Config {
	return lifecycle.Config{DefaultImage: "enginefleet/engine:test", PortMin: 20000, PortMax: 20999,
		BootTimeout: 5 * time.Second, URLTemplate: "http://127.0.0.1:{port}"}
}

// replica is an API replica and the lifecycle core it runs on, as
// cmd/orchestrator wires them: Run runs both.
type replica struct {
	*api.Server
	Core *lifecycle.Core
}

func (r replica) Run(ctx context.Context) {
	go r.Server.Run(ctx)
	r.Core.Run(ctx)
}

// newAPI builds a replica on the test core configuration (cc, when
// given, replaces it).
func newAPI(cfg api.Config, pool *pgxpool.Pool, rc *river.Client[pgx.Tx], kr *keys.Keyring, log *slog.Logger, cc ...lifecycle.Config) replica {
	c := testCoreConfig()
	if len(cc) > 0 {
		c = cc[0]
	}
	core := lifecycle.New(c, pool, rc, kr, log)
	if cfg.Webhooks == nil {
		// As server wires it, with the default destination policy.
		cfg.Webhooks = webhooks.NewEndpoints(webhooks.Policy{}, pool, kr)
	}
	return replica{Server: api.New(cfg, core, pool, rc, log), Core: core}
}

// newHarness starts an API on a fresh database. Pass a dbURL to share one
// database between replicas ("" = new database).
func newHarness(t *testing.T, dbURL string, cfg api.Config) *harness {
	t.Helper()
	if dbURL == "" {
		dbURL = testenv.DB(t)
	}
	if cfg.UndocumentedError == nil {
		// Every error a test provokes must be one openapi.yaml documents
		// for its operation.
		cfg.UndocumentedError = func(op string, status int, code string) {
			t.Errorf("%s answered %d %s, which openapi.yaml does not document for it: declare it (api/codes.go)", op, status, code)
		}
	}
	pool := testenv.Pool(t, dbURL)
	rc, err := river.NewClient(riverpgxv5.New(pool), &river.Config{})
	require.NoError(t, err)
	kr, err := keys.NewKeyring(keys.GenerateMasterKey(), nil)
	require.NoError(t, err)
	srv := newAPI(cfg, pool, rc, kr, testenv.Quiet())
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go srv.Run(ctx)
	ts := httptest.NewServer(srv.Handler())
	t.Cleanup(ts.Close)
	return &harness{t: t, URL: ts.URL, DBURL: dbURL, Pool: pool, Keyring: kr, Server: srv}
}

// do sends a JSON request with headers and returns status, decoded body and headers.
func (h *harness) do(method, path string, body any, headers map[string]string) (int, map[string]any, http.Header) {
	h.t.Helper()
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		r = strings.NewReader(b)
	default:
		buf, err := json.Marshal(b)
		require.NoError(h.t, err)
		r = bytes.NewReader(buf)
	}
	req, err := http.NewRequest(method, h.URL+path, r)
	require.NoError(h.t, err)
	if r != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(h.t, err)
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	require.NoError(h.t, err)
	var out map[string]any
	if len(raw) > 0 {
		require.NoError(h.t, json.Unmarshal(raw, &out), "body: %s", raw)
	}
	return resp.StatusCode, out, resp.Header
}

func admin() map[string]string              { return map[string]string{"X-Admin-Key": testAdminKey} }
func platform(key string) map[string]string { return map[string]string{"X-Platform-Key": key} }

// errCode returns the envelope's error code.
func errCode(body map[string]any) string {
	e, _ := body["error"].(map[string]any)
	c, _ := e["code"].(string)
	return c
}
