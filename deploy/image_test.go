package deploy

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"github.com/enginefleet/orchestrator/backend/docker/dockertest"

	"github.com/enginefleet/orchestrator/internal/testenv"
)

// The orchestrator image runs as uid 65532, and compose.yaml mounts fresh
// named volumes at its backup and audit export directories: they must
// inherit the image's ownership, or every backup fails with EACCES.
func TestOrchestratorImageVolumesWritable(t *testing.T) {
	dockertest.RequireDocker(t)
	b := make([]byte, 4)
	rand.Read(b) //nolint:errcheck
	suffix := hex.EncodeToString(b)
	tag := "enginefleet/orchestrator:deploytest"
	run := func(name string, args ...string) string {
		t.Helper()
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return strings.TrimSpace(string(out))
	}
	run("make", "-C", "..", "orchestrator-image", "VERSION=deploytest")
	t.Cleanup(func() { exec.Command("docker", "image", "rm", tag).Run() }) //nolint:errcheck

	for _, dir := range []string{"/var/lib/enginefleet/backups", "/var/lib/enginefleet/audit-exports"} {
		vol := "enginefleet-deploytest-" + suffix + "-" + strings.TrimPrefix(dir[strings.LastIndex(dir, "/"):], "/")
		run("docker", "volume", "create", "--label", "enginefleet.test=deploy", vol)
		t.Cleanup(func() { exec.Command("docker", "volume", "rm", "-f", vol).Run() }) //nolint:errcheck
		run("docker", "run", "--rm", "-v", vol+":"+dir, tag, "version")
		mp := run("docker", "volume", "inspect", "-f", "{{.Mountpoint}}", vol)
		fi, err := os.Stat(mp)
		if err != nil {
			testenv.Unavailable(t, "the volume's mountpoint is not visible from here: %v", err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		if st.Uid != 65532 || st.Gid != 65532 {
			t.Errorf("%s: a fresh volume is owned by %d:%d, want 65532:65532", dir, st.Uid, st.Gid)
		}
	}
}
