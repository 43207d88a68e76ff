package orchestrator_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
)

func TestRepository(t *testing.T) {
	t.Parallel()
	for ref, want := range map[string]string{
		"enginefleet/engine:1.2":                   "enginefleet/engine",
		"enginefleet/engine":                       "enginefleet/engine",
		"host:5000/team/engine:1.2":                "host:5000/team/engine",
		"host:5000/team/engine":                    "host:5000/team/engine",
		"host:5000/team/engine:1.2@sha256:abcdef0": "host:5000/team/engine",
		"engine@sha256:abcdef0":                    "engine",
	} {
		assert.Equal(t, want, orch.Repository(ref), ref)
	}
}

func TestImagesAllows(t *testing.T) {
	t.Parallel()
	def := "enginefleet/engine:1.0"
	cases := []struct {
		list    string
		allowed []string
		refused []string
	}{
		{"", // the default image's repository, any pinned tag or digest
			[]string{def, "enginefleet/engine:2.0", "enginefleet/engine@sha256:abc"},
			[]string{"enginefleet/engine", "evil/engine:1.0", "enginefleet/engine-evil:1.0", "/bin/sh", "docker.io/enginefleet/engine:1.0"}},
		{"reg.example.com/team/engine, enginefleet/canary:7",
			[]string{def, "reg.example.com/team/engine:3", "enginefleet/canary:7"},
			[]string{"enginefleet/engine:2.0", "enginefleet/canary:8", "reg.example.com/team/other:3"}},
		{"/opt/engines/engine-2",
			[]string{def, "/opt/engines/engine-2"},
			[]string{"/opt/engines/engine-3", "enginefleet/engine:2.0"}},
		{"*", []string{def, "anything:1", "/bin/sh"}, nil},
	}
	for _, c := range cases {
		im, err := orch.ParseImages(def, c.list)
		require.NoError(t, err, c.list)
		for _, r := range c.allowed {
			assert.True(t, im.Allows(r), "%q allows %q", c.list, r)
		}
		for _, r := range c.refused {
			assert.False(t, im.Allows(r), "%q refuses %q", c.list, r)
		}
	}
	for _, bad := range []string{"a b:1", "team/*"} {
		_, err := orch.ParseImages(def, bad)
		assert.Error(t, err, bad)
	}
}
