package orchestrator

import "time"

// Action is an audit log action name. Names are permanent: exports and
// products' queries (GET /audit?action=) depend on them.
type Action string

// Audit actions. Each is in Actions with when it is written: docs/api.md and
// the AuditAction enum of openapi.yaml are generated from that table.
const (
	ActionProvision          Action = "provision"
	ActionProvisionFailed    Action = "provision_failed"
	ActionStart              Action = "start"
	ActionStop               Action = "stop"
	ActionWake               Action = "wake"
	ActionSleep              Action = "sleep"
	ActionRestart            Action = "restart"
	ActionUpgrade            Action = "upgrade"
	ActionDestroy            Action = "destroy"
	ActionRotateKey          Action = "rotate_key"
	ActionHealthCheck        Action = "health_check"
	ActionHealthFailed       Action = "health_failed"
	ActionAutoRestartStart   Action = "auto_restart_start"
	ActionAutoRestartSuccess Action = "auto_restart_success"
	ActionAutoRestartFailed  Action = "auto_restart_failed"
	ActionAutoRestartGaveUp  Action = "auto_restart_gave_up"
	ActionPolicyRegister     Action = "policy_register"
	ActionPolicyUpdate       Action = "policy_update"
	ActionAdmitDenied        Action = "admit_denied"
	ActionBackup             Action = "backup"
	ActionRestore            Action = "restore"
	ActionReconcile          Action = "reconcile"
	ActionPlatformKeyRotated Action = "platform_key_rotated"
	ActionMasterKeyRotated   Action = "master_key_rotated"
	// ActionAdminRequest records an admin's request made in the operator
	// console (actor "admin", metadata via, operator, request and the
	// operation it started or the code it was refused with). The
	// operation's own row (restart, backup…) records the outcome.
	ActionAdminRequest Action = "admin_request"
)

// ActionInfo is one action of the registry and when a row of it is written.
type ActionInfo struct {
	Action Action
	When   string
}

// Actions is the registry of every audit action, in the order the
// documentation lists them. An action added above must be added here (a
// test parses this file and fails otherwise).
var Actions = []ActionInfo{
	{ActionProvision, "An engine was provisioned and answered healthy (metadata: engine_version, port; duration_ms: the boot)."},
	{ActionProvisionFailed, "A provision failed (boot timeout, backend failure); the engine is failed."},
	{ActionStart, "A stopped or sleeping engine was started by request."},
	{ActionStop, "An engine was stopped by request (its brain is kept)."},
	{ActionWake, "A sleeping engine was woken by an admit with auto_wake."},
	{ActionSleep, "The idle sweep put an engine to sleep (no admit for ORCH_IDLE_AFTER_S)."},
	{ActionRestart, "An engine was restarted by request."},
	{ActionUpgrade, "An engine was recreated on another image (metadata rolled_back when the new image did not boot and the old one was put back)."},
	{ActionDestroy, "An engine, its brain and its port were removed."},
	{ActionRotateKey, "An engine's key was rotated (the previous key works until the overlap ends)."},
	{ActionHealthCheck, "A health probe succeeded (sampled, not every sweep)."},
	{ActionHealthFailed, "An engine failed ORCH_HEALTH_MAX_FAILURES probes in a row (or crashed) and is now failed."},
	{ActionAutoRestartStart, "An automatic restart of a failed engine began."},
	{ActionAutoRestartSuccess, "An automatic restart brought the engine back."},
	{ActionAutoRestartFailed, "An automatic restart failed; another is scheduled with backoff."},
	{ActionAutoRestartGaveUp, "The last automatic restart failed: the engine stays failed (admit says engine_unhealthy)."},
	{ActionPolicyRegister, "A product was registered, with its policy."},
	{ActionPolicyUpdate, "A product's policy was replaced."},
	{ActionAdmitDenied, "Admits were refused (RATE_LIMITED, QUOTA_EXCEEDED…): the first at once, then one row per product, reason and minute with a count and sample_user_ids."},
	{ActionBackup, "A brain backup was taken (metadata: size_bytes, sha256, paused_ms), or an attempt failed."},
	{ActionRestore, "A backup was restored into an engine, or the restore failed and the previous brain was put back."},
	{ActionReconcile, "Reconcile repaired drift between the rows and the backend (an orphan removed, a missing container recreated, a stuck engine failed)."},
	{ActionPlatformKeyRotated, "A product's platform key was rotated."},
	{ActionMasterKeyRotated, "The engine keys were re-encrypted under a new master key."},
	{ActionAdminRequest, "An operator made a request in the console (metadata: via, operator, request, the operation it started or the code it was refused with)."},
}

// Known reports whether a is in the registry.
func (a Action) Known() bool {
	for _, i := range Actions {
		if i.Action == a {
			return true
		}
	}
	return false
}

// Actors other than a product slug.
const (
	ActorSystem = "system"
	ActorAdmin  = "admin"
)

// AuditEntry is one row of the append-only audit log.
type AuditEntry struct {
	ID         int64
	Timestamp  time.Time
	ProductID  string // empty for fleet-wide actions
	UserID     string
	EngineID   string
	Action     Action
	Actor      string
	Metadata   map[string]any
	DurationMS *int64
}
