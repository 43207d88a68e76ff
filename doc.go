// Package orchestrator holds the domain of the engine fleet orchestrator:
// products (tenants), engines and their state machine, policies, audit
// actions, the backend contract and the stable error codes the HTTP API
// returns. It depends on the standard library only; every other package
// speaks in these types.
package orchestrator
