package enginefleet

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// client.gen.go is what oapi-codegen (pinned by the tool directive in
// go.mod) generates from openapi-3.0.yaml today: `make gen` refreshes both.
func TestGeneratedClientFresh(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "client.gen.go")
	cfg, err := os.ReadFile("oapi-codegen.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "oapi-codegen.yaml")
	// Same configuration, output into the temporary directory.
	if err := os.WriteFile(cfgPath, []byte(strings.Replace(string(cfg), "output: client.gen.go", "output: "+out, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", "tool", "oapi-codegen", "-config", cfgPath, "openapi-3.0.yaml")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("oapi-codegen: %v\n%s", err, b)
	}
	want, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile("client.gen.go")
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != string(want) {
		t.Fatal("sdk/go/client.gen.go is stale: run `make gen`")
	}
}
