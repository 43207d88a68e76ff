package deploy

import (
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/enginefleet/orchestrator/internal/testenv"
)

// The Prometheus alert rules (prometheus/alerts.yml) are valid and pass
// their unit tests (prometheus/alerts_test.yml): scripts/promtool.sh runs
// `promtool check rules` and `promtool test rules`, installing promtool
// from Debian's prometheus package when it is missing. Without promtool
// the test skips locally and fails in CI.
func TestPrometheusRules(t *testing.T) {
	t.Parallel()
	cmd := exec.Command("bash", "../scripts/promtool.sh")
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if errors.As(err, &exit) && exit.ExitCode() == 3 {
		testenv.Unavailable(t, "promtool is missing and could not be installed:\n%s", out)
	}
	if err != nil {
		t.Fatalf("scripts/promtool.sh: %v\n%s", err, out)
	}
	for _, want := range []string{"SUCCESS: 6 rules found", "Unit Testing:  alerts_test.yml"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("promtool output lacks %q:\n%s", want, out)
		}
	}
	t.Logf("%s", out)
}
