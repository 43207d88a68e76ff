package api_test

import (
	"context"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
)

// heapInUse is the live heap after a full collection.
func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// badAuthLoad sends n requests with random platform keys, from random
// client addresses when spread (through a trusted proxy's X-Forwarded-For:
// the worst case, every request a new client with a full budget, so each
// one costs a lookup) or from one client. It returns the answers by status.
func badAuthLoad(t *testing.T, base string, n int, spread bool) map[int]int64 {
	t.Helper()
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

// A flood of requests with random platform keys leaves memory flat: unknown
// keys are remembered in a bounded set, throttled clients in bounded maps.
// (Before, every unknown key stayed in the cache for good: 430k requests
// took a process from 27 to 158 MB.)
func TestBadAuthFloodMemoryFlat(t *testing.T) {
	if testing.Short() {
		t.Skip("a load test: 130k requests")
	}
	pool := testenv.Pool(t, testenv.DB(t))
	rc, err := river.NewClient(riverpgxv5.New(pool), &river.Config{})
	require.NoError(t, err)
	kr, err := keys.NewKeyring(keys.GenerateMasterKey(), nil)
	require.NoError(t, err)
	cfg := testConfig()
	cfg.TrustedProxies = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
	srv := newAPI(cfg, pool, rc, kr, testenv.Quiet())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go srv.Run(ctx)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	hs := srv.HTTPServer("")
	go hs.Serve(l) //nolint:errcheck
	defer hs.Close()
	base := "http://" + l.Addr().String()

	// Warm up (connection pools, buffers, the first generations), then measure.
	badAuthLoad(t, base, 20000, true)
	before, goroutines := heapInUse(), runtime.NumGoroutine()
	start := time.Now()
	spread := badAuthLoad(t, base, 100000, true)
	one := badAuthLoad(t, base, 30000, false)
	after := heapInUse()
	growth := int64(after) - int64(before)
	t.Logf("130k bad-key requests in %s: heap in use %.1f MB -> %.1f MB (%+.1f MB); from random clients %v, from one %v; goroutines %d -> %d",
		time.Since(start).Round(time.Millisecond), float64(before)/1e6, float64(after)/1e6, float64(growth)/1e6, spread, one,
		goroutines, runtime.NumGoroutine())
	require.Equal(t, int64(100000), spread[http.StatusUnauthorized]+spread[http.StatusTooManyRequests], "%v", spread)
	require.Greater(t, one[http.StatusTooManyRequests], int64(29000), "one client is throttled: %v", one)
	require.Less(t, growth, int64(20<<20), "heap grew by %.1f MB", float64(growth)/1e6)
	require.Less(t, runtime.NumGoroutine(), goroutines+50)
}
