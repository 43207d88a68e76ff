package webhooks_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
	enginefleet "github.com/enginefleet/orchestrator/sdk/go"
	"github.com/enginefleet/orchestrator/webhooks"
)

// loopback lets the tests' receivers (httptest, on 127.0.0.1) be reached.
var loopback = webhooks.Policy{AllowNetworks: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}

// rig is a database, the request side and one worker process's delivery
// side (River on the webhooks queue only, and the dispatcher).
type rig struct {
	t    *testing.T
	pool *pgxpool.Pool
	kr   *keys.Keyring
	eps  *webhooks.Endpoints
	d    *webhooks.Deliverer
	rc   *river.Client[pgx.Tx]
}

func newRig(t *testing.T, cfg webhooks.Config) *rig {
	t.Helper()
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, testenv.DB(t))
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	kr, err := keys.NewKeyring(keys.GenerateMasterKey(), nil)
	require.NoError(t, err)
	if cfg.Policy.AllowNetworks == nil {
		cfg.Policy = loopback
	}
	r := &rig{t: t, pool: pool, kr: kr, eps: webhooks.NewEndpoints(cfg.Policy, pool, kr)}
	r.d = webhooks.NewDeliverer(cfg, pool, kr, testenv.Quiet())
	rcfg := &river.Config{Logger: testenv.Quiet(), Workers: river.NewWorkers(), FetchCooldown: 2 * time.Millisecond,
		FetchPollInterval: 50 * time.Millisecond}
	r.d.Register(rcfg)
	r.rc, err = river.NewClient(riverpgxv5.New(pool), rcfg)
	require.NoError(t, err)
	runCtx, cancel := context.WithCancel(ctx)
	require.NoError(t, r.rc.Start(runCtx))
	done := make(chan struct{})
	go func() { defer close(done); r.d.Run(runCtx, r.rc) }()
	t.Cleanup(func() {
		cancel()
		sctx, c := context.WithTimeout(context.Background(), 10*time.Second)
		defer c()
		r.rc.StopAndCancel(sctx) //nolint:errcheck
		<-done
	})
	return r
}

func (r *rig) product(slug string) string {
	p, err := schema.New(r.pool).InsertProduct(context.Background(), slug, slug, orch.Policy{}, keys.Hash(keys.Generate()))
	require.NoError(r.t, err)
	return p.ID
}

// audit writes an audit row as the workers do: the event's source.
func (r *rig) audit(productID, engineID string, action orch.Action, md map[string]any) {
	require.NoError(r.t, schema.New(r.pool).InsertAudit(context.Background(), orch.AuditEntry{ProductID: productID,
		UserID: "user-" + engineID[:8], EngineID: engineID, Action: action, Actor: orch.ActorSystem, Metadata: md}))
}

// receiver is a product's webhook endpoint: it verifies every delivery
// with the SDK and records the events (all of them, and the first of
// each id), answering what status() says.
type receiver struct {
	*httptest.Server
	mu      sync.Mutex
	secrets []string
	all     []enginefleet.WebhookEvent
	seen    map[string]bool
	uniq    []enginefleet.WebhookEvent
	bad     int // deliveries that did not verify
	status  func(e *enginefleet.WebhookEvent) int
	got     chan struct{}
}

func newReceiver(t *testing.T) *receiver {
	rv := &receiver{seen: map[string]bool{}, got: make(chan struct{}, 10000)}
	rv.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		rv.mu.Lock()
		secrets, status := rv.secrets, rv.status
		rv.mu.Unlock()
		e, err := enginefleet.ReadWebhook(req, secrets...)
		if err != nil {
			rv.mu.Lock()
			rv.bad++
			rv.mu.Unlock()
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		code := http.StatusOK
		if status != nil {
			code = status(e)
		}
		if code/100 == 2 {
			rv.mu.Lock()
			rv.all = append(rv.all, *e)
			if !rv.seen[e.ID] {
				rv.seen[e.ID] = true
				rv.uniq = append(rv.uniq, *e)
			}
			rv.mu.Unlock()
			rv.got <- struct{}{}
		}
		w.WriteHeader(code)
		io.WriteString(w, "ok") //nolint:errcheck
	}))
	t.Cleanup(rv.Close)
	return rv
}

func (rv *receiver) setSecrets(s ...string) {
	rv.mu.Lock()
	defer rv.mu.Unlock()
	rv.secrets = s
}

func (rv *receiver) setStatus(f func(e *enginefleet.WebhookEvent) int) {
	rv.mu.Lock()
	defer rv.mu.Unlock()
	rv.status = f
}

func (rv *receiver) events() []enginefleet.WebhookEvent {
	rv.mu.Lock()
	defer rv.mu.Unlock()
	return append([]enginefleet.WebhookEvent(nil), rv.uniq...)
}

// waitFor waits until the receiver has n distinct events.
func (rv *receiver) waitFor(t *testing.T, n int, within time.Duration) []enginefleet.WebhookEvent {
	t.Helper()
	deadline := time.After(within)
	for {
		if es := rv.events(); len(es) >= n {
			return es
		}
		select {
		case <-rv.got:
		case <-deadline:
			t.Fatalf("receiver has %d distinct events after %s, want %d", len(rv.events()), within, n)
		}
	}
}

func (r *rig) endpoint(productID, url string, types ...string) (schema.WebhookEndpoint, string) {
	e, secret, err := r.eps.Create(context.Background(), productID, webhooks.NewEndpoint{URL: url, EventTypes: types})
	require.NoError(r.t, err)
	return e, secret
}

func (r *rig) deliveries(productID, endpointID string) []schema.WebhookDelivery {
	ds, err := r.eps.Deliveries(context.Background(), productID, schema.DeliveryFilter{EndpointID: endpointID, Limit: 1000})
	require.NoError(r.t, err)
	return ds
}

func TestDeliversSignedEventOfAnAuditRow(t *testing.T) {
	r := newRig(t, webhooks.Config{})
	pid := r.product("acme")
	rv := newReceiver(t)
	ep, secret := r.endpoint(pid, rv.URL+"/hooks")
	require.Regexp(t, `^whsec_`, secret)
	rv.setSecrets(secret)

	engine := uuid.NewString()
	r.audit(pid, engine, orch.ActionProvision, map[string]any{"operation_id": "op-1"})
	es := rv.waitFor(t, 1, 10*time.Second)
	e := es[0]
	require.Equal(t, "engine.provisioned", e.Type)
	require.Equal(t, 1, e.Version)
	require.Equal(t, pid, e.ProductID)
	require.Equal(t, "acme", e.Product)
	require.Equal(t, engine, e.EngineID)
	require.Equal(t, "user-"+engine[:8], e.UserID)
	require.WithinDuration(t, time.Now(), e.Time, time.Minute)
	d, err := e.EngineData()
	require.NoError(t, err)
	require.Equal(t, "provision", d.Action)
	require.Equal(t, "op-1", d.OperationID)

	require.Eventually(t, func() bool {
		ds := r.deliveries(pid, ep.ID)
		return len(ds) == 1 && ds[0].State == schema.DeliveryDelivered && ds[0].Attempts == 1 &&
			*ds[0].ResponseStatus == 200 && ds[0].ResponseExcerpt == "ok" && ds[0].EventID == e.ID
	}, 5*time.Second, 20*time.Millisecond)
	require.Zero(t, rv.bad)
}

func TestNoEventForRolledBackOrUnsubscribedAuditRows(t *testing.T) {
	r := newRig(t, webhooks.Config{})
	pid := r.product("acme")
	rv := newReceiver(t)
	_, secret := r.endpoint(pid, rv.URL, webhooks.EngineCrashed, webhooks.EngineDestroyed)
	rv.setSecrets(secret)
	engine := uuid.NewString()
	ctx := context.Background()

	// A rolled-back operation's audit row sends nothing.
	tx, err := r.pool.Begin(ctx)
	require.NoError(t, err)
	require.NoError(t, schema.New(tx).InsertAudit(ctx, orch.AuditEntry{ProductID: pid, EngineID: engine,
		Action: orch.ActionDestroy, Actor: orch.ActorSystem}))
	require.NoError(t, tx.Rollback(ctx))
	// Neither does a type the endpoint did not ask for, nor a non-event.
	r.audit(pid, engine, orch.ActionSleep, nil)
	r.audit(pid, engine, orch.ActionHealthCheck, map[string]any{"ok": true})
	// This one is sent: it is the first the receiver sees.
	r.audit(pid, engine, orch.ActionHealthFailed, map[string]any{"reason": "crash", "exit_code": 137})
	es := rv.waitFor(t, 1, 10*time.Second)
	require.Equal(t, "engine.crashed", es[0].Type)
	var n int
	require.NoError(t, r.pool.QueryRow(ctx, `SELECT count(*) FROM webhook_events`).Scan(&n))
	require.Equal(t, 1, n, "only the crash made an event")
}

// TestEventTypeOfEveryAction holds the trigger's mapping to the documented types.
func TestEventTypeOfEveryAction(t *testing.T) {
	pool, err := pgxpool.New(context.Background(), testenv.DB(t))
	require.NoError(t, err)
	defer pool.Close()
	failed := `{"error_code": "BOOT_TIMEOUT"}`
	cases := []struct {
		action, md, want string
	}{
		{"provision", `{}`, webhooks.EngineProvisioned},
		{"provision", failed, webhooks.EngineFailed},
		{"provision_failed", failed, webhooks.EngineFailed},
		{"start", `{}`, ""},
		{"start", failed, webhooks.EngineFailed},
		{"wake", `{}`, webhooks.EngineWoke},
		{"wake", failed, webhooks.EngineFailed},
		{"restart", `{}`, webhooks.EngineRestarted},
		{"restart", failed, webhooks.EngineFailed},
		{"auto_restart_success", `{}`, webhooks.EngineRestarted},
		{"auto_restart_failed", failed, ""},
		{"auto_restart_gave_up", `{}`, webhooks.EngineGaveUp},
		{"health_failed", `{"reason": "probes"}`, webhooks.EngineCrashed},
		{"health_check", `{"reason": "crash", "ok": true}`, webhooks.EngineCrashed},
		{"health_check", `{"ok": false}`, ""},
		{"sleep", `{}`, webhooks.EngineSlept},
		{"upgrade", `{}`, webhooks.EngineUpgraded},
		{"upgrade", failed, webhooks.EngineFailed},
		{"destroy", `{}`, webhooks.EngineDestroyed},
		{"destroy", failed, ""},
		{"backup", `{"backup_id": "b"}`, webhooks.BackupCompleted},
		{"backup", failed, webhooks.BackupFailed},
		{"backup", `{"pruned": true}`, ""},
		{"restore", `{}`, webhooks.RestoreCompleted},
		{"restore", failed, ""},
		{"rotate_key", `{}`, ""},
		{"stop", `{}`, ""},
		{"rollout_completed", `{}`, "rollout.completed"},
	}
	seen := map[string]bool{}
	for _, c := range cases {
		var got *string
		require.NoError(t, pool.QueryRow(context.Background(), `SELECT webhook_event_type($1, $2::jsonb)`, c.action, c.md).Scan(&got))
		g := ""
		if got != nil {
			g = *got
		}
		require.Equal(t, c.want, g, "%s %s", c.action, c.md)
		seen[g] = true
	}
	for _, typ := range webhooks.Types {
		require.True(t, seen[typ], "no audit action makes %s", typ)
	}
}
