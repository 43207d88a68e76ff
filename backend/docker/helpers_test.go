package docker_test

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/enginefleet/orchestrator/backend/docker/dockertest"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/google/uuid"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/mount"
	"github.com/moby/moby/client"
	"github.com/stretchr/testify/require"

	orchestrator "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/backend/docker"
	"github.com/enginefleet/orchestrator/internal/testenv"
)

// Test objects live on their own network, under node names "test-…" and
// carry orchestrator.test=true, so leftovers of crashed runs can be found.
const (
	testNetwork   = "enginefleet_test_net"
	testLabel     = dockertest.LabelTest
	testNodeStart = "test-"
	staleAfter    = 10 * time.Minute
)

func TestMain(m *testing.M) {
	code := m.Run()
	dockertest.RemoveNetworkIfEmpty(testNetwork)
	dockertest.RemoveNetworkIfEmpty(testNetwork + docker.IsolatedSuffix)
	os.Exit(code)
}

// rawClient is a plain docker client for what the tests check or do
// behind the backend's back (kill, inspect by id).
func rawClient(t testing.TB) *client.Client {
	t.Helper()
	return dockertest.RequireDocker(t)
}

// engineImage is the reference engine's image, built from this checkout.
func engineImage(t testing.TB) string {
	t.Helper()
	return dockertest.EngineImage(t, engineVersion)
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

var staleOnce sync.Once

// newBackend returns a backend on a node of its own, so List sees only
// this test's engines.
func newBackend(t *testing.T, mod ...func(*docker.Config)) *docker.Backend {
	t.Helper()
	dockertest.RequireDocker(t)
	// Engines run under the limits production gets by default, with
	// brains under a data root, as production has them.
	cfg := docker.Config{
		DataRoot:     dataRoot(t),
		HelperImage:  engineImage(t),
		Network:      testNetwork,
		Node:         testNodeStart + randHex(4),
		ReplaceGrace: 2 * time.Second,
		Labels:       map[string]string{testLabel: "true"},
		MemoryMB:     docker.DefaultMemoryMB,
		CPUs:         docker.DefaultCPUs,
		PidsLimit:    docker.DefaultPids,
	}
	for _, f := range mod {
		f(&cfg)
	}
	b, err := docker.New(cfg, slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})))
	require.NoError(t, err)
	t.Cleanup(func() { b.Close() })
	require.NoError(t, b.Ping(t.Context()))
	staleOnce.Do(func() { removeStale(t) })
	return b
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// removeStale removes test containers, volumes and (empty) networks older
// than staleAfter (younger ones may belong to a run in progress).
func removeStale(t *testing.T) {
	ctx := context.Background()
	cli := rawClient(t)
	isTest := func(labels map[string]string) bool {
		return labels[testLabel] == "true" ||
			labels[orchestrator.LabelManaged] == "true" && strings.HasPrefix(labels[orchestrator.LabelNode], testNodeStart)
	}
	cs, err := cli.ContainerList(ctx, client.ContainerListOptions{All: true, Filters: make(client.Filters).Add("label", orchestrator.LabelManaged)})
	require.NoError(t, err)
	for _, c := range cs.Items {
		if isTest(c.Labels) && time.Since(time.Unix(c.Created, 0)) > staleAfter {
			t.Logf("removing stale test container %v", c.Names)
			_, _ = cli.ContainerRemove(ctx, c.ID, client.ContainerRemoveOptions{Force: true})
		}
	}
	nets, err := cli.NetworkList(ctx, client.NetworkListOptions{Filters: make(client.Filters).Add("label", testLabel+"=true")})
	require.NoError(t, err)
	for _, n := range nets.Items {
		if strings.HasPrefix(n.Name, testNetwork) && time.Since(n.Created) > staleAfter {
			dockertest.RemoveNetworkIfEmpty(n.Name)
		}
	}
	vs, err := cli.VolumeList(ctx, client.VolumeListOptions{Filters: make(client.Filters).Add("label", orchestrator.LabelManaged)})
	require.NoError(t, err)
	for _, v := range vs.Items {
		created, err := time.Parse(time.RFC3339, v.CreatedAt)
		if isTest(v.Labels) && err == nil && time.Since(created) > staleAfter {
			t.Logf("removing stale test volume %s", v.Name)
			_, _ = cli.VolumeRemove(ctx, v.Name, client.VolumeRemoveOptions{})
		}
	}
}

// testEngine is one engine made for a test; it is removed with its volume
// when the test ends.
type testEngine struct {
	spec orchestrator.EngineSpec
	key  string
}

func newEngine(t *testing.T, b *docker.Backend, image string) *testEngine {
	t.Helper()
	key := "test-key-" + randHex(16)
	sum := sha256.Sum256([]byte(key))
	e := &testEngine{
		key: key,
		spec: orchestrator.EngineSpec{
			EngineID:  uuid.NewString(),
			ProductID: uuid.NewString(),
			Image:     image,
			HostPort:  freePort(t),
			Env: map[string]string{
				"ENGINE_KEY_HASH": hex.EncodeToString(sum[:]),
				"SQLITE_DB_PATH":  "/data/brain.sqlite",
				"CATALOG_DIR":     "/catalog",
			},
		},
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := b.RemoveContainer(ctx, e.spec.EngineID); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		if err := b.RemoveVolume(ctx, e.spec.EngineID); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return e
}

// freePort returns a port free on 127.0.0.1 right now.
func freePort(t *testing.T) int { return testenv.FreePort(t) }

func (e *testEngine) url(path string) string {
	return fmt.Sprintf("http://127.0.0.1:%d%s", e.spec.HostPort, path)
}

// waitHealthy polls GET /health until 200 {"status":"ok"}.
func (e *testEngine) waitHealthy(t *testing.T) {
	t.Helper()
	testenv.Await(t, 30*time.Second, "engine "+e.spec.EngineID+" healthy", func() error { return testenv.Healthy(e.url("/health")) })
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

func (e *testEngine) addMemory(t *testing.T, content string) {
	t.Helper()
	e.do(t, http.MethodPost, "/memories", map[string]any{"content": content})
}

func (e *testEngine) export(t *testing.T) []byte {
	t.Helper()
	return e.do(t, http.MethodGet, "/memory/export", nil)
}

// containerID is the id of the engine's container, "" when there is none.
func containerID(t *testing.T, cli *client.Client, engineID string) string {
	t.Helper()
	res, err := cli.ContainerInspect(t.Context(), orchestrator.ContainerName(engineID), client.ContainerInspectOptions{})
	if cerrdefs.IsNotFound(err) {
		return ""
	}
	require.NoError(t, err)
	return res.Container.ID
}

// chownVolume rewrites the owner of every file of the engine's volume, and
// of its root, behind the backend's back (as an engine that ran as another
// user would have left them), through a helper container of the test's own.
func chownVolume(t *testing.T, engineID, image string, uid, gid int) {
	t.Helper()
	ctx := t.Context()
	cli := rawClient(t)
	res, err := cli.ContainerCreate(ctx, client.ContainerCreateOptions{
		Name: "engine-test-chown-" + randHex(4),
		Config: &container.Config{Image: image, Entrypoint: []string{"/never-started"},
			Labels: map[string]string{testLabel: "true"}, NetworkDisabled: true},
		HostConfig: &container.HostConfig{NetworkMode: "none", Mounts: []mount.Mount{{Type: mount.TypeVolume,
			Source: orchestrator.VolumeName(engineID), Target: "/data", VolumeOptions: &mount.VolumeOptions{NoCopy: true}}}},
	})
	require.NoError(t, err)
	defer cli.ContainerRemove(context.Background(), res.ID, client.ContainerRemoveOptions{Force: true}) //nolint:errcheck
	src, err := cli.CopyFromContainer(ctx, res.ID, client.CopyFromContainerOptions{SourcePath: "/data"})
	require.NoError(t, err)
	all, err := io.ReadAll(src.Content)
	src.Content.Close()
	require.NoError(t, err)
	var out bytes.Buffer
	tw := tar.NewWriter(&out)
	tr := tar.NewReader(bytes.NewReader(all))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err)
		h.Uid, h.Gid, h.Uname, h.Gname = uid, gid, "", ""
		h.Format = tar.FormatUnknown
		h.PAXRecords = nil
		require.NoError(t, tw.WriteHeader(h))
		_, err = io.Copy(tw, tr)
		require.NoError(t, err)
	}
	require.NoError(t, tw.Close())
	_, err = cli.CopyToContainer(ctx, res.ID, client.CopyToContainerOptions{DestinationPath: "/", Content: &out})
	require.NoError(t, err)
}

// volumeOwners maps every entry of the engine's volume (through its
// container) to its owner "uid:gid".
func volumeOwners(t *testing.T, engineID string) map[string]string {
	t.Helper()
	raw, err := rawClient(t).CopyFromContainer(t.Context(), orchestrator.ContainerName(engineID), client.CopyFromContainerOptions{SourcePath: "/data"})
	require.NoError(t, err)
	defer raw.Content.Close()
	out := map[string]string{}
	tr := tar.NewReader(raw.Content)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		require.NoError(t, err)
		out[h.Name] = fmt.Sprintf("%d:%d", h.Uid, h.Gid)
	}
}
