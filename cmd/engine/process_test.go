package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/refengine"
)

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	return ln.Addr().String()
}

// TestProcessDrainsOnSIGTERM runs the real binary (as the subprocess
// backend does), sends SIGTERM during a streaming /execute and expects the
// turn to finish, the process to exit 0 and its logs to be JSON without
// the key.
func TestProcessDrainsOnSIGTERM(t *testing.T) {
	bin := testenv.EngineBinary(t)
	dir := t.TempDir()
	addr := freeAddr(t)
	cmd := exec.Command(bin)
	cmd.Env = []string{
		"ENGINE_KEY_HASH=" + hash,
		"SQLITE_DB_PATH=" + filepath.Join(dir, "data", "brain.sqlite"),
		"CATALOG_DIR=" + filepath.Join(dir, "catalog"),
		"ENGINE_LISTEN_ADDR=" + addr,
		"ENGINE_TOKEN_DELAY_MS=30",
	}
	var logs testenv.SyncBuffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	require.NoError(t, cmd.Start())
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		if t.Failed() {
			t.Logf("engine logs:\n%s", logs.String())
		}
	})

	base := "http://" + addr
	require.Eventually(t, func() bool {
		resp, err := http.Get(base + "/health")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, 10*time.Second, 20*time.Millisecond)

	req, err := http.NewRequest("POST", base+"/execute", strings.NewReader(`{"input":"tell me a long story please"}`))
	require.NoError(t, err)
	req.Header.Set(refengine.HeaderEngineKey, "secret")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)

	sc := bufio.NewScanner(resp.Body)
	var events []string
	signalled := false
	for sc.Scan() {
		line := sc.Text()
		if ev, ok := strings.CutPrefix(line, "event: "); ok {
			events = append(events, ev)
			if ev == "token" && !signalled {
				require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
				signalled = true
			}
		}
	}
	require.True(t, signalled)
	require.NotEmpty(t, events)
	assert.Equal(t, "done", events[len(events)-1], "the in-flight turn finished: %v", events)

	select {
	case err := <-exited:
		require.NoError(t, err, "exit status after SIGTERM")
	case <-time.After(10 * time.Second):
		t.Fatal("engine did not exit after SIGTERM")
	}
	out := logs.String()
	assert.NotContains(t, out, "secret")
	assert.NotContains(t, out, hash)
	var msgs []string
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		var rec map[string]any
		require.NoError(t, json.Unmarshal([]byte(line), &rec), "log line is not JSON: %q", line)
		msgs = append(msgs, fmt.Sprint(rec["msg"]))
	}
	assert.Contains(t, msgs, "shutting down")
	assert.Contains(t, msgs, "engine stopped")
}
