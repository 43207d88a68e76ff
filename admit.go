package orchestrator

// AdmitReason says why an admit did not admit the user (admitted: false).
// The words are part of the HTTP contract: never rename one.
type AdmitReason string

// Admit reasons.
const (
	ReasonEngineNotFound  AdmitReason = "engine_not_found" // no engine and no auto_provision
	ReasonEngineSleeping  AdmitReason = "engine_sleeping"  // sleeping or stopped and no auto_wake
	ReasonEngineUnhealthy AdmitReason = "engine_unhealthy" // failed and not being restarted
)
