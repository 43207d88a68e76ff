package testenv

import (
	"errors"
	"os"
	"os/exec"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestEngineBinary(t *testing.T) {
	p := EngineBinary(t)
	assert.Equal(t, p, EngineBinary(t), "built once")
	st, err := os.Stat(p)
	require.NoError(t, err)
	assert.NotZero(t, st.Mode()&0o111, "executable")

	// Without ENGINE_KEY_HASH it refuses to start, naming the problem.
	cmd := exec.Command(p)
	cmd.Env = []string{"SQLITE_DB_PATH=" + t.TempDir() + "/brain.sqlite"}
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	require.True(t, errors.As(err, &ee), "exit error expected, got %v: %s", err, out)
	assert.Equal(t, 2, ee.ExitCode())
	assert.Contains(t, string(out), "ENGINE_KEY_HASH is required")
}

func TestEngineSourceHash(t *testing.T) {
	root := RepoRoot(t)
	a, err := EngineSourceHash(root, "v1")
	require.NoError(t, err)
	b, err := EngineSourceHash(root, "v1")
	require.NoError(t, err)
	c, err := EngineSourceHash(root, "v2")
	require.NoError(t, err)
	assert.Equal(t, a, b)
	assert.NotEqual(t, a, c)
	assert.Len(t, a, 64)
}
