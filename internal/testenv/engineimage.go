package testenv

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
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
)

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
	hash, err := EngineSourceHash(root, "dev")
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
	if err := BuildEngine(ctx, root, tmp.Name(), "", false); err != nil {
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
// BuildEngine builds the reference engine binary to out (static,
// -trimpath, main.version=version; release strips it).
func BuildEngine(ctx context.Context, root, out, version string, release bool) error {
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
// EngineSourceHash hashes what the reference engine is built from.
func EngineSourceHash(root, version string) (string, error) {
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
// LockFile serialises test processes on a lock file in os.TempDir().
func LockFile(t testing.TB, name string) (unlock func()) {
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
