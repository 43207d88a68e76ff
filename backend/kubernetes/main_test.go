package kubernetes_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	orchestrator "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/backend/kubernetes"
	"github.com/enginefleet/orchestrator/internal/kubeenv"
	"github.com/enginefleet/orchestrator/internal/testenv"
)

// One control plane for the package's tests, each in a namespace of its
// own (restricted Pod Security enforced).
func TestMain(m *testing.M) { os.Exit(kubeenv.Run(m)) }

// onKwok places engines on the kwok nodes (their pods run nothing).
func onKwok(c *kubernetes.Config) {
	c.NodeSelector = map[string]string{kubeenv.LabelNodeKind: "kwok"}
	c.Tolerations = []kubernetes.Toleration{{Key: kubeenv.KwokTaintKey, Operator: "Equal", Value: "fake", Effect: "NoSchedule"}}
}

// onAgent places engines on the test node agent's node (their pods run
// the engine binary).
func onAgent(c *kubernetes.Config) {
	c.NodeSelector = map[string]string{kubeenv.LabelNodeKind: "agent"}
	c.Tolerations = []kubernetes.Toleration{{Key: kubeenv.AgentTaintKey, Operator: "Exists", Effect: "NoSchedule"}}
}

type fixture struct {
	env *kubeenv.Env
	ns  string
	b   *kubernetes.Backend
}

// newBackend returns a backend on a namespace and node of its own, with
// engines on the kwok nodes unless mods say otherwise.
func newBackend(t *testing.T, mods ...func(*kubernetes.Config)) *fixture {
	t.Helper()
	env := kubeenv.Require(t)
	ns := env.Namespace(t)
	f := &fixture{env: env, ns: ns}
	f.b = f.backend(t, append([]func(*kubernetes.Config){onKwok}, mods...)...)
	return f
}

// backend returns another backend on f's namespace.
func (f *fixture) backend(t *testing.T, mods ...func(*kubernetes.Config)) *kubernetes.Backend {
	t.Helper()
	cfg := kubernetes.Config{
		RESTConfig:   f.env.Config,
		Namespace:    f.ns,
		Node:         "test-" + randHex(4),
		StorageClass: kubeenv.StorageClass,
		ReplaceGrace: 2 * time.Second,
		StartTimeout: 30 * time.Second,
		Labels:       map[string]string{"orchestrator.test": "true"},
	}
	for _, m := range mods {
		m(&cfg)
	}
	b, err := kubernetes.New(cfg, slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})))
	require.NoError(t, err)
	t.Cleanup(func() { b.Close() })
	return b
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// testEngine is one engine made for a test.
type testEngine struct {
	spec orchestrator.EngineSpec
	key  string
	addr string // podIP:8000 once known (agent engines)
}

func newEngine(t *testing.T, b *kubernetes.Backend, image string) *testEngine {
	t.Helper()
	key := "test-key-" + randHex(16)
	sum := sha256.Sum256([]byte(key))
	e := &testEngine{
		key: key,
		spec: orchestrator.EngineSpec{
			EngineID:  uuid.NewString(),
			ProductID: uuid.NewString(),
			Node:      b.Config().Node,
			Image:     image,
			HostPort:  9000 + int(randByte()),
			Env: map[string]string{
				"ENGINE_KEY_HASH":       hex.EncodeToString(sum[:]),
				"SQLITE_DB_PATH":        "/data/brain.sqlite",
				"CATALOG_DIR":           "/catalog",
				"PROVIDER_API_KEY":      "sk-passthrough-" + randHex(8),
				"ENGINE_LOG_LEVEL":      "warn",
				"ENGINE_TOKEN_DELAY_MS": "0",
			},
		},
	}
	return e
}

func randByte() byte {
	b := make([]byte, 1)
	_, _ = rand.Read(b)
	return b[0]
}

func (e *testEngine) url(path string) string { return "http://" + e.addr + path }

// waitHealthy polls GET /health at the address the backend reports until
// 200 {"status":"ok"}.
func (e *testEngine) waitHealthy(t *testing.T, b *kubernetes.Backend) {
	t.Helper()
	testenv.Await(t, 45*time.Second, "engine "+e.spec.EngineID+" healthy", func() error {
		addr, err := b.Address(t.Context(), e.spec.EngineID)
		require.NoError(t, err)
		if addr == "" {
			return errors.New("no pod address yet")
		}
		require.True(t, strings.HasPrefix(addr, "127."), "agent pods have loopback addresses, got %s", addr)
		e.addr = addr
		return testenv.Healthy(e.url("/health"))
	})
}

func (e *testEngine) do(t *testing.T, method, path string, body any) []byte {
	t.Helper()
	var rd io.Reader
	if body != nil {
		j, err := json.Marshal(body)
		require.NoError(t, err)
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, e.url(path), rd)
	require.NoError(t, err)
	req.Header.Set("X-Engine-Key", e.key)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Less(t, resp.StatusCode, 300, "%s %s: %s", method, path, out)
	return out
}

// eventually waits up to d for cond (testenv.Await for a yes/no condition).
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	testenv.Await(t, d, what, func() error { return testenv.Check(cond(), "not yet") })
}

func bg() context.Context { return context.Background() }
