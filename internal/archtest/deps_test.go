// Package archtest checks the architecture's dependency rules
// (docs/architecture.md): cmd → server → {api, workers, scheduler} → lifecycle →
// {schema, backend} → {jobs, metrics} → root; api and lifecycle never
// import backend or workers; only backend/docker
// imports the Docker SDK; the root package uses the standard library only.
package archtest

import (
	"encoding/json"
	"os/exec"
	"strings"
	"testing"
)

const mod = "github.com/enginefleet/orchestrator"

type pkg struct {
	ImportPath string
	Imports    []string
}

func listPackages(t *testing.T) []pkg {
	t.Helper()
	out, err := exec.Command("go", "list", "-json", mod+"/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	var pkgs []pkg
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for dec.More() {
		var p pkg
		if err := dec.Decode(&p); err != nil {
			t.Fatal(err)
		}
		pkgs = append(pkgs, p)
	}
	return pkgs
}

// layer of a project package: higher layers may import lower ones only.
func layer(path string) (string, int) {
	rel := strings.TrimPrefix(strings.TrimPrefix(path, mod), "/")
	if strings.HasSuffix(rel, "/dockertest") {
		return "dockertest", 9 // test support for the suites that run Docker
	}
	if rel == "internal/generations" {
		return "generations", 0 // a bounded map, standard library only
	}
	top := strings.SplitN(rel, "/", 2)[0]
	switch top {
	case "":
		return "root", 0
	case "atomicfile":
		return "atomicfile", 0 // standard library only, below everything
	case "keys":
		return "keys", 1
	case "jobs":
		return "jobs", 1
	case "auditlog":
		return "auditlog", 1
	case "metrics":
		return "metrics", 1
	case "schema":
		return "schema", 2
	case "backend":
		return "backend", 2
	case "lifecycle":
		return "lifecycle", 3 // the request side's core: above schema, below api and workers
	case "webhooks":
		return "webhooks", 3 // webhook endpoints (request side) and delivery (its own River queue); never a backend
	case "console":
		return "console", 3 // the operator console: reads schema, acts through an interface api implements
	case "api", "workers", "scheduler":
		return top, 4
	case "server":
		return "server", 5 // one process: wires the roles together
	case "cmd", "e2e", "internal", "sdk", "deploy":
		return top, 9
	}
	return top, 9
}

func TestDependencyDirection(t *testing.T) {
	for _, p := range listPackages(t) {
		name, l := layer(p.ImportPath)
		for _, imp := range p.Imports {
			if strings.HasPrefix(imp, "github.com/docker/") || strings.HasPrefix(imp, "github.com/moby/moby/") {
				if !strings.HasPrefix(p.ImportPath, mod+"/backend/docker") {
					t.Errorf("%s imports the Docker SDK (%s): only backend/docker may", p.ImportPath, imp)
				}
			}
			if name == "root" && strings.Contains(strings.SplitN(imp, "/", 2)[0], ".") {
				t.Errorf("root package imports %s: it must use the standard library only", imp)
			}
			if !strings.HasPrefix(imp, mod) {
				continue
			}
			iname, il := layer(imp)
			if (name == "api" || name == "lifecycle" || name == "console" || name == "webhooks") && (iname == "backend" || iname == "workers" || iname == "scheduler") {
				t.Errorf("%s imports %s: api never drives a backend", p.ImportPath, imp)
			}
			if il >= l && iname != name && l < 9 {
				t.Errorf("%s (layer %s) imports %s (layer %s): dependencies point down only", p.ImportPath, name, imp, iname)
			}
		}
	}
}
