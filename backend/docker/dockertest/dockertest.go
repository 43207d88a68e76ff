// Package dockertest is test support for the Docker backend and the
// suites that run engines in Docker: the daemon requirement (fail in CI,
// skip elsewhere), the reference engine image built locally FROM scratch,
// and a dialer container that checks what an engine's network lets
// through. It is the only test code that speaks the Docker SDK; everything
// else a test needs is in internal/testenv.
package dockertest

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/moby/moby/api/types/build"
	"github.com/moby/moby/client"
)

// Labels put on what the test suites create in Docker.
const (
	// LabelTest marks every image, container and volume a test creates.
	LabelTest = "orchestrator.test"
	// LabelEngineSourceHash on an engine image is the hash of the sources
	// it was built from (see EngineImage).
	LabelEngineSourceHash = "orchestrator.test.engine_source_hash"
)

// EngineImageRepo is the repository of the engine images EngineImage builds.
const EngineImageRepo = "enginefleet/engine"

// RequireDocker returns a client connected to the Docker daemon (DOCKER_HOST
// honoured), closed when the test ends. When no daemon answers the test is
// skipped, or fails when CI=true: in CI a Docker test must never pass by
// skipping.
func RequireDocker(t testing.TB) *client.Client {
	t.Helper()
	cli, err := client.New(client.FromEnv)
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err = cli.Ping(ctx, client.PingOptions{NegotiateAPIVersion: true})
		cancel()
		if err != nil {
			cli.Close()
		}
	}
	if err != nil {
		testenv.Unavailable(t, "no Docker daemon answers: %v", err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

var (
	imageMu    sync.Mutex
	imageBuilt = map[string]string{} // ref → source hash verified in this process
)

// EngineImage returns "enginefleet/engine:<version>", building it first
// unless an image with that tag already carries the hash of the current
// engine sources (the .go files of refengine/ and cmd/engine, the Dockerfile,
// the rootfs, go.mod/go.sum and the Go version) in its
// LabelEngineSourceHash label. The binary is built outside Docker
// (CGO_ENABLED=0, -trimpath, -ldflags "-s -w -X main.version=<version>")
// and the image with deploy/engine.Dockerfile by the classic builder.
// Parallel test processes are serialised by a file lock in os.TempDir().
// It fails the test on any error and skips it when Docker is unavailable
// (see RequireDocker).
func EngineImage(t testing.TB, version string) string {
	t.Helper()
	cli := RequireDocker(t)
	ref := EngineImageRepo + ":" + version
	root := testenv.RepoRoot(t)
	hash, err := testenv.EngineSourceHash(root, version)
	if err != nil {
		t.Fatalf("hash engine sources: %v", err)
	}

	imageMu.Lock()
	defer imageMu.Unlock()
	if imageBuilt[ref] == hash {
		return ref
	}
	unlock := testenv.LockFile(t, "enginefleet-engine-image.lock")
	defer unlock()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	oldID := ""
	img, err := cli.ImageInspect(ctx, ref)
	switch {
	case err == nil && img.Config != nil && img.Config.Labels[LabelEngineSourceHash] == hash:
		imageBuilt[ref] = hash
		return ref
	case err == nil:
		oldID = img.ID
	case !cerrdefs.IsNotFound(err):
		t.Fatalf("inspect image %s: %v", ref, err)
	}

	began := time.Now()
	if err := buildEngineImage(ctx, cli, root, ref, version, hash); err != nil {
		t.Fatalf("build engine image %s: %v", ref, err)
	}
	img, err = cli.ImageInspect(ctx, ref)
	if err != nil {
		t.Fatalf("inspect built image %s: %v", ref, err)
	}
	if img.Config == nil || img.Config.Labels[LabelEngineSourceHash] != hash {
		t.Fatalf("built image %s does not carry the source hash label", ref)
	}
	t.Logf("built engine image %s (%s, %.1f MB) in %s", ref, shortID(img.ID), float64(img.Size)/1e6, time.Since(began).Round(time.Millisecond))
	if oldID != "" && oldID != img.ID {
		// The stale image lost its tag: drop it if nothing else names it
		// (another tag) or uses it (the daemon refuses while a container does).
		if old, err := cli.ImageInspect(ctx, oldID); err == nil && len(old.RepoTags) == 0 {
			cli.ImageRemove(ctx, oldID, client.ImageRemoveOptions{PruneChildren: true})
		}
	}
	imageBuilt[ref] = hash
	return ref
}

func buildEngineImage(ctx context.Context, cli *client.Client, root, ref, version, hash string) error {
	dir, err := os.MkdirTemp("", "enginefleet-engine-image-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "engine")
	if err := testenv.BuildEngine(ctx, root, bin, version, true); err != nil {
		return err
	}
	buildCtx, err := engineBuildContext(root, bin)
	if err != nil {
		return fmt.Errorf("build context: %w", err)
	}
	res, err := cli.ImageBuild(ctx, buildCtx, client.ImageBuildOptions{
		Tags:        []string{ref},
		Dockerfile:  "Dockerfile",
		Remove:      true,
		ForceRemove: true,
		Version:     build.BuilderV1,
		Labels: map[string]string{
			LabelTest:             "true",
			LabelEngineSourceHash: hash,
		},
	})
	if err != nil {
		return fmt.Errorf("image build: %w", err)
	}
	defer res.Body.Close()
	return readBuildStream(res.Body)
}

// readBuildStream reads the daemon's JSON message stream to the end: build
// errors arrive inside it with HTTP 200.
func readBuildStream(r io.Reader) error {
	var out strings.Builder
	dec := json.NewDecoder(r)
	for {
		var msg struct {
			Stream      string `json:"stream"`
			Error       string `json:"error"`
			ErrorDetail *struct {
				Message string `json:"message"`
			} `json:"errorDetail"`
		}
		if err := dec.Decode(&msg); err == io.EOF {
			return nil
		} else if err != nil {
			return fmt.Errorf("read build output: %w\n%s", err, out.String())
		}
		out.WriteString(msg.Stream)
		if msg.ErrorDetail != nil && msg.ErrorDetail.Message != "" {
			return fmt.Errorf("%s\n%s", msg.ErrorDetail.Message, out.String())
		}
		if msg.Error != "" {
			return fmt.Errorf("%s\n%s", msg.Error, out.String())
		}
	}
}

// engineBuildContext is the tar deploy/engine.Dockerfile expects:
// Dockerfile, the binary as "engine", deploy/engine-rootfs/data as "data/"
// and the rest of deploy/engine-rootfs as "rootfs/" (tmp/ with mode 1777).
func engineBuildContext(root, bin string) (io.Reader, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	addFile := func(name, src string, mode int64) error {
		b, err := os.ReadFile(src)
		if err != nil {
			return err
		}
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: mode, Size: int64(len(b)), Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		_, err = tw.Write(b)
		return err
	}
	if err := addFile("Dockerfile", filepath.Join(root, "deploy", "engine.Dockerfile"), 0o644); err != nil {
		return nil, err
	}
	if err := addFile("engine", bin, 0o755); err != nil {
		return nil, err
	}
	rootfs := filepath.Join(root, "deploy", "engine-rootfs")
	err := filepath.WalkDir(rootfs, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(rootfs, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		name := "rootfs/" + rel
		if rel == "data" || strings.HasPrefix(rel, "data/") {
			name = rel
		}
		if d.IsDir() {
			mode := int64(0o755)
			if rel == "tmp" {
				mode = 0o1777
			}
			return tw.WriteHeader(&tar.Header{Name: strings.TrimSuffix(name, "/.") + "/", Mode: mode, Typeflag: tar.TypeDir})
		}
		return addFile(name, p, 0o644)
	})
	if err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return &buf, nil
}

func shortID(id string) string {
	id = strings.TrimPrefix(id, "sha256:")
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// RemoveNetworkIfEmpty removes a test network (every one of that name: an
// old daemon allows duplicates) that no container uses any more; for a
// package's TestMain, so runs leave no network behind.
func RemoveNetworkIfEmpty(name string) {
	cli, err := client.New(client.FromEnv)
	if err != nil {
		return
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	nets, err := cli.NetworkList(ctx, client.NetworkListOptions{Filters: make(client.Filters).Add("name", name)})
	if err != nil {
		return
	}
	for _, n := range nets.Items {
		if n.Name != name {
			continue
		}
		users, err := cli.ContainerList(ctx, client.ContainerListOptions{All: true, Filters: make(client.Filters).Add("network", n.ID)})
		if err != nil || len(users.Items) > 0 {
			continue
		}
		_, _ = cli.NetworkRemove(ctx, n.ID, client.NetworkRemoveOptions{})
	}
}
