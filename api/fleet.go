package api

import (
	"context"
	"math"
	"net/http"

	"github.com/danielgtaylor/huma/v2"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/schema"
)

// StatusBody is GET /status.
type StatusBody struct {
	Total          int            `json:"total" doc:"Engines of the product, in any state"`
	ByStatus       map[string]int `json:"by_status" doc:"Engine count per state"`
	Health         string         `json:"health" enum:"ok,degraded,critical" doc:"ok: no engine failed; degraded: some; critical: at least 10 %"`
	UnhealthyCount int            `json:"unhealthy_count" doc:"Engines in state failed"`
}

// MetricsBody is GET /metrics (rolling hour, from the audit log).
type MetricsBody struct {
	Provisions1h    int64   `json:"provisions_1h"`
	Crashes1h       int64   `json:"crashes_1h" doc:"Engines that failed their health checks in the last hour"`
	Restarts1h      int64   `json:"restarts_1h" doc:"Manual and automatic restarts in the last hour"`
	AvgBootMS       float64 `json:"avg_boot_ms" doc:"Mean boot time of the last hour's provisions"`
	TotalProvisions int64   `json:"total_provisions"`
	TotalDestroys   int64   `json:"total_destroys"`
}

// fleetHealth classifies a fleet: ok with no failed engine, critical at
// 10 % or more failed, degraded in between.
func fleetHealth(total, failed int) string {
	switch {
	case failed == 0:
		return "ok"
	case float64(failed) >= 0.1*float64(total):
		return "critical"
	default:
		return "degraded"
	}
}

func (s *Server) registerFleet() {
	huma.Register(s.api, huma.Operation{
		OperationID: "fleet-status", Method: http.MethodGet, Path: "/status",
		Summary: "The product's fleet by state and its health", Security: platformSecurity, Tags: []string{"fleet"},
		Metadata: codes(),
	}, func(ctx context.Context, _ *struct{}) (*struct{ Body StatusBody }, error) {
		counts, err := schema.New(s.pool).StatusCounts(ctx, productFrom(ctx).ID)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		out := &struct{ Body StatusBody }{}
		out.Body.ByStatus = map[string]int{}
		for _, st := range orch.States {
			out.Body.ByStatus[string(st)] = counts[st]
			out.Body.Total += counts[st]
		}
		out.Body.UnhealthyCount = counts[orch.StateFailed]
		out.Body.Health = fleetHealth(out.Body.Total, out.Body.UnhealthyCount)
		return out, nil
	})

	huma.Register(s.api, huma.Operation{
		OperationID: "fleet-metrics", Method: http.MethodGet, Path: "/metrics",
		Summary: "Rolling-hour activity and lifetime totals, from the audit log", Security: platformSecurity, Tags: []string{"fleet"},
		Metadata: codes(),
	}, func(ctx context.Context, _ *struct{}) (*struct{ Body MetricsBody }, error) {
		m, err := schema.New(s.pool).ProductMetrics(ctx, productFrom(ctx).ID)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		return &struct{ Body MetricsBody }{Body: MetricsBody{Provisions1h: m.Provisions1h, Crashes1h: m.Crashes1h,
			Restarts1h: m.Restarts1h, AvgBootMS: math.Round(m.AvgBootMS*10) / 10, TotalProvisions: m.TotalProvisions,
			TotalDestroys: m.TotalDestroys}}, nil
	})
}
