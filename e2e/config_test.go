package e2e_test

import (
	"errors"
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// `orchestrator serve` with a bad environment exits non-zero and lists
// every problem at once, without echoing a secret.
func TestServeRefusesBadEnvironment(t *testing.T) {
	t.Parallel()
	cmd := exec.Command(orchestratorBinary(t), "serve")
	cmd.Env = []string{"PATH=/usr/bin:/bin", "ORCH_MASTER_KEY=definitely-not-fernet", "ORCH_PORT_MIN=9500",
		"ORCH_PORT_MAX=9100", "ORCH_SLEEP_MODE=nap", "ORCH_HEALTH_MAX_FAILURES=zero"}
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	require.True(t, errors.As(err, &exit), "must exit non-zero: %v\n%s", err, out)
	msg := string(out)
	for _, want := range []string{"ORCH_DATABASE_URL", "ORCH_ADMIN_KEY", "ORCH_MASTER_KEY", "ORCH_PORT_MIN", "ORCH_SLEEP_MODE", "ORCH_HEALTH_MAX_FAILURES"} {
		require.Contains(t, msg, want)
	}
	require.Equal(t, 1, strings.Count(msg, "invalid configuration"), "one message")
	require.NotContains(t, msg, "definitely-not-fernet")
}
