package kubeenv

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// A directory whose test process is gone is removed, and the processes
// started for it are killed; one whose process lives is left alone.
func TestReapStale(t *testing.T) {
	root := t.TempDir()
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(root, "run-stale")
	live := filepath.Join(root, "run-live")
	for dir, owner := range map[string]int{stale: dead.Process.Pid, live: os.Getpid()} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "owner"), []byte(strconv.Itoa(owner)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	leftover := exec.Command("sh", "-c", "sleep 60", stale) // the directory in its command line
	if err := leftover.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { leftover.Wait(); close(exited) }()
	recordPid(stale, leftover.Process.Pid)

	reapStale(root, t.Logf)
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
		leftover.Process.Kill()
		t.Fatal("leftover process of the stale run not killed")
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Errorf("stale directory still there: %v", err)
	}
	if _, err := os.Stat(live); err != nil {
		t.Errorf("a running test's directory was removed: %v", err)
	}
}
