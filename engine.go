package orchestrator

import (
	"strconv"
	"strings"
	"time"
)

// Engine is one user's engine as the orchestrator records it.
type Engine struct {
	ID               string
	ProductID        string
	UserID           string
	Status           State
	Node             string
	Port             int
	EngineVersion    string // the image (docker) or binary version (subprocess)
	KeyHash          string // hex SHA-256 of the engine key
	KeyEnc           string // Fernet token of the engine key under the master key
	PrevKeyHash      string // previous key's hash during a rotation overlap
	PrevKeyExpiresAt *time.Time
	BootDurationMS   *int64
	HealthFailures   int
	RestartAttempts  int
	LastHealthAt     *time.Time
	LastActiveAt     *time.Time
	SleepReason      string
	SleptAt          *time.Time
	StateDeadline    *time.Time
	OperationID      string // the operation in flight, if any
	LastError        string
	CreatedAt        time.Time
	UpdatedAt        time.Time
}

// ContainerName is the deterministic backend name of an engine.
func ContainerName(engineID string) string { return "engine-" + engineID }

// EngineURL renders an engine URL template (ORCH_ENGINE_URL_TEMPLATE and
// the probe template): {port} (the host port, 0 on backends without one),
// {container} and {service} (the engine's backend name: container, or the
// kubernetes Service), {engine_id}, {node} and {namespace} (the kubernetes
// backend's engine namespace, "" elsewhere).
func EngineURL(template string, e Engine, namespace string) string {
	name := ContainerName(e.ID)
	return strings.NewReplacer("{port}", strconv.Itoa(e.Port), "{container}", name, "{service}", name,
		"{engine_id}", e.ID, "{node}", e.Node, "{namespace}", namespace).Replace(template)
}

// VolumeName is the deterministic name of an engine's brain volume.
func VolumeName(engineID string) string { return "engine-data-" + engineID }

// Operation kinds: one per lifecycle job.
type OpKind string

// Operation kinds, permanent names.
const (
	OpProvision OpKind = "provision"
	OpStart     OpKind = "start"
	OpStop      OpKind = "stop"
	OpRestart   OpKind = "restart"
	OpRotateKey OpKind = "rotate_key"
	OpUpgrade   OpKind = "upgrade"
	OpDestroy   OpKind = "destroy"
	OpWake      OpKind = "wake"
	OpBackup    OpKind = "backup"
	OpRestore   OpKind = "restore"
)

// OpStatus is where an asynchronous operation stands.
type OpStatus string

// Operation statuses.
const (
	OpPending   OpStatus = "pending"
	OpRunning   OpStatus = "running"
	OpSucceeded OpStatus = "succeeded"
	OpFailed    OpStatus = "failed"
)

// Done reports whether the operation has finished.
func (s OpStatus) Done() bool { return s == OpSucceeded || s == OpFailed }

// Operation is a lifecycle request in flight or finished.
type Operation struct {
	ID           string
	ProductID    string
	EngineID     string
	UserID       string
	Kind         OpKind
	Actor        string // "system", "admin" or the product slug
	Status       OpStatus
	ErrorCode    Code
	ErrorMessage string
	// Deadline is when the operation must have ended, whatever happens to
	// its job (see OperationDeadline); the operation sweep ends it then.
	Deadline  time.Time
	CreatedAt time.Time
	UpdatedAt time.Time
}

// OperationDeadline is the bound on an operation whose job may start at
// start: room for two full attempts of a job that stops an engine (30 s
// grace) and boots it twice (upgrade, rotate-key and restore roll back by
// booting again), their retry delays, and a few minutes of queueing. An
// operation still unfinished then is failed (destroy is finished), and its
// job cancelled.
func OperationDeadline(start time.Time, bootTimeout time.Duration) time.Time {
	return start.Add(2*(30*time.Second+2*bootTimeout+30*time.Second) + 5*time.Minute)
}
