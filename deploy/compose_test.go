package deploy

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/enginefleet/orchestrator/internal/testenv"
)

// deploy/compose.yaml is a valid compose file (checked by the compose tool
// itself) with the production shape the docs promise.
func TestComposeConfig(t *testing.T) {
	tool, args := "docker-compose", []string{}
	if _, err := exec.LookPath(tool); err != nil {
		if exec.Command("docker", "compose", "version").Run() != nil {
			testenv.Unavailable(t, "no compose tool (docker-compose or docker compose)")
		}
		tool, args = "docker", []string{"compose"}
	}
	dir := t.TempDir()
	// The secrets the file names must exist for `config` to pass.
	secrets := filepath.Join(dir, "secrets")
	if err := os.MkdirAll(secrets, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"database_url", "database_url_host", "master_key", "admin_key", "postgres_password"} {
		os.WriteFile(filepath.Join(secrets, f), []byte("x"), 0o600) //nolint:errcheck
	}
	src, err := os.ReadFile("compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "compose.yaml"), src, 0o644); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "Caddyfile"), []byte(""), 0o644) //nolint:errcheck
	cmd := exec.Command(tool, append(args, "-f", filepath.Join(dir, "compose.yaml"), "config")...)
	cmd.Env = append(os.Environ(), "DOCKER_GID=999")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s config: %v\n%s", tool, err, out)
	}
	cfg := string(out)
	for _, svc := range []string{"postgres:", "migrate:", "api-1:", "api-2:", "worker-1:", "worker-2:", "scheduler-1:", "scheduler-2:", "caddy:"} {
		if !strings.Contains(cfg, "  "+svc) {
			t.Errorf("compose config lacks service %s", svc)
		}
	}
	// The Docker socket only where workers need it.
	if n := strings.Count(cfg, "/var/run/docker.sock:/var/run/docker.sock"); n != 2 {
		t.Errorf("docker.sock mounted %d times; want only on the two workers", n)
	}
	// Workers write backups and audit exports: both on volumes.
	for _, dir := range []string{"/var/lib/enginefleet/backups", "/var/lib/enginefleet/audit-exports"} {
		// docker-compose 1.x prints short volume syntax, compose v2 long.
		if n := strings.Count(cfg, ":"+dir+":") + strings.Count(cfg, "target: "+dir+"\n"); n != 2 {
			t.Errorf("%s mounted %d times; want on the two workers", dir, n)
		}
	}
	// Engines' isolation: no service joins the engines' network (engines
	// could reach it, and with inter-container traffic off it could not
	// reach them); the workers probe engines from the host's namespace,
	// where engines publish on 127.0.0.1, and listen there on loopback only.
	if strings.Contains(cfg, "name: engine_net") || strings.Contains(cfg, "  engines:") {
		t.Error("a service joins the engines' network")
	}
	if n := strings.Count(cfg, "network_mode: host"); n != 2 {
		t.Errorf("network_mode: host on %d services; want the two workers", n)
	}
	for _, addr := range []string{"ORCH_METRICS_ADDR: 127.0.0.1:9465", "ORCH_METRICS_ADDR: 127.0.0.1:9466"} {
		if !strings.Contains(cfg, addr) {
			t.Errorf("a worker's metrics must listen on the host's loopback (%s)", addr)
		}
	}
	if n := strings.Count(cfg, "ORCH_METRICS_ADDR: :9464"); n != 4 {
		t.Errorf("metrics on all interfaces in %d services; want only the four on the internal network", n)
	}
	if !strings.Contains(cfg, "127.0.0.1:5432:5432") && !strings.Contains(cfg, "host_ip: 127.0.0.1") {
		t.Error("Postgres must be published for the workers on the host's loopback only")
	}
	if strings.Contains(cfg, "{container}") {
		t.Error("engines are not reachable by container name: their network has inter-container traffic off")
	}
	if strings.Contains(cfg, "ORCH_MASTER_KEY:") || strings.Contains(cfg, "ORCH_ADMIN_KEY:") {
		t.Error("secrets must come from *_FILE variables, not inline")
	}
}
