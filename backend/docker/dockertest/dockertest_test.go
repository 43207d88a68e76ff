package dockertest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/moby/moby/client"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestEngineImageIsBuiltOnceAndLabelled(t *testing.T) {
	ref := EngineImage(t, "test")
	assert.Equal(t, "enginefleet/engine:test", ref)

	cli := RequireDocker(t)
	img, err := cli.ImageInspect(context.Background(), ref)
	require.NoError(t, err)
	assert.Less(t, img.Size, int64(30<<20), "image is %d bytes", img.Size)
	assert.Equal(t, "true", img.Config.Labels[LabelTest])
	hash, err := testenv.EngineSourceHash(testenv.RepoRoot(t), "test")
	require.NoError(t, err)
	assert.Equal(t, hash, img.Config.Labels[LabelEngineSourceHash])
	assert.Equal(t, "65532:65532", img.Config.User)
	assert.Equal(t, []string{"/engine"}, img.Config.Entrypoint)

	// A second call (as from another test process: no in-process memo)
	// only inspects the image.
	imageMu.Lock()
	delete(imageBuilt, ref)
	imageMu.Unlock()
	assert.Equal(t, ref, EngineImage(t, "test"))
	again, err := cli.ImageInspect(context.Background(), ref)
	require.NoError(t, err)
	assert.Equal(t, img.ID, again.ID, "not rebuilt")
}

func TestEngineImageRebuildsStaleTag(t *testing.T) {
	cli := RequireDocker(t)
	base := EngineImage(t, "test")
	ctx := context.Background()
	// A tag whose label does not match its version's sources is stale.
	version := fmt.Sprintf("stale-%d-%d", os.Getpid(), time.Now().UnixNano())
	ref := EngineImageRepo + ":" + version
	_, err := cli.ImageTag(ctx, client.ImageTagOptions{Source: base, Target: ref})
	require.NoError(t, err)
	t.Cleanup(func() {
		cli.ImageRemove(context.Background(), ref, client.ImageRemoveOptions{PruneChildren: true})
	})
	baseImg, err := cli.ImageInspect(ctx, base)
	require.NoError(t, err)

	assert.Equal(t, ref, EngineImage(t, version))
	img, err := cli.ImageInspect(ctx, ref)
	require.NoError(t, err)
	assert.NotEqual(t, baseImg.ID, img.ID, "stale image rebuilt")
	hash, err := testenv.EngineSourceHash(testenv.RepoRoot(t), version)
	require.NoError(t, err)
	assert.Equal(t, hash, img.Config.Labels[LabelEngineSourceHash])

	// The image the stale tag pointed at keeps its other tag.
	still, err := cli.ImageInspect(ctx, base)
	require.NoError(t, err)
	assert.Equal(t, baseImg.ID, still.ID)
}

// TestEngineImageAcrossProcesses runs three test processes that need the
// same missing image at once: the file lock lets exactly one build it.
func TestEngineImageAcrossProcesses(t *testing.T) {
	if v := os.Getenv("TESTENV_ENGINE_IMAGE_CHILD"); v != "" {
		EngineImage(t, v)
		return
	}
	cli := RequireDocker(t)
	version := fmt.Sprintf("lock-%d-%d", os.Getpid(), time.Now().UnixNano())
	ref := EngineImageRepo + ":" + version
	t.Cleanup(func() {
		cli.ImageRemove(context.Background(), ref, client.ImageRemoveOptions{PruneChildren: true})
	})
	type result struct {
		out string
		err error
	}
	results := make(chan result, 3)
	for i := 0; i < 3; i++ {
		go func() {
			cmd := exec.Command(os.Args[0], "-test.run=^TestEngineImageAcrossProcesses$", "-test.v", "-test.count=1")
			cmd.Env = append(os.Environ(), "TESTENV_ENGINE_IMAGE_CHILD="+version)
			out, err := cmd.CombinedOutput()
			results <- result{string(out), err}
		}()
	}
	builds := 0
	for i := 0; i < 3; i++ {
		r := <-results
		require.NoError(t, r.err, "%s", r.out)
		require.Contains(t, r.out, "--- PASS", "%s", r.out)
		builds += strings.Count(r.out, "built engine image "+ref)
	}
	assert.Equal(t, 1, builds, "one process builds, the others find the image")
}

func TestReadBuildStream(t *testing.T) {
	tests := []struct {
		name, stream, wantErr string
	}{
		{"success", `{"stream":"Step 1/3 : FROM scratch\n"}{"stream":"Successfully built abc\n"}`, ""},
		{"error detail", `{"stream":"Step 1/3\n"}{"errorDetail":{"message":"COPY failed: no source files"},"error":"COPY failed: no source files"}`, "COPY failed"},
		{"bare error", `{"error":"boom"}`, "boom"},
		{"garbage", `{"stream":`, "read build output"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := readBuildStream(strings.NewReader(tt.stream))
			if tt.wantErr == "" {
				assert.NoError(t, err)
				return
			}
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.wantErr)
		})
	}
}
