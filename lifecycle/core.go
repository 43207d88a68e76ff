package lifecycle

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river/rivertype"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/generations"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/metrics"
	"github.com/enginefleet/orchestrator/schema"
)

// Config is what the request side needs; cmd/orchestrator fills it.
type Config struct {
	DefaultImage string        // ORCH_ENGINE_IMAGE
	Images       *orch.Images  // ORCH_ENGINE_IMAGE_ALLOWLIST (nil = DefaultImage's repository)
	PortMin      int           // ORCH_PORT_MIN
	PortMax      int           // ORCH_PORT_MAX
	Node         string        // the engine host new engines go to ("local")
	BootTimeout  time.Duration // ORCH_BOOT_TIMEOUT_S: how long a synchronous boot is waited for
	URLTemplate  string        // ORCH_ENGINE_URL_TEMPLATE, e.g. http://127.0.0.1:{port}
	// NoHostPorts: the backend publishes no host port (kubernetes, where a
	// Service is each engine's address). New engines get port 0 and no
	// port range is searched, so PORT_EXHAUSTION never happens.
	NoHostPorts bool
	Namespace   string // the kubernetes backend's engine namespace ({namespace} in URLTemplate)

	Metrics *metrics.Metrics // dropped denial audits, the wake step of waits (nil = none)
}

// River is what the request side needs of a River client: enqueue within
// a transaction, and cancel a pending auto-restart a manual operation
// replaces. An insert-only client (no workers) is enough.
type River interface {
	Inserter
	JobCancelTx(ctx context.Context, tx pgx.Tx, jobID int64) (*rivertype.JobRow, error)
}

// Core is the request side of the engine lifecycle: it decides what a
// request may do to an engine, records it (engine row, operation, audit,
// River job in one transaction) and waits for its outcome, woken by
// Postgres NOTIFY. The HTTP API, the CLI and the console all go through
// it; none of them touches a backend.
type Core struct {
	cfg     Config
	pool    *pgxpool.Pool
	river   River
	keyring *keys.Keyring
	log     *slog.Logger

	listener *Listener
	waiters  *waiters
	// stopWaits is closed when a draining process can wait no longer
	// (StopWaiting): requests waiting for an operation answer at once.
	stopWaits chan struct{}
	stopOnce  sync.Once
	activity  activity
	denied    *deniedAudit // admit_denied rows, aggregated (denied.go)

	// keys caches decrypted engine keys by their Fernet token: a warm
	// admit answers the key, and a token always decrypts to the same key
	// (a rotation makes a new token). Bounded; never persisted.
	keysMu sync.Mutex
	keys   generations.Map[string, string]
}

// New builds the core. rc may be an insert-only River client.
func New(cfg Config, pool *pgxpool.Pool, rc River, kr *keys.Keyring, log *slog.Logger) *Core {
	if cfg.Node == "" {
		cfg.Node = "local"
	}
	if cfg.Images == nil {
		im, _ := orch.ParseImages(cfg.DefaultImage, "") // cannot fail without a list
		cfg.Images = &im
	}
	c := &Core{cfg: cfg, pool: pool, river: rc, keyring: kr, log: log, waiters: newWaiters(), stopWaits: make(chan struct{}),
		keys: generations.New[string, string](keyCacheSize)}
	c.denied = newDeniedAudit(pool, log, cfg.Metrics)
	c.listener = &Listener{pool: pool, log: log, handlers: map[string]func(string){schema.ChannelOps: c.waiters.wake}}
	c.listener.onReconnect = append(c.listener.onReconnect, c.waiters.wakeAll)
	return c
}

// Listen adds a handler for a NOTIFY channel and one for every (re)connect
// of the listener (notifications sent meanwhile are lost: drop caches).
// Call it before Run.
func (c *Core) Listen(channel string, handle func(payload string), onReconnect func()) {
	c.listener.handlers[channel] = handle
	if onReconnect != nil {
		c.listener.onReconnect = append(c.listener.onReconnect, onReconnect)
	}
}

// Run runs the core's background work until ctx ends: the NOTIFY listener
// and the admit_denied writer; it returns once the writer has written what
// was pending.
func (c *Core) Run(ctx context.Context) {
	done := make(chan struct{})
	go func() { defer close(done); c.denied.run(ctx) }()
	c.listener.run(ctx)
	<-done
}

// StopWaiting answers every request still waiting for an operation with
// 503 SERVICE_UNAVAILABLE naming the operation to follow, instead of
// letting the end of a drain cut it off. The operations go on.
func (c *Core) StopWaiting() { c.stopOnce.Do(func() { close(c.stopWaits) }) }

// URL renders ORCH_ENGINE_URL_TEMPLATE for an engine: where its product
// reaches it.
func (c *Core) URL(e orch.Engine) string {
	return orch.EngineURL(c.cfg.URLTemplate, e, c.cfg.Namespace)
}

// keyCacheSize bounds the decrypted-key cache (two generations of it).
const keyCacheSize = 8192

// Key decrypts an engine's key for the answers that carry it.
// INTERNAL_ERROR when the master keyring cannot open it.
func (c *Core) Key(e orch.Engine) (string, error) {
	c.keysMu.Lock()
	k, ok := c.keys.Get(e.KeyEnc)
	c.keysMu.Unlock()
	if ok {
		return k, nil
	}
	k, err := c.keyring.Decrypt(e.KeyEnc)
	if err != nil {
		return "", &orch.Error{Code: orch.CodeInternal, Message: "engine key cannot be decrypted: was ORCH_MASTER_KEY changed without ORCH_MASTER_KEY_PREVIOUS?", Err: err}
	}
	c.keysMu.Lock()
	c.keys.Put(e.KeyEnc, k)
	c.keysMu.Unlock()
	return k, nil
}

// AllowImage refuses an engine_version outside ORCH_ENGINE_IMAGE_ALLOWLIST
// (INVALID_REQUEST): engines get the passthrough secrets, so a tenant
// never picks an arbitrary image.
func (c *Core) AllowImage(image string) error {
	if !c.cfg.Images.Allows(image) {
		return orch.Errorf(orch.CodeInvalidRequest, "engine_version %q is not an image this orchestrator runs: ask the operator to allow it", image)
	}
	return nil
}

// Engine reads a product's engine (ENGINE_NOT_FOUND): GET /engines/{user_id}.
func (c *Core) Engine(ctx context.Context, productID, userID string) (orch.Engine, error) {
	return schema.New(c.pool).EngineByUser(ctx, productID, userID)
}

func (c *Core) inTx(ctx context.Context, fn func(q *schema.Queries, tx pgx.Tx) error) error {
	return pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error { return fn(schema.New(tx), tx) })
}
