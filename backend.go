package orchestrator

import (
	"context"
	"errors"
	"io"
	"time"
)

// Labels put on every backend object the orchestrator creates, so that
// reconcile can find its own and leave everything else alone.
const (
	LabelManaged   = "orchestrator.managed"    // "true"
	LabelEngineID  = "orchestrator.engine_id"  // engine uuid
	LabelProductID = "orchestrator.product_id" // product uuid
	LabelNode      = "orchestrator.node"       // node name
	// LabelFleet is the id of the fleet (one per database) that made the
	// object: deployments sharing a host only ever consider their own.
	// Objects of older versions have none.
	LabelFleet = "orchestrator.fleet"
)

// EngineSpec is everything a backend needs to run one engine.
type EngineSpec struct {
	EngineID  string
	ProductID string
	Node      string
	Image     string            // docker image or path/version of the engine binary
	HostPort  int               // published on 127.0.0.1:HostPort
	Env       map[string]string // ENGINE_KEY_HASH, SQLITE_DB_PATH, CATALOG_DIR, passthrough, overlap vars
}

// RuntimeState is what the backend reports of an engine's container/process.
type RuntimeState string

// Runtime states reported by backends.
const (
	RuntimeMissing RuntimeState = "missing" // no container / process record
	RuntimeCreated RuntimeState = "created" // exists, never started
	RuntimeRunning RuntimeState = "running"
	RuntimePaused  RuntimeState = "paused"
	RuntimeExited  RuntimeState = "exited" // stopped, crashed or killed
)

// RuntimeInfo describes one managed engine runtime.
type RuntimeInfo struct {
	EngineID  string
	ProductID string
	Name      string
	State     RuntimeState
	Image     string
	HostPort  int
	ExitCode  int
	OOMKilled bool
	CreatedAt time.Time
	// Unisolated is true for a container on a network where containers
	// can reach each other (made by an older version): reconcile recreates
	// a running one, which puts it on the engines' isolated network.
	Unisolated bool
	// NoFleet is true for a container without a fleet label (made by an
	// older version), which may be another deployment's: reconcile adopts
	// it when this fleet's database has its engine row and never removes
	// it otherwise.
	NoFleet bool
}

// VolumeInfo describes one managed brain volume (or data directory).
type VolumeInfo struct {
	EngineID  string
	Name      string
	CreatedAt time.Time
	NoFleet   bool // no fleet label: see RuntimeInfo.NoFleet
}

// ErrImageUnavailable is wrapped by Ensure when the engine image is neither
// present nor obtainable: retrying will not help, someone must publish the
// image (or fix the engine_version).
var ErrImageUnavailable = errors.New("engine image unavailable")

// ErrPortUnavailable is wrapped by Start when the host refuses the engine's
// host port (another program listens there, or a container this deployment
// does not know publishes it): the workers move the engine to a free port.
var ErrPortUnavailable = errors.New("host port unavailable")

// DataCopier is implemented by a backend that says whether it can copy
// brain volumes (Pause, CopyDataOut, CopyDataIn). One that cannot
// (kubernetes) has its brains backed up and restored through the engine's
// GET /memory/export and POST /memory/import instead. A backend that does
// not implement DataCopier can.
type DataCopier interface {
	CopiesData() bool
}

// RuntimeEvent is a runtime change observed by the backend (crash, OOM).
type RuntimeEvent struct {
	EngineID string
	Kind     string // "die", "oom", "start", "stop"
	ExitCode int
	Time     time.Time
}

// Backend runs engines. Every method is idempotent and keyed by the engine
// id, so a retried job never creates a second container or loses a volume.
// Implementations: backend/docker (production) and backend/subprocess.
type Backend interface {
	// Name is "docker" or "subprocess".
	Name() string
	// Ensure creates the volume (if missing) and the container for spec,
	// adopting an existing container whose configuration matches and
	// replacing one that does not (different image, env or port). It does
	// not start it. The volume is never removed by Ensure.
	Ensure(ctx context.Context, spec EngineSpec) error
	// Start starts the engine's container; starting a running one is a no-op.
	// A host port the host refuses is ErrPortUnavailable in the chain.
	Start(ctx context.Context, engineID string) error
	// Stop sends SIGTERM and waits up to grace, then SIGKILL. Stopping a
	// stopped or missing one is a no-op.
	Stop(ctx context.Context, engineID string, grace time.Duration) error
	// RemoveContainer removes the container (not the volume); missing is a no-op.
	RemoveContainer(ctx context.Context, engineID string) error
	// RemoveVolume removes the brain volume; missing is a no-op.
	RemoveVolume(ctx context.Context, engineID string) error
	// Inspect reports the engine's runtime; RuntimeMissing when there is none.
	Inspect(ctx context.Context, engineID string) (RuntimeInfo, error)
	// List returns every managed runtime and volume on this node that
	// belongs to this fleet or to none (NoFleet), never another fleet's.
	List(ctx context.Context) ([]RuntimeInfo, []VolumeInfo, error)
	// Pause and Unpause freeze the engine's processes (consistent backups).
	Pause(ctx context.Context, engineID string) error
	Unpause(ctx context.Context, engineID string) error
	// CopyDataOut writes a tar stream of the volume's contents (paths
	// relative to the volume root, no leading directory) to w. It works
	// whether the engine is running, paused, stopped or has no container.
	CopyDataOut(ctx context.Context, engineID string, w io.Writer) error
	// CopyDataIn makes the volume's contents exactly the tar stream r (same
	// layout as CopyDataOut): files not in r are gone afterwards. It removes
	// the engine's container first if there is one (the caller Ensures and
	// Starts it again). image is an image (or binary) usable for a helper.
	CopyDataIn(ctx context.Context, engineID, image string, r io.Reader) error
	// Events streams runtime events until ctx ends; the channel closes when
	// the stream breaks (callers re-subscribe and reconcile).
	Events(ctx context.Context) (<-chan RuntimeEvent, error)
}
