package orchestrator_test

import (
	"testing"

	orch "github.com/enginefleet/orchestrator"
)

func TestEngineURL(t *testing.T) {
	e := orch.Engine{ID: "3f0c", Node: "n1", Port: 9001}
	for tmpl, want := range map[string]string{
		"http://127.0.0.1:{port}":                "http://127.0.0.1:9001",
		"http://{container}:8000":                "http://engine-3f0c:8000",
		"http://{service}.{namespace}.svc:8000":  "http://engine-3f0c.fleet.svc:8000",
		"https://{node}.example.com/{engine_id}": "https://n1.example.com/3f0c",
	} {
		if got := orch.EngineURL(tmpl, e, "fleet"); got != want {
			t.Errorf("EngineURL(%q) = %q, want %q", tmpl, got, want)
		}
	}
}
