package orchestrator

import "time"

// Action is an audit log action name (SPEC §10). Names are permanent.
type Action string

// Audit actions of the contract and ours.
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
