package api

import (
	"math"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"
)

// authThrottle limits failed authentications per client: each client
// address has a token bucket of burst tokens refilled at rate per second,
// every failed authentication takes one, and a client with none left is
// answered 429 RATE_LIMITED with Retry-After instead of being looked up.
// A bad key then costs a map lookup, not a database round trip.
//
// Valid keys are never slowed: a platform key the product cache knows
// (valid now or recently) bypasses the throttle, so a product sharing an
// address with an attacker (a NAT, a proxy) keeps working. The admin key
// does not bypass it: a throttled client could otherwise go on guessing
// it at full speed, telling 429 from 200.
//
// Memory is bounded without scans: buckets live in two generations of
// maps. Every period (the time an empty bucket takes to refill) the
// current map becomes the previous one and the previous one is dropped: a
// bucket untouched for a whole period is full again, so forgetting it
// loses nothing. A generation holds at most maxClients buckets; clients
// beyond that (an attack from very many addresses) share one overflow
// bucket.
type authThrottle struct {
	rate, burst float64
	period      time.Duration
	maxClients  int

	mu       sync.Mutex
	cur      map[netip.Addr]tokenBucket
	prev     map[netip.Addr]tokenBucket
	rotated  time.Time
	overflow tokenBucket
}

type tokenBucket struct {
	tokens float64
	at     time.Time // when tokens was last brought up to date
}

const (
	// DefaultAuthFailuresPerSecond is the per-client rate of failed
	// authentications allowed in the long run (ORCH_AUTH_FAILURES_PER_S).
	DefaultAuthFailuresPerSecond = 5
	// authBurstSeconds: a client may fail this many seconds' worth at once.
	authBurstSeconds = 4
	// authMaxClients bounds the buckets of one generation (~64 bytes each).
	authMaxClients = 16384
)

// newAuthThrottle allows perSecond failures per second per client (burst
// 4× that); perSecond < 0 turns the throttle off (nil).
func newAuthThrottle(perSecond float64) *authThrottle {
	if perSecond < 0 {
		return nil
	}
	if perSecond == 0 {
		perSecond = DefaultAuthFailuresPerSecond
	}
	burst := math.Max(1, perSecond*authBurstSeconds)
	return &authThrottle{rate: perSecond, burst: burst, maxClients: authMaxClients,
		period: time.Duration(burst / perSecond * float64(time.Second))}
}

// blocked reports whether client has no failure left to spend, and then
// how many seconds until it has one.
func (t *authThrottle) blocked(client netip.Addr, now time.Time) (bool, int) {
	if t == nil {
		return false, 0
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	b := t.bucket(client, now)
	if b.tokens >= 1 {
		return false, 0
	}
	return true, max(1, int(math.Ceil((1-b.tokens)/t.rate)))
}

// fail spends one of client's failures.
func (t *authThrottle) fail(client netip.Addr, now time.Time) {
	if t == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	b := t.bucket(client, now)
	b.tokens = max(0, b.tokens-1)
	t.store(client, b)
}

// bucket returns client's bucket refilled up to now (the caller holds mu).
func (t *authThrottle) bucket(client netip.Addr, now time.Time) tokenBucket {
	if t.cur == nil || now.Sub(t.rotated) >= t.period {
		t.prev = t.cur
		if now.Sub(t.rotated) >= 2*t.period {
			t.prev = nil // both generations are full again
		}
		t.cur, t.rotated = make(map[netip.Addr]tokenBucket), now
	}
	b, ok := t.cur[client]
	if !ok {
		b, ok = t.prev[client]
	}
	if !ok {
		if len(t.cur) >= t.maxClients {
			b = t.overflow
		} else {
			b = tokenBucket{tokens: t.burst, at: now}
		}
	}
	if elapsed := now.Sub(b.at).Seconds(); elapsed > 0 {
		b.tokens = math.Min(t.burst, b.tokens+elapsed*t.rate)
		b.at = now
	}
	return b
}

// store saves client's bucket (the caller holds mu).
func (t *authThrottle) store(client netip.Addr, b tokenBucket) {
	if _, ok := t.cur[client]; ok || len(t.cur) < t.maxClients {
		t.cur[client] = b
		delete(t.prev, client)
		return
	}
	if _, ok := t.prev[client]; ok {
		t.prev[client] = b
		return
	}
	t.overflow = b
}

// clients is how many buckets are held (tests).
func (t *authThrottle) clients() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.cur) + len(t.prev)
}

// clientAddr is the address a request is throttled under: the peer's, or,
// when the peer is a trusted proxy, the rightmost address of
// X-Forwarded-For that is not a trusted proxy. IPv6 clients are grouped
// by /64 (one host usually has the whole prefix).
func clientAddr(r *http.Request, trusted []netip.Prefix) netip.Addr {
	a := peerAddr(r.RemoteAddr)
	if len(trusted) > 0 && isTrusted(a, trusted) {
		hops := r.Header.Values("X-Forwarded-For")
	walk:
		for i := len(hops) - 1; i >= 0; i-- {
			parts := strings.Split(hops[i], ",")
			for j := len(parts) - 1; j >= 0; j-- {
				h, err := netip.ParseAddr(strings.TrimSpace(parts[j]))
				if err != nil {
					break walk // a forged or garbled entry: go no further left
				}
				a = h.Unmap()
				if !isTrusted(a, trusted) {
					break walk
				}
			}
		}
	}
	if a.Is6() {
		if p, err := a.Prefix(64); err == nil {
			a = p.Addr()
		}
	}
	return a
}

func peerAddr(remote string) netip.Addr {
	host, _, err := net.SplitHostPort(remote)
	if err != nil {
		host = remote
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return netip.Addr{} // the zero address: one bucket for every such client
	}
	return a.Unmap()
}

func isTrusted(a netip.Addr, trusted []netip.Prefix) bool {
	for _, p := range trusted {
		if p.Contains(a) {
			return true
		}
	}
	return false
}
