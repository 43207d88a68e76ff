package testenv

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// Unavailable fails under CI=true and skips otherwise. The verdict is read
// from a child run of this test binary.
func TestUnavailable(t *testing.T) {
	if os.Getenv("TESTENV_UNAVAILABLE_CHILD") == "1" {
		Unavailable(t, "nothing here")
		return
	}
	for ci, want := range map[string]string{"true": "--- FAIL: TestUnavailable", "": "--- SKIP: TestUnavailable"} {
		cmd := exec.Command(os.Args[0], "-test.run", "^TestUnavailable$", "-test.v")
		cmd.Env = append(os.Environ(), "CI="+ci, "TESTENV_UNAVAILABLE_CHILD=1")
		out, _ := cmd.CombinedOutput()
		if !strings.Contains(string(out), want) {
			t.Errorf("CI=%q: want %q in:\n%s", ci, want, out)
		}
	}
}
