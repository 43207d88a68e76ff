package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/enginefleet/orchestrator/backend/docker/dockertest"
	"github.com/enginefleet/orchestrator/internal/testenv"

	"github.com/moby/moby/api/pkg/stdcopy"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/mount"
	"github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/refengine"
)

// Labels of what this test creates in Docker, so a later run can remove
// what a killed run left behind without touching other tests' objects.
const (
	labelOwner = "orchestrator.test.owner"
	labelPID   = "orchestrator.test.pid"
	ownerName  = "cmd/engine"
)

// TestEngineImageInProductionMode runs the engine image the way the
// orchestrator does in production (read-only root, tmpfs /tmp, no
// capabilities, no-new-privileges, named volume at /data, port on
// 127.0.0.1) and checks the contract end to end, including a brain moved
// byte for byte into a second container and a clean SIGTERM stop.
func TestEngineImageInProductionMode(t *testing.T) {
	cli := dockertest.RequireDocker(t)
	ref := dockertest.EngineImage(t, "test")
	ctx := context.Background()

	img, err := cli.ImageInspect(ctx, ref)
	require.NoError(t, err)
	assert.Less(t, img.Size, int64(30<<20), "image size %d bytes", img.Size)
	t.Logf("image %s: %.1f MB", ref, float64(img.Size)/1e6)

	removeStale(t, cli)
	const key = "container-test-engine-key"
	sum := sha256.Sum256([]byte(key))
	hash := hex.EncodeToString(sum[:])
	run := fmt.Sprintf("%d-%d", os.Getpid(), time.Now().UnixNano())

	a := startEngine(t, cli, ref, "engine-test-a-"+run, hash)
	b := startEngine(t, cli, ref, "engine-test-b-"+run, hash)

	// /health answers without a key.
	status, body := a.do(t, "GET", "/health", "", nil)
	require.Equal(t, http.StatusOK, status, "%s", body)
	var h refengine.HealthResponse
	require.NoError(t, json.Unmarshal(body, &h))
	assert.Equal(t, "ok", h.Status)
	assert.Equal(t, "test", h.Version)
	assert.Equal(t, map[string]string{"database": "ok", "catalog": "absent"}, h.Subsystems)

	// Keys.
	status, body = a.do(t, "GET", "/memories", "", nil)
	assert.Equal(t, http.StatusUnauthorized, status, "%s", body)
	status, body = a.do(t, "GET", "/memories", "wrong-key", nil)
	assert.Equal(t, http.StatusUnauthorized, status, "%s", body)
	assert.Contains(t, string(body), refengine.CodeInvalidEngineKey)
	status, body = a.do(t, "GET", "/memories", key, nil)
	assert.Equal(t, http.StatusOK, status, "%s", body)

	// Memories, with content that stresses the encoding.
	for i := 0; i < 25; i++ {
		m := refengine.AddMemoryRequest{Content: fmt.Sprintf("memory %d: café 日本 😀 \"q\" <tag> \\ %d", i, i*i), Tags: []string{"n" + strconv.Itoa(i%3)}}
		status, body = a.do(t, "POST", "/memories", key, m)
		require.Equal(t, http.StatusCreated, status, "%s", body)
	}
	status, body = a.do(t, "POST", "/execute", key, refengine.ExecuteRequest{Input: "what about memory 7?"})
	require.Equal(t, http.StatusOK, status, "%s", body)
	assert.Contains(t, string(body), "event: done")

	status, export1 := a.do(t, "GET", "/memory/export", key, nil)
	require.Equal(t, http.StatusOK, status, "%s", export1)
	var bundle refengine.Bundle
	require.NoError(t, json.Unmarshal(export1, &bundle))
	require.Len(t, bundle.Memories, 26)

	// Into a second container and out again: byte-identical.
	status, body = b.do(t, "POST", "/memory/import", key, export1)
	require.Equal(t, http.StatusOK, status, "%s", body)
	status, export2 := b.do(t, "GET", "/memory/export", key, nil)
	require.Equal(t, http.StatusOK, status)
	assert.Equal(t, string(export1), string(export2), "export → import → export is byte-identical")

	// The unhealthy switch survives a restart of the container; so does the brain.
	status, body = a.do(t, "PUT", "/debug/health", key, map[string]bool{"healthy": false})
	require.Equal(t, http.StatusOK, status, "%s", body)

	// SIGTERM: a quick, clean exit.
	began := time.Now()
	timeout := 20
	_, err = cli.ContainerStop(ctx, a.id, client.ContainerStopOptions{Timeout: &timeout})
	require.NoError(t, err)
	stopTook := time.Since(began)
	info, err := cli.ContainerInspect(ctx, a.id, client.ContainerInspectOptions{})
	require.NoError(t, err)
	assert.Equal(t, container.StateExited, info.Container.State.Status)
	assert.Equal(t, 0, info.Container.State.ExitCode, "exit code after SIGTERM")
	// Exit code 0 says it was the SIGTERM, not the SIGKILL 20 s later, that
	// ended it; the bound only says it did not linger (generous: a busy CI).
	assert.Less(t, stopTook, 15*time.Second, "stop took %s", stopTook)
	t.Logf("SIGTERM stop took %s", stopTook.Round(time.Millisecond))

	logs := a.logs(t)
	assert.NotContains(t, logs, key, "the key is never logged")
	assert.NotContains(t, logs, hash, "the key hash is never logged")
	for _, line := range strings.Split(strings.TrimSpace(logs), "\n") {
		assert.True(t, json.Valid([]byte(line)), "log line is not JSON: %q", line)
	}
	assert.Contains(t, logs, `"msg":"engine stopped"`)

	a.start(t)
	status, body = a.do(t, "GET", "/health", "", nil)
	assert.Equal(t, http.StatusServiceUnavailable, status, "%s", body)
	assert.Contains(t, string(body), `"status":"unhealthy"`)
	status, export3 := a.do(t, "GET", "/memory/export", key, nil)
	require.Equal(t, http.StatusOK, status)
	assert.Equal(t, string(export1), string(export3), "the brain survived the restart")
	status, body = a.do(t, "PUT", "/debug/health", key, map[string]bool{"healthy": true})
	require.Equal(t, http.StatusOK, status, "%s", body)
	status, _ = a.do(t, "GET", "/health", "", nil)
	assert.Equal(t, http.StatusOK, status)
}

// engineContainer is one running engine container of the test.
type engineContainer struct {
	cli  *client.Client
	id   string
	name string
	url  string
}

func testLabels() map[string]string {
	return map[string]string{
		dockertest.LabelTest: "true",
		labelOwner:           ownerName,
		labelPID:             strconv.Itoa(os.Getpid()),
	}
}

// startEngine creates a volume and a container with the production flags
// and waits for /health to answer.
func startEngine(t *testing.T, cli *client.Client, image, name, keyHash string) *engineContainer {
	t.Helper()
	ctx := context.Background()
	vol := name + "-data"
	_, err := cli.VolumeCreate(ctx, client.VolumeCreateOptions{Name: vol, Labels: testLabels()})
	require.NoError(t, err)
	t.Cleanup(func() {
		cli.VolumeRemove(context.Background(), vol, client.VolumeRemoveOptions{Force: true})
	})
	port := network.MustParsePort("8000/tcp")
	res, err := cli.ContainerCreate(ctx, client.ContainerCreateOptions{
		Name: name,
		Config: &container.Config{
			Image:        image,
			Env:          []string{"ENGINE_KEY_HASH=" + keyHash, "SQLITE_DB_PATH=/data/brain.sqlite", "CATALOG_DIR=/catalog"},
			ExposedPorts: network.PortSet{port: {}},
			Labels:       testLabels(),
		},
		HostConfig: &container.HostConfig{
			ReadonlyRootfs: true,
			Tmpfs:          map[string]string{"/tmp": "rw,noexec,nosuid,size=16m"},
			CapDrop:        []string{"ALL"},
			SecurityOpt:    []string{"no-new-privileges"},
			Mounts:         []mount.Mount{{Type: mount.TypeVolume, Source: vol, Target: "/data"}},
			PortBindings: network.PortMap{port: {{
				HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: "", // a free port, chosen by Docker
			}}},
		},
	})
	require.NoError(t, err)
	c := &engineContainer{cli: cli, id: res.ID, name: name}
	// Registered after the volume's cleanup, so it runs first.
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("logs of %s:\n%s", name, c.logs(t))
		}
		cli.ContainerRemove(context.Background(), c.id, client.ContainerRemoveOptions{Force: true})
	})
	c.start(t)
	return c
}

// start starts the container, finds its published port and waits until
// /health answers (any status: unhealthy is a valid answer).
func (c *engineContainer) start(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	_, err := c.cli.ContainerStart(ctx, c.id, client.ContainerStartOptions{})
	require.NoError(t, err)
	info, err := c.cli.ContainerInspect(ctx, c.id, client.ContainerInspectOptions{})
	require.NoError(t, err)
	bindings := info.Container.NetworkSettings.Ports[network.MustParsePort("8000/tcp")]
	require.NotEmpty(t, bindings, "port 8000 is not published")
	assert.Equal(t, "127.0.0.1", bindings[0].HostIP.String())
	c.url = "http://127.0.0.1:" + bindings[0].HostPort
	err = testenv.Poll(30*time.Second, func() error {
		resp, err := http.Get(c.url + "/health")
		if err == nil {
			resp.Body.Close()
		}
		return err
	})
	if err != nil {
		t.Fatalf("engine %s did not answer /health within 30s: %v\nlogs:\n%s", c.name, err, c.logs(t))
	}
}

func (c *engineContainer) do(t *testing.T, method, path, key string, body any) (int, []byte) {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case []byte:
		rd = bytes.NewReader(b)
	default:
		j, err := json.Marshal(b)
		require.NoError(t, err)
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, c.url+path, rd)
	require.NoError(t, err)
	if key != "" {
		req.Header.Set(refengine.HeaderEngineKey, key)
	}
	client := &http.Client{Timeout: 30 * time.Second}
	resp, err := client.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, out
}

func (c *engineContainer) logs(t *testing.T) string {
	rc, err := c.cli.ContainerLogs(context.Background(), c.id, client.ContainerLogsOptions{ShowStdout: true, ShowStderr: true})
	if err != nil {
		return "(no logs: " + err.Error() + ")"
	}
	defer rc.Close()
	var out bytes.Buffer
	stdcopy.StdCopy(&out, &out, rc)
	return out.String()
}

// removeStale removes the containers and volumes this test left behind in
// runs that were killed: those whose test process is gone, or older than
// an hour. Other tests' objects carry another owner label and are left alone.
func removeStale(t *testing.T, cli *client.Client) {
	t.Helper()
	ctx := context.Background()
	filter := make(client.Filters).Add("label", labelOwner+"="+ownerName)
	cs, err := cli.ContainerList(ctx, client.ContainerListOptions{All: true, Filters: filter})
	require.NoError(t, err)
	for _, c := range cs.Items {
		if stale(c.Labels, time.Unix(c.Created, 0)) {
			t.Logf("removing stale container %v", c.Names)
			cli.ContainerRemove(ctx, c.ID, client.ContainerRemoveOptions{Force: true})
		}
	}
	vs, err := cli.VolumeList(ctx, client.VolumeListOptions{Filters: filter})
	require.NoError(t, err)
	for _, v := range vs.Items {
		created, _ := time.Parse(time.RFC3339, v.CreatedAt)
		if stale(v.Labels, created) {
			t.Logf("removing stale volume %s", v.Name)
			cli.VolumeRemove(ctx, v.Name, client.VolumeRemoveOptions{Force: true})
		}
	}
}

func stale(labels map[string]string, created time.Time) bool {
	if !created.IsZero() && time.Since(created) > time.Hour {
		return true
	}
	pid, err := strconv.Atoi(labels[labelPID])
	if err != nil || pid <= 0 {
		return true
	}
	return errors.Is(syscall.Kill(pid, 0), syscall.ESRCH)
}
