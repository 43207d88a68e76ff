package testenv

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// Ports are handed out below Linux's ephemeral range (32768-60999): a port
// the kernel gives to outgoing connections could be taken again before an
// engine binds it. They come in buckets of portBucket, each held by one
// test at a time through a lock file (flock: released when the test ends
// or its process dies), so parallel tests and test processes never share
// ports — a "free now" probe alone would not stop two fleets picking
// overlapping ranges and one engine answering for another.
const (
	portLow    = 10000
	portHigh   = 32000
	portBucket = 100
)

// PortRange returns the first of n (≤ 100) consecutive loopback ports that
// are free and reserved for t until it ends.
func PortRange(t testing.TB, n int) int {
	t.Helper()
	if n < 1 || n > portBucket {
		t.Fatalf("PortRange(%d): want 1..%d ports", n, portBucket)
	}
	dir := filepath.Join(os.TempDir(), "enginefleet-test-ports")
	if err := os.MkdirAll(dir, 0o777); err != nil {
		t.Fatalf("port reservations: %v", err)
	}
	buckets := (portHigh - portLow) / portBucket
	for try := 0; try < 4*buckets; try++ {
		k := rand.IntN(buckets)
		f, err := os.OpenFile(filepath.Join(dir, fmt.Sprintf("bucket-%03d", k)), os.O_CREATE|os.O_RDWR, 0o666)
		if err != nil {
			t.Fatalf("port reservations: %v", err)
		}
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, syscall.EWOULDBLOCK) || errors.Is(err, syscall.EINTR) {
				continue // another test holds it
			}
			t.Fatalf("lock %s: %v", f.Name(), err)
		}
		base := portLow + k*portBucket
		if !allFree(base, n) { // something outside the tests uses them
			f.Close()
			continue
		}
		t.Cleanup(func() { f.Close() }) // closing releases the lock
		return base
	}
	t.Fatal("no free port range below the ephemeral range")
	return 0
}

// FreePort returns a loopback port reserved for t (see PortRange).
func FreePort(t testing.TB) int {
	t.Helper()
	return PortRange(t, 1)
}

func allFree(base, n int) bool {
	for p := base; p < base+n; p++ {
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			return false
		}
		l.Close()
	}
	return true
}
