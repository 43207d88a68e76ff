package testenv

import (
	"fmt"
	"os"
	"testing"
)

// Unavailable reports that something a test needs (the Docker daemon, a
// compose tool, promtool) is missing here. The test fails when CI=true —
// in CI a test must never pass by skipping — and is skipped otherwise.
func Unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if os.Getenv("CI") == "true" {
		t.Fatalf("required in CI (CI=true): %s", msg)
	}
	t.Skip(msg)
}
