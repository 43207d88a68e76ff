package docker_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/moby/moby/client"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	orchestrator "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/backend/docker"
)

// dataRoot is a data root of the test's own on this host (the daemon's:
// the tests run beside it), removed when the test ends.
func dataRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "enginefleet-dataroot-test-")
	require.NoError(t, err)
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Logf("leaving %s: %v", dir, err)
		}
	})
	return dir
}

// hostFiles reads every regular file under dir on this host, by path
// relative to dir.
func hostFiles(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	require.NoError(t, filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		b, err := os.ReadFile(p)
		rel, _ := filepath.Rel(dir, p)
		out[rel] = string(b)
		return err
	}))
	return out
}

func volumeDevice(t *testing.T, engineID string) (device string, found bool) {
	t.Helper()
	v, err := rawClient(t).VolumeInspect(t.Context(), orchestrator.VolumeName(engineID), client.VolumeInspectOptions{})
	if cerrdefs.IsNotFound(err) {
		return "", false
	}
	require.NoError(t, err)
	return v.Volume.Options["device"], true
}

func copyOut(t *testing.T, b *docker.Backend, engineID string) map[string]string {
	t.Helper()
	var buf bytes.Buffer
	require.NoError(t, b.CopyDataOut(t.Context(), engineID, &buf))
	return tarContents(t, buf.Bytes())
}

// A brain written through an engine lands under the data root, owned by
// the engine user, in the directory the volume is bound to; removing the
// volume removes it.
func TestBrainUnderDataRoot(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	root := dataRoot(t)
	b := newBackend(t, func(c *docker.Config) { c.DataRoot = root })
	e := newEngine(t, b, engineImage(t))
	id := e.spec.EngineID
	require.NoError(t, b.Ensure(ctx, e.spec))
	require.NoError(t, b.Start(ctx, id))
	e.waitHealthy(t)
	marker := "kept-under-the-data-root-" + randHex(8)
	e.addMemory(t, marker)
	require.NoError(t, b.Stop(ctx, id, 10*time.Second))

	dir := filepath.Join(root, "engines", id, "data")
	assert.Equal(t, dir, docker.BrainDir(b, id))
	dev, found := volumeDevice(t, id)
	require.True(t, found)
	assert.Equal(t, dir, dev, "the engine's volume is bound to its directory under the data root")

	files := hostFiles(t, dir)
	require.Contains(t, files, "brain.sqlite")
	var all strings.Builder
	for _, c := range files {
		all.WriteString(c)
	}
	assert.Contains(t, all.String(), marker, "the memory is in the brain files on the host")
	fi, err := os.Stat(filepath.Join(dir, "brain.sqlite"))
	require.NoError(t, err)
	st := fi.Sys().(*syscall.Stat_t)
	assert.Equal(t, [2]uint32{docker.EngineUID, docker.EngineGID}, [2]uint32{st.Uid, st.Gid})
	fi, err = os.Stat(filepath.Dir(dir))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm(), "no other host user reads a brain")

	// What a backup copies is what is on the host.
	assert.Equal(t, files, copyOut(t, b, id))

	require.NoError(t, b.RemoveContainer(ctx, id))
	require.NoError(t, b.RemoveVolume(ctx, id))
	_, found = volumeDevice(t, id)
	assert.False(t, found)
	fi, err = os.Lstat(filepath.Join(root, "engines", id))
	require.NoError(t, err)
	assert.True(t, fi.Mode().IsRegular() && fi.Size() == 0, "the engine's directory is replaced by an empty file")
	require.NoError(t, b.RemoveVolume(ctx, id), "removing again is a no-op")
	assertNoHelpers(t, id)
}

// legacyEngine is an engine whose brain is in a Docker-managed named
// volume (as versions before the data root made them), holding marker,
// stopped; it returns the volume's contents.
func legacyEngine(t *testing.T, legacy *docker.Backend, marker string) (*testEngine, map[string]string) {
	t.Helper()
	ctx := t.Context()
	e := newEngine(t, legacy, engineImage(t))
	require.NoError(t, legacy.Ensure(ctx, e.spec))
	require.NoError(t, legacy.Start(ctx, e.spec.EngineID))
	e.waitHealthy(t)
	e.addMemory(t, marker)
	require.NoError(t, legacy.Stop(ctx, e.spec.EngineID, 10*time.Second))
	dev, found := volumeDevice(t, e.spec.EngineID)
	require.True(t, found)
	require.Empty(t, dev, "a Docker-managed volume")
	return e, copyOut(t, legacy, e.spec.EngineID)
}

// checkMigrated checks the engine's volume is bound under root, holds
// exactly want, and the engine boots on it with marker in its brain.
func checkMigrated(t *testing.T, b *docker.Backend, e *testEngine, root string, want map[string]string, markers ...string) {
	t.Helper()
	ctx := t.Context()
	id := e.spec.EngineID
	dir := filepath.Join(root, "engines", id, "data")
	dev, found := volumeDevice(t, id)
	require.True(t, found)
	assert.Equal(t, dir, dev)
	assert.Equal(t, want, copyOut(t, b, id), "the volume's files are byte-identical")
	assert.Equal(t, want, hostFiles(t, dir), "and they are under the data root")
	assertNoHelpers(t, id)
	require.NoError(t, b.Start(ctx, id))
	e.waitHealthy(t)
	export := string(e.export(t))
	for _, m := range markers {
		assert.Contains(t, export, m)
	}
}

// A brain in a named volume of an older version is moved under the data
// root by the next Ensure, byte for byte, with its labels.
func TestMigrateNamedVolume(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	legacy := newBackend(t, func(c *docker.Config) { c.DataRoot = "" })
	marker := "moved-" + randHex(8)
	e, before := legacyEngine(t, legacy, marker)
	require.Contains(t, before, "brain.sqlite")

	root := dataRoot(t)
	b := newBackend(t, func(c *docker.Config) { c.DataRoot = root; c.Node = legacy.Config().Node })
	require.NoError(t, b.Ensure(ctx, e.spec))
	checkMigrated(t, b, e, root, before, marker)

	v, err := rawClient(t).VolumeInspect(ctx, orchestrator.VolumeName(e.spec.EngineID), client.VolumeInspectOptions{})
	require.NoError(t, err)
	assert.Equal(t, e.spec.ProductID, v.Volume.Labels[orchestrator.LabelProductID])
	assert.Equal(t, "true", v.Volume.Labels[testLabel])
	_, vols, err := b.List(ctx)
	require.NoError(t, err)
	require.Len(t, vols, 1)
	assert.Equal(t, e.spec.EngineID, vols[0].EngineID)

	// Adopting it again moves nothing.
	require.NoError(t, b.Ensure(ctx, e.spec))
}

// A worker killed at any step of a migration loses nothing, and the next
// Ensure finishes it.
func TestMigrateKilledMidway(t *testing.T) {
	t.Parallel()
	errKilled := errors.New("killed")
	for _, step := range []string{"copying", "copied", "removed"} {
		t.Run(step, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			legacy := newBackend(t, func(c *docker.Config) { c.DataRoot = "" })
			marker := "survives-" + step + "-" + randHex(8)
			e, before := legacyEngine(t, legacy, marker)
			id := e.spec.EngineID
			root := dataRoot(t)
			withRoot := func(c *docker.Config) { c.DataRoot = root; c.Node = legacy.Config().Node }

			b := newBackend(t, withRoot)
			docker.SetMigrateHook(b, func(s string) error {
				if s == step {
					return errKilled
				}
				return nil
			})
			require.ErrorIs(t, b.Ensure(ctx, e.spec), errKilled)
			dev, found := volumeDevice(t, id)
			markers := []string{marker}
			switch step {
			case "copying", "copied":
				require.True(t, found, "the old volume is kept until the copy is verified")
				assert.Empty(t, dev)
				assert.Equal(t, before, copyOut(t, legacy, id))
			case "removed":
				assert.False(t, found)
			}
			if step == "copied" {
				// An older worker (a rolling upgrade) starts the engine on
				// the old volume and it writes: the next run must notice
				// the verified copy is stale and copy again.
				require.NoError(t, legacy.Ensure(ctx, e.spec))
				require.NoError(t, legacy.Start(ctx, id))
				e.waitHealthy(t)
				later := "written-after-the-copy-" + randHex(8)
				e.addMemory(t, later)
				markers = append(markers, later)
				require.NoError(t, legacy.Stop(ctx, id, 10*time.Second))
				before = copyOut(t, legacy, id)
			}

			next := newBackend(t, withRoot)
			require.NoError(t, next.Ensure(ctx, e.spec))
			checkMigrated(t, next, e, root, before, markers...)
		})
	}
}
