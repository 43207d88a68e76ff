package e2e_test

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/internal/testenv"
)

// Rolling upgrade drill: two API and two worker processes serve a client
// under load; each is replaced in turn (SIGTERM, drain, start a new one).
// The client — which, like a load balancer, retries a request on the other
// replica only when it could not connect — sees no 5xx and loses no
// operation.
func TestRollingUpgrade(t *testing.T) {
	t.Parallel()
	pf := newProcFleet(t)
	apis := []*proc{pf.start("api"), pf.start("api")}
	workersP := []*proc{pf.start("worker"), pf.start("worker")}
	key := pf.register(apis[0], "acme")

	var mu sync.Mutex
	live := []string{apis[0].url(), apis[1].url()}
	var next atomic.Int64
	pick := func() []string {
		mu.Lock()
		defer mu.Unlock()
		i := int(next.Add(1))
		return []string{live[i%len(live)], live[(i+1)%len(live)]}
	}
	var fivexx, conns, ok atomic.Int64
	var failures sync.Map
	call := func(method, path string, body any, hdr ...string) resp {
		h := map[string]string{"X-Platform-Key": key}
		for i := 0; i+1 < len(hdr); i += 2 {
			h[hdr[i]] = hdr[i+1]
		}
		for attempt := 0; attempt < 20; attempt++ {
			for _, base := range pick() {
				r, err := tryDo(method, base+path, body, h)
				if err != nil {
					conns.Add(1)
					continue // not connected: the request never reached a replica
				}
				if r.Status >= 500 {
					fivexx.Add(1)
					failures.Store(fmt.Sprintf("%s %s → %d %v", method, path, r.Status, r.Body), true)
				}
				return r
			}
			time.Sleep(50 * time.Millisecond) // a client's retry delay, as a load balancer's
		}
		t.Errorf("%s %s: no replica reachable", method, path)
		return resp{}
	}

	stop := make(chan struct{})
	var load sync.WaitGroup
	var ops sync.Map // operation id → user
	for g := 0; g < 6; g++ {
		load.Add(1)
		go func() {
			defer load.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				user := fmt.Sprintf("roll-%d-%d", g, i%8)
				r := call("POST", "/engines/"+user+"/admit", map[string]any{"auto_provision": true})
				if r.Status == 200 && r.Body["admitted"] == true {
					ok.Add(1)
				}
				if i%5 == 0 { // an asynchronous operation that must not be lost
					a := call("POST", "/engines/"+user+"/restart", nil, "Prefer", "respond-async")
					if a.Status == 202 {
						ops.Store(a.str("operation_id"), user)
					}
				}
				time.Sleep(20 * time.Millisecond) // the clients' pace
			}
		}()
	}

	testenv.Await(t, 30*time.Second, "the load is served (20 admits)", func() error {
		return testenv.Check(ok.Load() >= 20, "%d admits", ok.Load())
	})
	replace := func(i int, list []*proc, roles string, isAPI bool) {
		old := list[i]
		if isAPI {
			mu.Lock()
			live = []string{list[1-i].url()} // the load balancer stops routing to it...
			mu.Unlock()
		}
		require.NoError(t, old.stop(t), "%s drains and exits 0", roles) // ...then it drains
		list[i] = pf.start(roles)
		if isAPI {
			mu.Lock()
			live = []string{list[0].url(), list[1].url()}
			mu.Unlock()
		}
		// The load runs a while on the new set before the next
		// replacement: the rolling pace, on purpose.
		time.Sleep(1500 * time.Millisecond)
	}
	replace(0, apis, "api", true)
	replace(0, workersP, "worker", false)
	replace(1, apis, "api", true)
	replace(1, workersP, "worker", false)
	close(stop)
	load.Wait()

	failures.Range(func(k, _ any) bool { t.Error(k); return true })
	require.Zero(t, fivexx.Load(), "no 5xx during the rolling upgrade")
	require.Positive(t, ok.Load())

	// No lost operation: every accepted one finishes (succeeded, or refused
	// as superseded by a later operation on the same engine — never stuck).
	n := 0
	ops.Range(func(k, _ any) bool {
		n++
		id := k.(string)
		require.Eventually(t, func() bool {
			s := call("GET", "/operations/"+id, nil).str("status")
			return s == "succeeded" || s == "failed"
		}, 90*time.Second, 100*time.Millisecond, "operation %s finishes", id)
		o := call("GET", "/operations/"+id, nil)
		if o.str("status") == "failed" {
			require.Equal(t, "OPERATION_IN_PROGRESS", o.str("error_code"), "only supersession may fail an operation: %v", o.Body)
		}
		return true
	})
	t.Logf("rolling upgrade: %d admits ok, %d async operations, %d connection retries, 0 5xx", ok.Load(), n, conns.Load())
}

// tryDo is do without failing the test on a connection error.
func tryDo(method, url string, body any, h map[string]string) (r resp, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("%v", p)
		}
	}()
	ft := &fakeT{}
	r = do(ft, method, url, body, h)
	if ft.err != nil {
		return r, ft.err
	}
	return r, nil
}

// fakeT turns require failures inside do into an error (connection refused).
type fakeT struct {
	testing.TB
	err error
}

func (f *fakeT) Helper() {}
func (f *fakeT) Errorf(format string, args ...any) {
	f.err = fmt.Errorf(format, args...)
}
func (f *fakeT) FailNow() { panic(f.err) }
