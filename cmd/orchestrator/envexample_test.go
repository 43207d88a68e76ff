package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite golden files")

// envExample renders .env.example from the one list of variables.
func envExample() string {
	var b strings.Builder
	b.WriteString("# Every variable the orchestrator reads, with its default. Generated from\n")
	b.WriteString("# cmd/orchestrator/config.go: go test ./cmd/orchestrator -run EnvExample -update\n\n")
	for _, v := range envVars {
		fmt.Fprintf(&b, "# %s\n", v.help)
		if v.def == "" {
			fmt.Fprintf(&b, "%s=\n\n", v.name)
		} else {
			fmt.Fprintf(&b, "%s=%s\n\n", v.name, quoteEnv(v.def))
		}
	}
	return b.String()
}

func quoteEnv(s string) string {
	if strings.ContainsAny(s, " *{}") {
		return "'" + s + "'"
	}
	return s
}

func TestEnvExampleDocumentsEveryVariable(t *testing.T) {
	const path = "../../.env.example"
	want := envExample()
	if *update {
		if err := os.WriteFile(path, []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != want {
		t.Fatal(".env.example is stale: go test ./cmd/orchestrator -run EnvExample -update")
	}
}
