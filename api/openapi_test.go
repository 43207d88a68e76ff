package api_test

import (
	"flag"
	"os"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/api"
)

var update = flag.Bool("update", false, "rewrite golden files (openapi.yaml)")

// openapi.yaml at the root is generated from the very huma API the server
// uses; this fails when it is stale. Refresh: make gen (or -update).
func TestOpenAPIGolden(t *testing.T) {
	got, err := api.OpenAPIYAML("dev")
	require.NoError(t, err)
	const path = "../openapi.yaml"
	if *update {
		require.NoError(t, os.WriteFile(path, got, 0o644))
	}
	want, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Equal(t, string(want), string(got), "openapi.yaml is stale: run `make gen`")

	// The 3.0 rendering the Go SDK is generated from.
	got30, err := api.OpenAPI30YAML("dev")
	require.NoError(t, err)
	const path30 = "../sdk/go/openapi-3.0.yaml"
	if *update {
		require.NoError(t, os.WriteFile(path30, got30, 0o644))
	}
	want30, err := os.ReadFile(path30)
	require.NoError(t, err)
	require.Equal(t, string(want30), string(got30), "sdk/go/openapi-3.0.yaml is stale: run `make gen`")
}
