package webhooks

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"syscall"
	"time"
)

// Policy is where deliveries may go. By default only public addresses
// over https: a product must not reach the orchestrator's own network
// (metrics, Postgres, cloud metadata) through its webhook URL.
type Policy struct {
	// AllowNetworks are destinations allowed even though private,
	// loopback or link-local (ORCH_WEBHOOK_ALLOW_NETWORKS).
	AllowNetworks []netip.Prefix
	// AllowHTTP allows plain http to any allowed destination; without it,
	// http only to a loopback host (ORCH_WEBHOOK_ALLOW_HTTP).
	AllowHTTP bool
}

// ErrDestination is why a URL or a dialed address is refused.
var ErrDestination = errors.New("destination not allowed")

// allowed reports whether a dialed address may be reached.
func (p Policy) allowed(a netip.Addr) bool {
	a = a.Unmap()
	for _, n := range p.AllowNetworks {
		if n.Contains(a) {
			return true
		}
	}
	return !special(a)
}

// special is every address that is not the public internet.
func special(a netip.Addr) bool {
	if a.IsLoopback() || a.IsPrivate() || a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast() ||
		a.IsInterfaceLocalMulticast() || a.IsMulticast() || a.IsUnspecified() || !a.IsValid() {
		return true
	}
	for _, n := range reserved {
		if n.Contains(a) {
			return true
		}
	}
	return false
}

// reserved are the other non-public ranges Go's predicates do not name.
var reserved = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),       // "this network"
	netip.MustParsePrefix("100.64.0.0/10"),   // carrier-grade NAT
	netip.MustParsePrefix("192.0.0.0/24"),    // IETF protocol assignments
	netip.MustParsePrefix("198.18.0.0/15"),   // benchmarking
	netip.MustParsePrefix("240.0.0.0/4"),     // reserved, broadcast
	netip.MustParsePrefix("64:ff9b::/96"),    // NAT64 (reaches IPv4 behind it)
	netip.MustParsePrefix("64:ff9b:1::/48"),  // local NAT64
	netip.MustParsePrefix("2002::/16"),       // 6to4
	netip.MustParsePrefix("fec0::/10"),       // site-local (deprecated)
	netip.MustParsePrefix("2001:db8::/32"),   // documentation
	netip.MustParsePrefix("100::/64"),        // discard
	netip.MustParsePrefix("2001::/32"),       // Teredo
	netip.MustParsePrefix("198.51.100.0/24"), // documentation
	netip.MustParsePrefix("203.0.113.0/24"),  // documentation
	netip.MustParsePrefix("192.0.2.0/24"),    // documentation
}

// CheckURL validates an endpoint URL when a product registers it: absolute
// http(s) without credentials, https unless the host is loopback or the
// policy allows http, and not an IP literal the policy refuses. A host
// name is checked again at every dial, on the address it resolved to.
func (p Policy) CheckURL(raw string) error {
	if len(raw) > 2048 {
		return fmt.Errorf("%w: the URL is longer than 2048 characters", ErrDestination)
	}
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" || u.Opaque != "" {
		return fmt.Errorf("%w: not an absolute URL", ErrDestination)
	}
	if u.User != nil {
		return fmt.Errorf("%w: credentials in the URL are not allowed (put a token in the path or query)", ErrDestination)
	}
	if u.Fragment != "" {
		return fmt.Errorf("%w: a URL fragment is not sent", ErrDestination)
	}
	host := u.Hostname()
	addr, aerr := netip.ParseAddr(strings.Trim(host, "[]"))
	loopback := strings.EqualFold(host, "localhost") || (aerr == nil && addr.Unmap().IsLoopback())
	switch u.Scheme {
	case "https":
	case "http":
		if !loopback && !p.AllowHTTP {
			return fmt.Errorf("%w: https is required (http only to a loopback address)", ErrDestination)
		}
	default:
		return fmt.Errorf("%w: the scheme must be https", ErrDestination)
	}
	if aerr == nil && !p.allowed(addr) {
		return fmt.Errorf("%w: %s is a private, loopback or link-local address", ErrDestination, addr)
	}
	if strings.EqualFold(host, "localhost") && !p.allowed(netip.MustParseAddr("127.0.0.1")) {
		return fmt.Errorf("%w: localhost is a loopback address", ErrDestination)
	}
	return nil
}

// control refuses, at connect time, an address the policy does not allow:
// the check is on the IP actually dialed, so a name that resolves to a
// private address (or is rebound to one after registration) is refused.
func (p Policy) control(_, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("%w: %s", ErrDestination, address)
	}
	if !p.allowed(ap.Addr()) {
		return fmt.Errorf("%w: %s is a private, loopback or link-local address", ErrDestination, ap.Addr())
	}
	return nil
}

// Client is the HTTP client of deliveries: the policy checked on every
// dialed address, no proxy (it would dial for us), redirects not followed
// (a 3xx is a failed attempt), timeout per attempt.
func (p Policy) Client(timeout time.Duration) *http.Client {
	d := &net.Dialer{Timeout: min(timeout, 10*time.Second), Control: p.control}
	tr := &http.Transport{
		Proxy: nil,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return d.DialContext(ctx, network, addr)
		},
		TLSClientConfig:       &tls.Config{MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout:   min(timeout, 10*time.Second),
		ResponseHeaderTimeout: timeout,
		MaxIdleConns:          200,
		MaxIdleConnsPerHost:   8,
		IdleConnTimeout:       90 * time.Second,
		ForceAttemptHTTP2:     true,
	}
	return &http.Client{
		Transport:     tr,
		Timeout:       timeout,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}
