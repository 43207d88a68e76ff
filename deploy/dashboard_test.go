package deploy

import (
	"context"
	"encoding/json"
	"os"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/enginefleet/orchestrator/metrics"
)

// fullSource is a snapshot with every fleet gauge present.
type fullSource struct{}

func (fullSource) MetricsSnapshot(context.Context, int, int) (metrics.Snapshot, error) {
	age := time.Hour
	return metrics.Snapshot{PostgresUp: true, Migrated: true,
		Engines:   []metrics.EngineCount{{Product: "p", State: "running", N: 1}},
		PortsUsed: map[string]int{"local": 1}, Jobs: []metrics.JobCount{{Queue: "q", State: "available", N: 1}},
		AuditBytes: 1, BackupAge: &age}, nil
}

// exported lists the metric names the orchestrator exposes (histograms
// with their _bucket, _count and _sum series).
func exported(t *testing.T) map[string]bool {
	t.Helper()
	m := metrics.New(metrics.Config{Source: fullSource{}, PortMin: 1, PortMax: 2})
	m.ObserveAdmit(metrics.AdmitWarm, time.Millisecond)
	m.ObserveRequest("GET", "/status", 200, time.Millisecond)
	m.ObserveJob("k", "completed", time.Millisecond)
	m.Lifecycle("provision", false, time.Second)
	mfs, err := m.Gatherer().Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		n := mf.GetName()
		names[n] = true
		if mf.GetType().String() == "HISTOGRAM" {
			names[n+"_bucket"], names[n+"_count"], names[n+"_sum"] = true, true, true
		}
	}
	return names
}

var metricName = regexp.MustCompile(`\borchestrator_[a-z0-9_]+`)

// The Grafana dashboard is valid JSON whose every panel queries metrics
// the orchestrator exports, and it shows what operators need: fleet by
// state, admit latency by outcome, restarts, boot time, port usage,
// queue depth. The alert rules name only exported metrics too.
func TestDashboardAndRulesUseExportedMetrics(t *testing.T) {
	t.Parallel()
	names := exported(t)
	raw, err := os.ReadFile("grafana/fleet.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		UID    string `json:"uid"`
		Title  string `json:"title"`
		Panels []struct {
			Type    string `json:"type"`
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("fleet.json: %v", err)
	}
	if dash.UID == "" || dash.Title == "" {
		t.Error("dashboard needs a uid and a title")
	}
	used := map[string]bool{}
	for _, p := range dash.Panels {
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			ms := metricName.FindAllString(tg.Expr, -1)
			if len(ms) == 0 && !strings.Contains(tg.Expr, "up{") {
				t.Errorf("panel %q queries no orchestrator metric: %s", p.Title, tg.Expr)
			}
			for _, n := range ms {
				used[n] = true
			}
		}
	}
	for _, want := range []string{"orchestrator_engines", "orchestrator_admit_duration_seconds_bucket",
		"orchestrator_engine_restarts_total", "orchestrator_engine_boot_duration_seconds_bucket",
		"orchestrator_port_range_usage_ratio", "orchestrator_river_jobs"} {
		if !used[want] {
			t.Errorf("dashboard does not show %s", want)
		}
	}
	rules, err := os.ReadFile("prometheus/alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range metricName.FindAllString(string(rules), -1) {
		used[n] = true
	}
	var unknown []string
	for n := range used {
		if !names[n] {
			unknown = append(unknown, n)
		}
	}
	sort.Strings(unknown)
	if len(unknown) > 0 {
		t.Errorf("dashboard or alerts name metrics the orchestrator does not export: %v", unknown)
	}
}
