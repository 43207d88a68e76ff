package webhooks

import (
	"encoding/json"
	"time"
)

// Version is the event schema's version, sent in every event. A change
// that breaks a receiver gets a new version; fields are only ever added
// within one.
const Version = 1

// Event types. The audit action → type mapping is webhook_event_type in
// migration 0032 (a test holds the two together).
const (
	EngineProvisioned = "engine.provisioned"
	EngineFailed      = "engine.failed"
	EngineCrashed     = "engine.crashed"
	EngineRestarted   = "engine.restarted"
	EngineGaveUp      = "engine.gave_up"
	EngineSlept       = "engine.slept"
	EngineWoke        = "engine.woke"
	EngineUpgraded    = "engine.upgraded"
	EngineDestroyed   = "engine.destroyed"
	BackupCompleted   = "backup.completed"
	BackupFailed      = "backup.failed"
	RestoreCompleted  = "restore.completed"
)

// Types are the event types an endpoint may subscribe to.
var Types = []string{EngineProvisioned, EngineFailed, EngineCrashed, EngineRestarted, EngineGaveUp, EngineSlept,
	EngineWoke, EngineUpgraded, EngineDestroyed, BackupCompleted, BackupFailed, RestoreCompleted}

// RolloutPrefix is the prefix of rollout events: an audit action
// rollout_<what> becomes the event rollout.<what> (the trigger maps it),
// and an endpoint may subscribe to a rollout type once rollouts name it
// (IsType accepts the prefix).
const RolloutPrefix = "rollout."

// IsType reports whether t is an event type an endpoint may ask for.
func IsType(t string) bool {
	for _, x := range Types {
		if x == t {
			return true
		}
	}
	return len(t) > len(RolloutPrefix) && t[:len(RolloutPrefix)] == RolloutPrefix
}

// Event is the body of every webhook POST (version 1).
type Event struct {
	ID        string          `json:"id"`       // the dedupe key: the same on every delivery and redelivery
	Type      string          `json:"type"`     // engine.crashed, …
	Version   int             `json:"version"`  // Version
	Sequence  int64           `json:"sequence"` // increases with the time of recording across the fleet
	Time      time.Time       `json:"time"`     // when it happened (the audit row's time)
	ProductID string          `json:"product_id"`
	Product   string          `json:"product"` // the product's slug
	UserID    string          `json:"user_id,omitempty"`
	EngineID  string          `json:"engine_id,omitempty"`
	Data      json.RawMessage `json:"data"` // the audit row's metadata (never a key) with action, actor, duration_ms
}
