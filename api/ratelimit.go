package api

import (
	"context"

	orch "github.com/enginefleet/orchestrator"
)

// rateLimit takes one admit permit for the product. limit is 0 when the
// product has no rate limit. RATE_LIMITED (with Retry-After) when exhausted.
// TODO(issue 3): shared across replicas.
func (s *Server) rateLimit(ctx context.Context, p orch.Product) (limit, remaining int, err error) {
	return 0, 0, nil
}
