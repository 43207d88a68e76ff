package testenv

import (
	"fmt"
	"math/rand/v2"
	"net"
	"testing"
)

// FreePort returns a loopback port that is free now, picked below Linux's
// ephemeral range (32768-60999): a port the kernel hands out for outgoing
// connections could be taken again before an engine binds it.
func FreePort(t testing.TB) int {
	t.Helper()
	for try := 0; try < 200; try++ {
		p := 10000 + rand.IntN(22000)
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			continue
		}
		l.Close()
		return p
	}
	t.Fatal("no free port below the ephemeral range")
	return 0
}
