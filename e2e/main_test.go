package e2e_test

import (
	"os"
	"testing"

	"github.com/enginefleet/orchestrator/backend/docker/dockertest"

	"github.com/enginefleet/orchestrator/backend/docker"
	"github.com/enginefleet/orchestrator/internal/kubeenv"
)

// e2eNetwork is the engines' network of the Docker fleets; it goes when the
// package's tests are done.
const e2eNetwork = "enginefleet_e2e_net"

func TestMain(m *testing.M) {
	code := kubeenv.Run(m) // stops the kubernetes control plane if a test started it
	dockertest.RemoveNetworkIfEmpty(e2eNetwork)
	dockertest.RemoveNetworkIfEmpty(e2eNetwork + docker.IsolatedSuffix) // when an older run's open network held the name

	os.Exit(code)
}
