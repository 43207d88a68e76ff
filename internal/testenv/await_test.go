package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

func TestPoll(t *testing.T) {
	n := 0
	err := Poll(5*time.Second, func() error {
		n++ // on the caller's goroutine: no race
		return Check(n == 3, "n = %d", n)
	})
	if err != nil || n != 3 {
		t.Fatalf("Poll = %v after %d calls, want nil after 3", err, n)
	}

	start := time.Now()
	err = Poll(50*time.Millisecond, func() error { n++; return fmt.Errorf("still %d", n) })
	if err == nil || err.Error() != fmt.Sprintf("still %d", n) {
		t.Fatalf("Poll = %v, want the last error (still %d)", err, n)
	}
	if d := time.Since(start); d < 50*time.Millisecond || d > 2*time.Second {
		t.Fatalf("Poll gave up after %s, want about 50ms", d)
	}
}

// Await fails the test naming what it waited for and the last state seen.
// The verdict is read from a child run of this test binary.
func TestAwaitFails(t *testing.T) {
	if os.Getenv("TESTENV_AWAIT_CHILD") == "1" {
		Await(t, 20*time.Millisecond, "the answer", func() error { return Check(false, "got %d", 41) })
		t.Log("after Await")
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run", "^TestAwaitFails$", "-test.v")
	cmd.Env = append(os.Environ(), "TESTENV_AWAIT_CHILD=1")
	out, _ := cmd.CombinedOutput()
	for _, want := range []string{"--- FAIL: TestAwaitFails", "not within 20ms: the answer: got 41"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("want %q in:\n%s", want, out)
		}
	}
	if strings.Contains(string(out), "after Await") {
		t.Errorf("the test went on after Await failed:\n%s", out)
	}
}
