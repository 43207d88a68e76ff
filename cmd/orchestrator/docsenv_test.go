package main

import (
	"os"
	"regexp"
	"testing"
)

// TestProductionGuideNamesRealVariables keeps docs/production.md honest:
// every ORCH_* variable its steps tell an operator to set is one the
// orchestrator reads (a renamed or invented one would be silently ignored).
func TestProductionGuideNamesRealVariables(t *testing.T) {
	doc, err := os.ReadFile("../../docs/production.md")
	if err != nil {
		t.Fatal(err)
	}
	known := map[string]bool{
		// deploy/compose.yaml's own variables, not the orchestrator's.
		"ORCH_DOMAIN": true, "ORCH_VERSION": true,
	}
	for _, v := range envVars {
		known[v.name] = true
		known[v.name+"_FILE"] = secretVars[v.name]
	}
	names := regexp.MustCompile(`ORCH_[A-Z0-9_]*[A-Z0-9]`).FindAllString(string(doc), -1)
	if len(names) < 10 {
		t.Fatalf("found only %d ORCH_ names in docs/production.md: the pattern is wrong", len(names))
	}
	for _, n := range names {
		if !known[n] {
			t.Errorf("docs/production.md names %s, which the orchestrator does not read", n)
		}
	}
}
