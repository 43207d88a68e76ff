package api_test

import (
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/api"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/metrics"
)

// A client that keeps presenting unknown keys is answered 429
// RATE_LIMITED with Retry-After once its failures run out, without a
// database lookup; a valid key from the same client is not slowed; other
// clients (told apart through a trusted proxy's X-Forwarded-For) keep
// their own budget.
func TestFailedAuthThrottled(t *testing.T) {
	t.Parallel()
	qc := &queryCounter{}
	m := metrics.New(metrics.Config{})
	cfg := testConfig()
	cfg.Metrics = m
	cfg.AuthFailuresPerSecond = 1 // burst 4
	cfg.TrustedProxies = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
	h := newReplica(t, "", cfg, replicaOpts{tracer: qc})
	waitListeners(t, h.Pool, 1)
	_, key := h.register("acme", nil)
	status, _, _ := h.do("GET", "/engines", nil, platform(key)) // the cache knows it now
	require.Equal(t, http.StatusOK, status)

	from := func(client string, hdr map[string]string) map[string]string {
		out := map[string]string{"X-Forwarded-For": client}
		for k, v := range hdr {
			out[k] = v
		}
		return out
	}
	const lookup = "api_key_hash = $1"
	before := qc.count(lookup)
	var limited int
	for i := range 50 {
		status, body, hdr := h.do("GET", "/engines", nil, from("203.0.113.7", platform(keys.Generate())))
		switch status {
		case http.StatusUnauthorized:
			require.Equal(t, "INVALID_PLATFORM_KEY", errCode(body))
			require.Zero(t, limited, "request %d: 401 after a 429", i)
		case http.StatusTooManyRequests:
			limited++
			require.Equal(t, "RATE_LIMITED", errCode(body))
			ra, err := strconv.Atoi(hdr.Get("Retry-After"))
			require.NoError(t, err, "Retry-After %q", hdr.Get("Retry-After"))
			require.GreaterOrEqual(t, ra, 1)
		default:
			t.Fatalf("request %d: %d %v", i, status, body)
		}
	}
	require.GreaterOrEqual(t, limited, 40, "the burst is 4 failures")
	require.LessOrEqual(t, qc.count(lookup)-before, 10, "throttled requests are not looked up")

	// The throttled client's valid key goes on working; the admin key does not
	// (a throttled client must not go on guessing it).
	status, _, _ = h.do("GET", "/engines", nil, from("203.0.113.7", platform(key)))
	require.Equal(t, http.StatusOK, status)
	status, body, _ := h.do("GET", "/products", nil, from("203.0.113.7", admin()))
	require.Equal(t, http.StatusTooManyRequests, status, "%v", body)
	// Missing keys count as failures too.
	status, body, _ = h.do("GET", "/engines", nil, from("203.0.113.7", nil))
	require.Equal(t, http.StatusTooManyRequests, status, "%v", body)

	// Another client is unaffected, the admin key included.
	status, body, _ = h.do("GET", "/engines", nil, from("198.51.100.1", platform(keys.Generate())))
	require.Equal(t, http.StatusUnauthorized, status, "%v", body)
	status, _, _ = h.do("GET", "/products", nil, from("198.51.100.1", admin()))
	require.Equal(t, http.StatusOK, status)
	// IPv6 clients share a budget per /64.
	for i := range 5 {
		h.do("GET", "/engines", nil, from("2001:db8:1:2::"+strconv.Itoa(i+1), platform(keys.Generate())))
	}
	status, _, _ = h.do("GET", "/engines", nil, from("2001:db8:1:2::ff", platform(keys.Generate())))
	require.Equal(t, http.StatusTooManyRequests, status)

	// The budget refills: the client is answered 401 again.
	require.Eventually(t, func() bool {
		status, _, _ := h.do("GET", "/engines", nil, from("203.0.113.7", platform(keys.Generate())))
		return status == http.StatusUnauthorized
	}, 10*time.Second, 100*time.Millisecond)

	g := m.Gatherer()
	require.GreaterOrEqual(t, testenvCounter(t, g, "orchestrator_auth_failures_total", map[string]string{"result": "throttled"}), 40.0)
	require.GreaterOrEqual(t, testenvCounter(t, g, "orchestrator_auth_failures_total", map[string]string{"result": "invalid"}), 4.0)
}

// X-Forwarded-For from a peer that is not a trusted proxy is ignored: a
// client cannot pick its own budget.
func TestFailedAuthForwardedForUntrusted(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.AuthFailuresPerSecond = 1
	h := newHarness(t, "", cfg)
	var limited int
	for i := range 20 {
		status, _, _ := h.do("POST", "/products/register", `{}`, map[string]string{"X-Admin-Key": "wrong-admin-key-0123456789",
			"X-Forwarded-For": "192.0.2." + strconv.Itoa(i+1)})
		if status == http.StatusTooManyRequests {
			limited++
		}
	}
	require.GreaterOrEqual(t, limited, 15)
}

// A cached platform key is trusted for ProductTTL only: a key rotated out
// without overlap stops working on a replica that never heard of the
// rotation (its NOTIFY lost), once the TTL has passed.
func TestProductCacheTTL(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.ProductTTL = time.Second
	a := newHarness(t, "", cfg)
	id, key := a.register("acme", nil)
	// b serves without a listener: it is told of no change.
	b := newDeafReplica(t, a.DBURL, cfg)
	status, _, _ := b.do("GET", "/engines", nil, platform(key))
	require.Equal(t, http.StatusOK, status)

	status, body, _ := a.do("POST", "/products/"+id+"/rotate-platform-key", `{"overlap_seconds":0}`, admin())
	require.Equal(t, http.StatusOK, status, "%v", body)
	newKey := body["platform_api_key"].(string)
	require.Eventually(t, func() bool {
		status, _, _ := b.do("GET", "/engines", nil, platform(key))
		return status == http.StatusUnauthorized
	}, 10*time.Second, 50*time.Millisecond, "the rotated-out key still works on the deaf replica")
	status, _, _ = b.do("GET", "/engines", nil, platform(newKey))
	require.Equal(t, http.StatusOK, status)
}

func testenvCounter(t *testing.T, g prometheus.Gatherer, name string, labels map[string]string) float64 {
	t.Helper()
	m := testenv.GatherMetric(t, g, name, labels)
	require.NotNil(t, m, "%s%v", name, labels)
	return m.GetCounter().GetValue()
}

// newDeafReplica is an API replica on dbURL that never runs its listener:
// it hears no NOTIFY, as if every one were lost.
func newDeafReplica(t *testing.T, dbURL string, cfg api.Config) *harness {
	t.Helper()
	pool := testenv.Pool(t, dbURL)
	rc, err := river.NewClient(riverpgxv5.New(pool), &river.Config{})
	require.NoError(t, err)
	kr, err := keys.NewKeyring(keys.GenerateMasterKey(), nil)
	require.NoError(t, err)
	srv := newAPI(cfg, pool, rc, kr, testenv.Quiet())
	ts := httptest.NewServer(srv.Handler())
	t.Cleanup(ts.Close)
	return &harness{t: t, URL: ts.URL, DBURL: dbURL, Pool: pool, Keyring: kr, Server: srv}
}
