package testenv

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	cerrdefs "github.com/containerd/errdefs"
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
		Unavailable(t, "no Docker daemon answers: %v", err)
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
	root := RepoRoot(t)
	hash, err := engineSourceHash(root, version)
	if err != nil {
		t.Fatalf("hash engine sources: %v", err)
	}

	imageMu.Lock()
	defer imageMu.Unlock()
	if imageBuilt[ref] == hash {
		return ref
	}
	unlock := lockFile(t, "enginefleet-engine-image.lock")
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
	if err := buildEngine(ctx, root, bin, version, true); err != nil {
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

var (
	binMu   sync.Mutex
	binPath string
)

// EngineBinary builds the engine (cmd/engine, version "dev") once per test
// process and returns the binary's path, for the subprocess backend. The
// binary is cached under os.TempDir() by source hash, so parallel test
// processes share one build.
func EngineBinary(t testing.TB) string {
	t.Helper()
	binMu.Lock()
	defer binMu.Unlock()
	if binPath != "" {
		if _, err := os.Stat(binPath); err == nil {
			return binPath
		}
	}
	root := RepoRoot(t)
	hash, err := engineSourceHash(root, "dev")
	if err != nil {
		t.Fatalf("hash engine sources: %v", err)
	}
	cache := filepath.Join(os.TempDir(), "enginefleet-engine-bin")
	dir := filepath.Join(cache, hash[:16])
	p := filepath.Join(dir, "engine")
	if _, err := os.Stat(p); err == nil {
		binPath = p
		return p
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("engine binary cache: %v", err)
	}
	tmp, err := os.CreateTemp(dir, "engine-*.tmp")
	if err != nil {
		t.Fatalf("engine binary cache: %v", err)
	}
	tmp.Close()
	defer os.Remove(tmp.Name())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := buildEngine(ctx, root, tmp.Name(), "", false); err != nil {
		t.Fatalf("build engine binary: %v", err)
	}
	// Rename is atomic: a parallel process sees no binary or a whole one.
	if err := os.Rename(tmp.Name(), p); err != nil {
		t.Fatalf("engine binary cache: %v", err)
	}
	pruneOld(cache, filepath.Base(dir), 24*time.Hour)
	binPath = p
	return p
}

// buildEngine compiles cmd/engine into out (static, CGO disabled); release
// strips symbols and targets Linux, for the image.
func buildEngine(ctx context.Context, root, out, version string, release bool) error {
	args := []string{"build", "-trimpath", "-buildvcs=false", "-o", out}
	var ldflags []string
	if release {
		ldflags = append(ldflags, "-s", "-w")
	}
	if version != "" {
		ldflags = append(ldflags, "-X", "main.version="+version)
	}
	if len(ldflags) > 0 {
		args = append(args, "-ldflags", strings.Join(ldflags, " "))
	}
	args = append(args, "./cmd/engine")
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if release {
		cmd.Env = append(cmd.Env, "GOOS=linux") // the image runs on the daemon's Linux
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

// engineSourceHash hashes everything the engine image is made of.
func engineSourceHash(root, version string) (string, error) {
	var files []string
	for _, dir := range []string{"refengine", filepath.Join("cmd", "engine"), filepath.Join("deploy", "engine-rootfs")} {
		err := filepath.WalkDir(filepath.Join(root, dir), func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() {
				return nil
			}
			isGo := strings.HasSuffix(p, ".go")
			if strings.HasSuffix(p, "_test.go") || (dir != filepath.Join("deploy", "engine-rootfs") && !isGo) {
				return nil
			}
			files = append(files, p)
			return nil
		})
		if err != nil {
			return "", err
		}
	}
	files = append(files,
		filepath.Join(root, "deploy", "engine.Dockerfile"),
		filepath.Join(root, "go.mod"),
		filepath.Join(root, "go.sum"))
	sort.Strings(files)
	h := sha256.New()
	fmt.Fprintf(h, "go=%s version=%s\n", runtime.Version(), version)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return "", err
		}
		rel, _ := filepath.Rel(root, f)
		fmt.Fprintf(h, "%s %d\n", filepath.ToSlash(rel), len(b))
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// RepoRoot is the directory holding the module's go.mod, found by walking
// up from the working directory (a package's directory under go test).
func RepoRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatalf("getwd: %v", err)
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.Contains(string(b), "module github.com/enginefleet/orchestrator\n") {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatalf("no go.mod of github.com/enginefleet/orchestrator above the working directory")
		}
		dir = parent
	}
}

// lockFile takes an exclusive flock on name in os.TempDir(), waiting for
// other processes to release it; unlock releases it.
func lockFile(t testing.TB, name string) (unlock func()) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(os.TempDir(), name), os.O_CREATE|os.O_RDWR, 0o666)
	if err != nil {
		t.Fatalf("open lock file: %v", err)
	}
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX)
		if !errors.Is(err, syscall.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		t.Fatalf("lock %s: %v", f.Name(), err)
	}
	return func() {
		syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}
}

// pruneOld removes the entries of dir other than keep older than age.
func pruneOld(dir, keep string, age time.Duration) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if e.Name() == keep {
			continue
		}
		if info, err := e.Info(); err == nil && time.Since(info.ModTime()) > age {
			os.RemoveAll(filepath.Join(dir, e.Name()))
		}
	}
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
