package testenv

import (
	"testing"
)

// Reserved ranges never overlap while their tests run, within a process
// (and, by the same lock files, across processes).
func TestPortRangesDoNotOverlap(t *testing.T) {
	t.Parallel()
	seen := map[int]bool{}
	for range 30 {
		base := PortRange(t, 100)
		if base < portLow || base+100 > portHigh || (base-portLow)%portBucket != 0 {
			t.Fatalf("range at %d is not a bucket below the ephemeral range", base)
		}
		if seen[base] {
			t.Fatalf("range at %d handed out twice", base)
		}
		seen[base] = true
	}
	if p := FreePort(t); seen[p] {
		t.Fatalf("port %d is inside a reserved range", p)
	}
}
