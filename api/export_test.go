package api

import orch "github.com/enginefleet/orchestrator"

// Undocument removes a code from what the server believes openapi.yaml
// documents for an operation: a drift, for the test that shows the
// run-time check catches one.
func (s *Server) Undocument(operationID string, status int, code orch.Code) {
	delete(s.documented[operationID][status], code)
}
