package api

import (
	"context"
	"net/http"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

// The throttle's memory is bounded however many clients fail: beyond
// authMaxClients a generation's newcomers share one overflow bucket, and
// generations older than a refill period are forgotten whole.
func TestAuthThrottleBounded(t *testing.T) {
	th := newAuthThrottle(2) // burst 8, period 4 s
	th.maxClients = 1000
	now := time.Now()
	addr := func(i int) netip.Addr {
		return netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
	}
	for i := range 100000 {
		th.fail(addr(i), now)
	}
	require.LessOrEqual(t, th.clients(), 2*th.maxClients)
	// Clients past the cap share the overflow bucket: it is spent.
	blocked, _ := th.blocked(addr(99999), now)
	require.True(t, blocked, "the overflow bucket is shared")
	blocked, _ = th.blocked(addr(1), now)
	require.False(t, blocked, "a client with its own bucket failed once of 8")
	// Two periods later everything is forgotten (and full again).
	later := now.Add(2 * th.period)
	th.fail(addr(5), later)
	require.Equal(t, 1, th.clients())

	// Retry-After is the time until the next failure is allowed.
	c := addr(7)
	for range 8 {
		th.fail(c, later)
	}
	blocked, retry := th.blocked(c, later)
	require.True(t, blocked)
	require.Equal(t, 1, retry) // 2 per second: half a second, rounded up
	blocked, _ = th.blocked(c, later.Add(600*time.Millisecond))
	require.False(t, blocked)

	require.Nil(t, newAuthThrottle(-1), "< 0 = off")
	var off *authThrottle
	off.fail(c, now)
	blocked, _ = off.blocked(c, now)
	require.False(t, blocked)
}

func TestClientAddr(t *testing.T) {
	trusted := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("::1/128")}
	req := func(remote string, xff ...string) *http.Request {
		r := &http.Request{RemoteAddr: remote, Header: http.Header{}}
		for _, v := range xff {
			r.Header.Add("X-Forwarded-For", v)
		}
		return r
	}
	for _, tc := range []struct {
		r    *http.Request
		want string
	}{
		{req("192.0.2.1:5000"), "192.0.2.1"},
		{req("192.0.2.1:5000", "198.51.100.9"), "192.0.2.1"}, // untrusted peer: its header is ignored
		{req("10.1.2.3:5000", "198.51.100.9"), "198.51.100.9"},
		{req("10.1.2.3:5000", "6.6.6.6, 198.51.100.9, 10.9.9.9"), "198.51.100.9"}, // rightmost untrusted
		{req("10.1.2.3:5000", "6.6.6.6", "198.51.100.9"), "198.51.100.9"},
		{req("10.1.2.3:5000", "garbage, 198.51.100.9"), "198.51.100.9"},
		{req("10.1.2.3:5000", "198.51.100.9, garbage"), "10.1.2.3"}, // garbled next to the proxy: the proxy
		{req("10.1.2.3:5000", "10.4.4.4"), "10.4.4.4"},              // every hop trusted: the leftmost
		{req("[::1]:5000", "2001:db8:aa:bb:1:2:3:4"), "2001:db8:aa:bb::"},
		{req("[2001:db8::1]:80"), "2001:db8::"},
		{req("[::ffff:192.0.2.1]:80"), "192.0.2.1"},
		{req("not-an-address"), "invalid IP"},
	} {
		require.Equal(t, tc.want, clientAddr(tc.r, trusted).String(), "%s %v", tc.r.RemoteAddr, tc.r.Header)
	}
}

// Unknown keys cost one lookup each but never grow the cache past its
// bound, and never evict a valid key.
func TestProductCacheMissesBounded(t *testing.T) {
	t.Parallel()
	pool := testenv.Pool(t, testenv.DB(t))
	key := keys.Generate()
	p, err := schema.New(pool).InsertProduct(context.Background(), "acme", "Acme", orch.Policy{}, keys.Hash(key))
	require.NoError(t, err)
	c := newProductCache(pool, time.Hour)
	ctx := context.Background()
	got, err := c.lookup(ctx, keys.Hash(key))
	require.NoError(t, err)
	require.Equal(t, p.ID, got.ID)
	for range 3 * maxMisses {
		_, err := c.lookup(ctx, keys.Hash(keys.Generate()))
		require.True(t, orch.IsCode(err, orch.CodeInvalidPlatformKey), "%v", err)
	}
	require.LessOrEqual(t, c.misses.Len(), 2*maxMisses)
	require.Len(t, c.byKey, 1)
	_, fresh, known := c.peek(keys.Hash(key), time.Now())
	require.True(t, fresh && known)
	c.invalidate(p.ID)
	require.Zero(t, c.misses.Len())
	_, fresh, known = c.peek(keys.Hash(key), time.Now())
	require.True(t, known && !fresh, "an invalidated key stays known (stale) for the throttle, and is checked again")
	got, err = c.lookup(ctx, keys.Hash(key))
	require.NoError(t, err)
	require.Equal(t, p.ID, got.ID)
	require.True(t, c.byKey[keys.Hash(key)].fresh(time.Now(), c.ttl), "checked again")
}
