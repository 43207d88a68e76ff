package api

import (
	"context"
	"net/http"
	"time"

	"github.com/danielgtaylor/huma/v2"

	"github.com/enginefleet/orchestrator/schema"
)

type healthOutput struct {
	Status int `json:"-"`
	Body   struct {
		Status string `json:"status" enum:"ok,unavailable" doc:"ok when the process is up, Postgres reachable and migrations applied"`
		Reason string `json:"reason,omitempty" doc:"Why the orchestrator is not ok"`
	}
}

func (s *Server) registerHealth() {
	huma.Register(s.api, huma.Operation{
		OperationID: "health",
		Method:      http.MethodGet,
		Path:        "/health",
		Summary:     "Liveness and readiness",
		Description: "200 {\"status\":\"ok\"} when the process is up, Postgres is reachable and every migration is applied; 503 otherwise. No authentication.",
		Tags:        []string{"operations"},
		Metadata:    codes(),
		Responses:   map[string]*huma.Response{"503": {Description: "Postgres unreachable or migrations not applied"}},
	}, func(ctx context.Context, _ *struct{}) (*healthOutput, error) {
		out := &healthOutput{Status: http.StatusOK}
		out.Body.Status = "ok"
		if reason := s.unready(ctx); reason != "" {
			out.Status = http.StatusServiceUnavailable
			out.Body.Status = "unavailable"
			out.Body.Reason = reason
		}
		return out, nil
	})
}

// unready returns why the API cannot serve, or "" when it can. Migrations
// only move forward, so once seen applied they are not checked again.
func (s *Server) unready(ctx context.Context) string {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := s.pool.Ping(ctx); err != nil {
		return "postgres unreachable"
	}
	if !s.migrated.Load() {
		ok, err := schema.Current(ctx, s.pool)
		if err != nil {
			return "postgres unreachable"
		}
		if !ok {
			return "migrations not applied"
		}
		s.migrated.Store(true)
	}
	return ""
}
