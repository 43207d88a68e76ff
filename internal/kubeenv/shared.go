package kubeenv

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/enginefleet/orchestrator/internal/testenv"
)

// Binaries is what scripts/kube.sh builds.
var Binaries = []string{"etcd", "kube-apiserver", "kube-scheduler", "kube-controller-manager", "kwok"}

// EnsureBinaries returns the directory of the control plane binaries,
// running scripts/kube.sh to build them when they are missing (about 20
// minutes with empty Go caches; the script waits for a build another
// process started).
func EnsureBinaries(ctx context.Context, logf func(string, ...any)) (string, error) {
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	script := filepath.Join(root, "scripts", "kube.sh")
	out, err := exec.CommandContext(ctx, script, "bin").Output()
	if err != nil {
		return "", fmt.Errorf("%s bin: %w", script, err)
	}
	bin := strings.TrimSpace(string(out))
	if haveBinaries(bin) {
		return bin, nil
	}
	logf("kubeenv: control plane binaries missing in %s; building them with scripts/kube.sh (minutes)", bin)
	cmd := exec.CommandContext(ctx, script)
	var log strings.Builder
	cmd.Stderr = &log
	out, err = cmd.Output()
	if err != nil {
		tail := log.String()
		if len(tail) > 3000 {
			tail = tail[len(tail)-3000:]
		}
		return "", fmt.Errorf("scripts/kube.sh: %w\n%s", err, tail)
	}
	lines := strings.Fields(string(out))
	if len(lines) > 0 {
		bin = lines[len(lines)-1]
	}
	if !haveBinaries(bin) {
		return "", fmt.Errorf("scripts/kube.sh succeeded but %s lacks the binaries", bin)
	}
	return bin, nil
}

func haveBinaries(dir string) bool {
	for _, b := range Binaries {
		fi, err := os.Stat(filepath.Join(dir, b))
		if err != nil || fi.Mode().Perm()&0o111 == 0 {
			return false
		}
	}
	return true
}

// repoRoot is the directory holding the module's go.mod, found by walking
// up from the working directory.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.Contains(string(b), "module github.com/enginefleet/orchestrator\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod of github.com/enginefleet/orchestrator above the working directory")
		}
		dir = parent
	}
}

var (
	sharedMu  sync.Mutex
	shared    *Env
	sharedErr error
)

// Run runs a test package's tests (call it from TestMain) and then stops
// the package's shared control plane, if a test started one.
func Run(m *testing.M) int {
	code := m.Run()
	sharedMu.Lock()
	defer sharedMu.Unlock()
	if shared != nil {
		shared.Close()
		shared = nil
	}
	return code
}

// Require returns the process's shared control plane, starting it on first
// use. When it cannot be had (the binaries cannot be built, a process does
// not come up) the test is skipped, or fails when CI=true
// (testenv.Unavailable). A package using it must call Run from TestMain.
func Require(t testing.TB) *Env {
	t.Helper()
	sharedMu.Lock()
	defer sharedMu.Unlock()
	if shared == nil && sharedErr == nil {
		// The build may take minutes: bounded by the test binary's own
		// -timeout, not here.
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Minute)
		// Progress goes to the test that starts the control plane; what the
		// provisioner says later, when that test may be over, to stderr.
		var starting atomic.Bool
		starting.Store(true)
		shared, sharedErr = Start(ctx, Options{Logf: func(f string, a ...any) {
			if starting.Load() {
				t.Log(fmt.Sprintf(f, a...))
				return
			}
			fmt.Fprintf(os.Stderr, f+"\n", a...)
		}})
		starting.Store(false)
		cancel()
	}
	if sharedErr != nil {
		testenv.Unavailable(t, "kubernetes control plane: %v", sharedErr)
	}
	return shared
}
