// Package docker runs engines as Docker containers: the production
// implementation of orchestrator.Backend.
//
// Every object it creates carries the orchestrator labels (managed, engine
// id, product id, node), and every name is derived from the engine id
// (engine-<id>, engine-data-<id>), so every method is idempotent: a retried
// job adopts what an earlier attempt created instead of making a second one.
//
// It speaks to the daemon through github.com/moby/moby/client, which
// negotiates the API version down to the daemon's (API 1.41, Docker 20.10,
// is the oldest this package is written against). No registry is needed:
// images are pulled only when missing locally.
//
// Errors are wrapped once with what was being done ("create container:
// ..."). Missing objects are reported with ErrNotFound in the chain where a
// method cannot treat them as a no-op. Environment values (they hold key
// hashes) are never logged nor put in errors.
package docker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path"
	"strconv"
	"strings"
	"sync"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/client"

	orchestrator "github.com/enginefleet/orchestrator"
)

// Labels this backend adds next to the orchestrator's own.
const (
	// LabelSpecHash holds a hash of everything Ensure put in the container:
	// a container whose hash differs from the wanted spec is replaced.
	LabelSpecHash = "orchestrator.spec_hash"
	// LabelRole is "engine" on engine containers and "helper" on the
	// short-lived, never-started containers used to copy volume data.
	LabelRole = "orchestrator.role"
	// LabelHostPort is the published host port (List reads it without an
	// inspect per container).
	LabelHostPort = "orchestrator.host_port"
	// LabelImage is the image reference the container was created from
	// (docker reports an image id once the tag moves).
	LabelImage = "orchestrator.image"
	// LabelUser is the uid:gid the engine container runs as: Ensure checks
	// the brain volume's ownership when a container replaces one that ran
	// as another user (or carries no such label: made by an older build).
	LabelUser = "orchestrator.user"
)

// Roles of managed containers (LabelRole).
const (
	RoleEngine = "engine"
	RoleHelper = "helper"
)

// Paths and ports of the engine contract.
const (
	DataDir     = "/data"
	CatalogDir  = "/catalog"
	EnginePort  = "8000/tcp"
	stopTimeout = 30 // seconds docker waits on `docker stop` without -t
)

// Resource limits cmd/orchestrator applies to every engine unless the
// operator says otherwise (ORCH_ENGINE_MEMORY_MB, ORCH_ENGINE_CPUS,
// ORCH_ENGINE_PIDS). Measured on the reference engine: a few MB idle, 25 MB
// holding 5,000 memories, 53 MB while it also streams 16 answers and two
// whole-brain exports at once, 10 threads. 512 MB is ten times that, room
// for real engines (a model client, a bigger SQLite cache), while one
// runaway engine is capped at a small slice of a host. One CPU keeps a busy
// engine from starving its neighbours (Go sizes GOMAXPROCS to it); 256
// processes/threads is 25× what the engine uses and stops a fork or thread
// bomb long before the host's limit. docs/production.md has sizing.
const (
	DefaultMemoryMB = 512
	DefaultCPUs     = 1.0
	DefaultPids     = 256
)

// Defaults applied by New.
const (
	DefaultNetwork      = "engine_net"
	DefaultNode         = "local"
	DefaultReplaceGrace = 10 * time.Second
	DefaultPullTimeout  = 5 * time.Minute
	DefaultTmpfsSize    = "64m"
	// DefaultUser is the uid:gid engines run as: the reference image's own
	// user (65532, "nonroot"), never root.
	DefaultUser = "65532:65532"
	// helperMaxAge is how old a helper container must be before List
	// removes it as leaked (a crash between create and remove).
	helperMaxAge = 15 * time.Minute
)

// ErrNotFound is in the chain of errors about a container, volume or image
// that does not exist, where the method cannot treat that as a no-op
// (Start, Pause of a missing engine; CopyDataOut without a volume).
var ErrNotFound = errors.New("not found")

// Config configures the Docker backend. cmd/orchestrator fills it from the
// environment; zero values take the defaults listed per field.
type Config struct {
	// Host is the daemon address (unix:///var/run/docker.sock,
	// tcp://host:2376); "" reads DOCKER_HOST, DOCKER_TLS_VERIFY and
	// DOCKER_CERT_PATH from the environment like the docker CLI.
	Host string
	// Network is the bridge network engines join (ORCH_ENGINE_NETWORK);
	// default engine_net. Created, labelled, with inter-container traffic
	// off when missing; see network.go for one that allows it.
	Network string
	// CatalogMountPath is a host directory bind-mounted read-only at
	// /catalog (ORCH_CATALOG_MOUNT_PATH); "" mounts nothing.
	CatalogMountPath string
	// MemoryMB, CPUs and PidsLimit limit each engine when > 0
	// (ORCH_ENGINE_MEMORY_MB, ORCH_ENGINE_CPUS, ORCH_ENGINE_PIDS); 0 means
	// no limit here, the production defaults are DefaultMemoryMB,
	// DefaultCPUs and DefaultPids. Swap is disabled when a memory limit is
	// set.
	MemoryMB  int64
	CPUs      float64
	PidsLimit int64
	// User is the numeric "uid:gid" (or "uid", gid = uid) engines run as
	// (ORCH_ENGINE_USER), whatever the image says; default DefaultUser.
	// Root (uid 0) is refused. Brain volumes are made this user's: see
	// Ensure.
	User string
	// Node is this engine host's name, put on every object and used to
	// select what List and Events report; default "local".
	Node string
	// Fleet is this deployment's fleet id (its database's, see
	// schema.FleetID), put on every container and volume as
	// orchestrator.fleet. List, Events and Ensure ignore other fleets'
	// objects; objects with no fleet label (an older version's) are
	// listed as NoFleet. "" labels nothing and considers unlabelled
	// objects only.
	Fleet string
	// TmpfsSize is the size of the tmpfs at /tmp (docker syntax, "64m");
	// default 64m. It counts against the memory limit.
	TmpfsSize string
	// ReplaceGrace is how long Ensure lets a running container that it
	// replaces shut down on SIGTERM before it is killed; default 10s.
	ReplaceGrace time.Duration
	// PullTimeout bounds an image pull; default 5m.
	PullTimeout time.Duration
	// DataRoot is ORCH_DATA_ROOT_PATH: an absolute directory on the Docker
	// host (the daemon's filesystem; this process needs no access to it)
	// under which every brain lives, at <DataRoot>/engines/<id>/data: the
	// engine's volume is a local-driver volume bound there, and volumes
	// found elsewhere (Docker-managed ones of older versions) are moved
	// there by Ensure (see dataroot.go). "" keeps brains in
	// Docker-managed named volumes.
	DataRoot string
	// HelperImage is an image for the helper container CopyDataOut needs
	// when an engine has a volume but no container (so no known image).
	// Optional: the images of other managed containers are tried too.
	HelperImage string
	// Labels are extra labels put on every container, volume and network
	// this backend creates (tests mark theirs orchestrator.test=true). They
	// cannot override the orchestrator's own labels.
	Labels map[string]string
}

func (c Config) withDefaults() Config {
	if c.Network == "" {
		c.Network = DefaultNetwork
	}
	if c.Node == "" {
		c.Node = DefaultNode
	}
	if c.TmpfsSize == "" {
		c.TmpfsSize = DefaultTmpfsSize
	}
	if c.ReplaceGrace <= 0 {
		c.ReplaceGrace = DefaultReplaceGrace
	}
	if c.PullTimeout <= 0 {
		c.PullTimeout = DefaultPullTimeout
	}
	if c.User == "" {
		c.User = DefaultUser
	}
	if c.DataRoot != "" {
		c.DataRoot = path.Clean(c.DataRoot)
	}
	if uid, gid, err := ParseUser(c.User); err == nil {
		c.User = strconv.Itoa(uid) + ":" + strconv.Itoa(gid) // one spelling: it enters the spec hash and a label
	}
	return c
}

// ParseUser parses a numeric "uid:gid" or "uid" (gid = uid) engine user.
// Names are refused (a FROM scratch image has no /etc/passwd to resolve
// them, and the brain volume's owner must be known), and so is root.
func ParseUser(s string) (uid, gid int, err error) {
	us, gs, hasGID := strings.Cut(strings.TrimSpace(s), ":")
	uid, err = strconv.Atoi(us)
	if err != nil || uid < 0 {
		return 0, 0, fmt.Errorf("engine user %q is not a numeric uid[:gid]", s)
	}
	gid = uid
	if hasGID {
		if gid, err = strconv.Atoi(gs); err != nil || gid < 0 {
			return 0, 0, fmt.Errorf("engine user %q is not a numeric uid[:gid]", s)
		}
	}
	if uid == 0 {
		return 0, 0, fmt.Errorf("engine user %q is root: engines never run as root", s)
	}
	return uid, gid, nil
}

// owner is the uid and gid of Config.User (validated by New).
func (c Config) owner() (uid, gid int) {
	uid, gid, _ = ParseUser(c.User)
	return uid, gid
}

func (c Config) validate() error {
	var problems []string
	if c.MemoryMB < 0 {
		problems = append(problems, "memory limit is negative")
	}
	if c.CPUs < 0 {
		problems = append(problems, "cpu limit is negative")
	}
	if c.PidsLimit < 0 {
		problems = append(problems, "pids limit is negative")
	}
	if c.CatalogMountPath != "" && !strings.HasPrefix(c.CatalogMountPath, "/") {
		problems = append(problems, "catalog mount path is not absolute")
	}
	if c.DataRoot != "" && (!path.IsAbs(c.DataRoot) || strings.Contains(c.DataRoot, ":")) {
		problems = append(problems, "data root is not an absolute path without ':'")
	}
	if strings.ContainsAny(c.Node, ",=") {
		problems = append(problems, "node name contains ',' or '='")
	}
	if _, _, err := ParseUser(c.User); err != nil {
		problems = append(problems, err.Error())
	}
	if len(problems) > 0 {
		return fmt.Errorf("invalid docker backend config: %s", strings.Join(problems, "; "))
	}
	return nil
}

// Backend is the Docker implementation of orchestrator.Backend. It is safe
// for concurrent use, also by several processes against one daemon.
type Backend struct {
	cfg Config
	cli *client.Client
	log *slog.Logger

	// netMu single-flights network creation within this process; other
	// processes are handled by ensureNetwork's duplicate resolution.
	// netID is the settled network (guarded by netMu).
	netMu sync.Mutex
	netID string
	// warnOpen spaces the warnings about an open engines' network.
	warnOpen rateGate
	// The last look at open networks of the engines' name (guarded by
	// netMu): which ones, when, and whether one was still there.
	openKey   string
	openAt    time.Time
	openInUse bool
	// images spares Ensure an image inspect and a fresh volume's owner
	// check (images.go).
	images imageMemo

	// migrateHook, set by tests only, runs at each step of a volume
	// migration; an error stops it there as a killed worker would.
	migrateHook func(step string) error
}

var _ orchestrator.Backend = (*Backend)(nil)

// New returns a Docker backend. It does not contact the daemon: call Ping
// to check it is reachable. The client negotiates the API version on its
// first request.
func New(cfg Config, log *slog.Logger) (*Backend, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// client.New negotiates the API version by default (the deprecated
	// WithAPIVersionNegotiation is a no-op); FromEnv honours DOCKER_HOST
	// and TLS settings, and an explicit Host overrides DOCKER_HOST.
	opts := []client.Opt{client.FromEnv}
	if cfg.Host != "" {
		opts = append(opts, client.WithHost(cfg.Host))
	}
	cli, err := client.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("docker client: %w", err)
	}
	return &Backend{
		cfg:      cfg,
		cli:      cli,
		log:      log.With("backend", "docker", "node", cfg.Node),
		warnOpen: rateGate{period: legacyWarnEvery},
	}, nil
}

// Close releases the client's connections.
func (b *Backend) Close() error { return b.cli.Close() }

// Ping checks the daemon answers and negotiates the API version. It
// fails when the daemon's API is older than the client supports (1.40).
func (b *Backend) Ping(ctx context.Context) error {
	if _, err := b.cli.Ping(ctx, client.PingOptions{NegotiateAPIVersion: true}); err != nil {
		return fmt.Errorf("ping docker: %w", err)
	}
	return nil
}

// Prepare readies what every engine shares, the engines' network, so the
// first provision after a fresh install does not wait for it (Ensure would
// do the same lazily).
func (b *Backend) Prepare(ctx context.Context) error {
	_, err := b.ensureNetwork(ctx)
	return err
}

// APIVersion is the API version the client speaks (after Ping, the
// negotiated one).
func (b *Backend) APIVersion() string { return b.cli.ClientVersion() }

// Name is "docker".
func (b *Backend) Name() string { return "docker" }

// Config returns the effective configuration (defaults applied).
func (b *Backend) Config() Config { return b.cfg }

// baseLabels are the labels on every container and volume made for
// engineID.
func (b *Backend) baseLabels(engineID, productID string) map[string]string {
	l := b.nodeLabels()
	if b.cfg.Fleet != "" {
		l[orchestrator.LabelFleet] = b.cfg.Fleet
	}
	l[orchestrator.LabelEngineID] = engineID
	if productID != "" {
		l[orchestrator.LabelProductID] = productID
	}
	return l
}

// networkLabels are the labels of the engines' network, which every fleet
// of the node shares (so: no fleet label).
func (b *Backend) networkLabels() map[string]string { return b.nodeLabels() }

// ours reports whether an object with these labels is this fleet's to
// consider (its own, or made before fleets were labelled), and whether it
// is one of the latter.
func (b *Backend) ours(labels map[string]string) (ours, noFleet bool) {
	f := labels[orchestrator.LabelFleet]
	switch {
	case f == b.cfg.Fleet:
		return true, false
	case f == "":
		return true, true
	}
	return false, false
}

// nodeLabels are the labels on every object of this node: Config.Labels,
// managed and node.
func (b *Backend) nodeLabels() map[string]string {
	l := make(map[string]string, len(b.cfg.Labels)+6)
	for k, v := range b.cfg.Labels {
		l[k] = v
	}
	l[orchestrator.LabelManaged] = "true"
	l[orchestrator.LabelNode] = b.cfg.Node
	return l
}

// managedFilters selects this node's managed objects.
func (b *Backend) managedFilters() client.Filters {
	return make(client.Filters).Add("label",
		orchestrator.LabelManaged+"=true",
		orchestrator.LabelNode+"="+b.cfg.Node,
	)
}

// inspectContainer inspects the engine's container by name; found is false
// (and err nil) when there is none.
func (b *Backend) inspectContainer(ctx context.Context, engineID string) (c container.InspectResponse, found bool, err error) {
	res, err := b.cli.ContainerInspect(ctx, orchestrator.ContainerName(engineID), client.ContainerInspectOptions{})
	if err != nil {
		if cerrdefs.IsNotFound(err) {
			return container.InspectResponse{}, false, nil
		}
		return container.InspectResponse{}, false, err
	}
	return res.Container, true, nil
}

func validID(engineID string) error {
	if engineID == "" {
		return errors.New("empty engine id")
	}
	// Names and label filters are built from the id: keep it to what
	// docker accepts in a container name.
	for _, r := range engineID {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return fmt.Errorf("invalid engine id %q", engineID)
		}
	}
	return nil
}

// mapState converts a docker container state to the runtime state the
// orchestrator knows. A restarting container (crashed, docker is backing
// off before the next start) is reported exited: it is not serving.
func mapState(s container.ContainerState) orchestrator.RuntimeState {
	switch s {
	case container.StateCreated:
		return orchestrator.RuntimeCreated
	case container.StateRunning:
		return orchestrator.RuntimeRunning
	case container.StatePaused:
		return orchestrator.RuntimePaused
	default: // exited, dead, restarting, removing
		return orchestrator.RuntimeExited
	}
}

func stateOf(c container.InspectResponse) container.ContainerState {
	if c.State == nil {
		return ""
	}
	s := c.State
	switch {
	case s.Status != "":
		return s.Status
	case s.Paused:
		return container.StatePaused
	case s.Restarting:
		return container.StateRestarting
	case s.Running:
		return container.StateRunning
	}
	return container.StateExited
}

func atoiOr0(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0
	}
	return n
}

// cleanupCtx is a context for removing what an operation created, even when
// the operation's own context is done.
func cleanupCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
}
