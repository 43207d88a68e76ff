package main

import (
	"bufio"
	"bytes"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
)

// rssBytes is a process's resident set size.
func rssBytes(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	require.NoError(t, err)
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			require.NoError(t, err)
			return kb << 10
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// A real `orchestrator serve --roles=api` flooded with random platform
// keys, from random clients behind a trusted proxy (each request a new
// client: every one costs a lookup) and then from one client (throttled),
// keeps its resident memory flat. Run with ORCH_LOADTEST=1 (`make
// loadtest`); ORCH_LOADTEST_BINARY runs another build (e.g. an older one,
// to compare); ORCH_LOADTEST_REQUESTS sets the flood (default 200000).
func TestServeBadAuthFloodRSS(t *testing.T) {
	if os.Getenv("ORCH_LOADTEST") == "" {
		t.Skip("a load test of a real process: ORCH_LOADTEST=1 (make loadtest)")
	}
	n := 200000
	if s := os.Getenv("ORCH_LOADTEST_REQUESTS"); s != "" {
		var err error
		n, err = strconv.Atoi(s)
		require.NoError(t, err)
	}
	bin := os.Getenv("ORCH_LOADTEST_BINARY")
	if bin == "" {
		bin = filepath.Join(t.TempDir(), "orchestrator")
		build := exec.Command("go", "build", "-o", bin, ".")
		out, err := build.CombinedOutput()
		require.NoError(t, err, "%s", out)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	cmd := exec.Command(bin, "serve", "--roles=api")
	cmd.Env = append(os.Environ(), "ORCH_DATABASE_URL="+testenv.DB(t), "ORCH_MASTER_KEY="+keys.GenerateMasterKey(),
		"ORCH_ADMIN_KEY="+keys.Generate(), "ORCH_LISTEN_ADDR="+addr, "ORCH_METRICS_ADDR=off", "ORCH_LOG_LEVEL=error",
		"ORCH_TRUSTED_PROXIES=127.0.0.1")
	var logs testenv.SyncBuffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		cmd.Process.Kill() //nolint:errcheck
		cmd.Wait()         //nolint:errcheck
		if t.Failed() {
			t.Logf("orchestrator logs:\n%s", logs.String())
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
	}, time.Minute, 100*time.Millisecond)

	flood := func(n int, spread bool) map[int]int64 {
		tr := &http.Transport{MaxIdleConnsPerHost: 16}
		defer tr.CloseIdleConnections()
		client := &http.Client{Transport: tr, Timeout: 30 * time.Second}
		var next atomic.Int64
		var mu sync.Mutex
		counts := map[int]int64{}
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				local := map[int]int64{}
				for next.Add(1) <= int64(n) {
					req, _ := http.NewRequest("GET", base+"/engines", nil)
					req.Header.Set("X-Platform-Key", keys.Generate())
					if spread {
						req.Header.Set("X-Forwarded-For", netip.AddrFrom4([4]byte{10, byte(rand.IntN(256)), byte(rand.IntN(256)), byte(rand.IntN(256))}).String())
					}
					resp, err := client.Do(req)
					if err != nil {
						t.Error(err)
						return
					}
					resp.Body.Close()
					local[resp.StatusCode]++
				}
				mu.Lock()
				for k, v := range local {
					counts[k] += v
				}
				mu.Unlock()
			})
		}
		wg.Wait()
		return counts
	}
	pid := cmd.Process.Pid
	start := rssBytes(t, pid)
	flood(20000, true) // warm-up: pools, buffers, the first generations
	before := rssBytes(t, pid)
	began := time.Now()
	spread := flood(n, true)
	mid := rssBytes(t, pid)
	one := flood(n/4, false)
	after := rssBytes(t, pid)
	mb := func(b int64) float64 { return float64(b) / (1 << 20) }
	t.Logf("RSS: %.1f MB at start, %.1f MB after a 20k warm-up, %.1f MB after %d random keys from random clients %v, "+
		"%.1f MB after %d more from one client %v (%s): %+.1f MB",
		mb(start), mb(before), mb(mid), n, spread, mb(after), n/4, one, time.Since(began).Round(time.Second), mb(after-before))
	require.Less(t, after-before, int64(20<<20), "RSS grew by %.1f MB", mb(after-before))
}
