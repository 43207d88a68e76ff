package e2e_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/enginefleet/orchestrator/backend/docker/dockertest"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/api"
	"github.com/enginefleet/orchestrator/backend/docker"
	"github.com/enginefleet/orchestrator/backend/subprocess"
	"github.com/enginefleet/orchestrator/internal/kubeenv"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/lifecycle"
	"github.com/enginefleet/orchestrator/metrics"
	"github.com/enginefleet/orchestrator/scheduler"
	"github.com/enginefleet/orchestrator/schema"
	"github.com/enginefleet/orchestrator/server"
	"github.com/enginefleet/orchestrator/workers"
)

const adminKey = "e2e-admin-key-0123456789"

// fleetOpts tunes one test fleet.
type fleetOpts struct {
	backend     string // "subprocess" (default), "docker" or "kubernetes"
	portable    bool   // the backend says it cannot copy volumes: backups through the engine's API, as on kubernetes
	ports       int    // size of the port range (default 40)
	bootTimeout time.Duration
	engineEnv   map[string]string // passed through to every engine
	keyOverlap  time.Duration
	image       string // default image (docker: built for the test)
	orphanGrace time.Duration
	node        string          // ORCH_NODE (default: one of its own)
	metrics     *metrics.Config // serve the fleet's Prometheus metrics (MetricsURL) from this configuration (nil = none)
	limits      bool            // docker: engines get production's default memory, CPU and pids limits

	// Fleet upkeep; zero values keep the workers' defaults
	// (auto-restart off unless maxAttempts is set).
	healthInterval time.Duration // sweep period (scheduler) and health_check sampling
	probeTimeout   time.Duration // per-probe timeout (default 2 s)
	maxFailures    int
	backoffBase    time.Duration
	backoffMax     time.Duration
	maxAttempts    int
	idleAfter      time.Duration
	sleepMode      string
	events         bool          // watch the backend's runtime events (crash detection)
	scheduler      bool          // run the scheduler role: sweeps every healthInterval, idle sweeps every idleEvery
	idleEvery      time.Duration // scheduler's idle sweep period (default 1 s here)
	allowImages    string        // ORCH_ENGINE_IMAGE_ALLOWLIST ("" = the default image's repository)
}

// noDataCopy is a backend that says it cannot copy brain volumes, so that
// backups go through the engine's API (as on kubernetes) on any backend.
type noDataCopy struct{ orch.Backend }

func (noDataCopy) CopiesData() bool { return false }

// fleet is a whole orchestrator on a fresh database.
type fleet struct {
	t       testing.TB
	URL     string
	DBURL   string
	Pool    *pgxpool.Pool
	Keyring *keys.Keyring
	Backend orch.Backend
	River   *river.Client[pgx.Tx]
	Node    string
	Fleet   string // the database's fleet id (labels the Docker objects)
	PortMin int
	PortMax int
	Image   string
	// Namespace is the kubernetes fleets' engine namespace.
	Namespace string
	Workers   *workers.Workers
	// ORCH_BACKUP_DIR and ORCH_AUDIT_EXPORT_DIR of this fleet (temporary).
	Backups string
	Exports string
	Sched   *scheduler.Scheduler // with fleetOpts.scheduler
	Proc    *server.Process      // the whole process under test
	// MetricsURL is the Prometheus listener's /metrics (fleetOpts.metrics).
	MetricsURL string
	client     *http.Client // nil = httpClient (tests may validate traffic)
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b) //nolint:errcheck
	return hex.EncodeToString(b)
}

// freeRange reserves n consecutive free ports for the test.
func freeRange(t testing.TB, n int) int { return testenv.PortRange(t, n) }

func newFleet(t *testing.T, o fleetOpts) *fleet { return newFleetTB(t, o) }

func newFleetTB(t testing.TB, o fleetOpts) *fleet {
	t.Helper()
	if o.backend == "" {
		o.backend = "subprocess"
	}
	if o.ports == 0 {
		o.ports = 40
	}
	if o.bootTimeout == 0 {
		o.bootTimeout = 30 * time.Second
	}
	if o.keyOverlap == 0 {
		o.keyOverlap = time.Minute
	}
	f := &fleet{t: t, Node: "e2e-" + randHex(4)}
	if o.node != "" {
		f.Node = o.node
	}
	f.DBURL = testenv.DB(t)
	f.Pool = testenv.Pool(t, f.DBURL)
	f.Fleet = fleetID(t, f.Pool)
	f.PortMin = freeRange(t, o.ports)
	f.PortMax = f.PortMin + o.ports - 1
	var err error
	f.Keyring, err = keys.NewKeyring(keys.GenerateMasterKey(), nil)
	require.NoError(t, err)
	log := testenv.Quiet()

	switch o.backend {
	case "docker":
		dockertest.RequireDocker(t)
		f.Image = o.image
		if f.Image == "" {
			f.Image = dockertest.EngineImage(t, "e2e-1")
		}
		dc := docker.Config{Network: e2eNetwork, Node: f.Node, Fleet: f.Fleet}
		if o.limits {
			dc.MemoryMB, dc.CPUs, dc.PidsLimit = docker.DefaultMemoryMB, docker.DefaultCPUs, docker.DefaultPids
		}
		b, err := docker.New(dc, log)
		require.NoError(t, err)
		f.Backend = b
	case "kubernetes":
		f.Image = o.image
		if f.Image == "" {
			f.Image = kubeenv.AgentImage
		}
		f.Namespace, f.Backend = kubeFleet(t, f.Node, f.Fleet, o.bootTimeout)
	default:
		f.Image = "enginefleet/engine:e2e-1"
		b, err := subprocess.New(subprocess.Config{DataRoot: t.TempDir(), EngineBinary: testenv.EngineBinary(t), Node: f.Node}, log)
		require.NoError(t, err)
		f.Backend = b
	}
	if o.portable {
		f.Backend = noDataCopy{f.Backend}
	}
	t.Cleanup(f.removeEngines)
	f.Backups, f.Exports = t.TempDir(), t.TempDir()

	if o.probeTimeout == 0 {
		o.probeTimeout = 2 * time.Second
	}
	if o.idleEvery == 0 {
		o.idleEvery = time.Second
	}
	images, err := orch.ParseImages(f.Image, o.allowImages)
	require.NoError(t, err)
	// The process the tests run is the one cmd/orchestrator runs
	// (server.Process), with every role in this test process.
	cfg := server.Config{
		Roles:   server.Roles{API: true, Worker: true, Scheduler: o.scheduler},
		Version: "e2e",
		API: api.Config{AdminKey: adminKey, PortMin: f.PortMin, PortMax: f.PortMax,
			UndocumentedError: func(op string, status int, code string) {
				t.Errorf("%s answered %d %s, which openapi.yaml does not document for it: declare it (api/codes.go)", op, status, code)
			}},
		Core: lifecycle.Config{DefaultImage: f.Image, PortMin: f.PortMin, PortMax: f.PortMax, Node: f.Node,
			BootTimeout: o.bootTimeout, URLTemplate: "http://127.0.0.1:{port}", Images: &images},
		Workers: workers.Config{Node: f.Node,
			Engines: workers.EngineConfig{BootTimeout: o.bootTimeout, ProbeTimeout: o.probeTimeout, EnvPassthrough: o.engineEnv,
				KeyOverlap: o.keyOverlap, StopGrace: 5 * time.Second, PortMin: f.PortMin, PortMax: f.PortMax},
			Health: workers.HealthConfig{Interval: o.healthInterval, MaxFailures: o.maxFailures, RestartBackoffBase: o.backoffBase,
				RestartBackoffMax: o.backoffMax, RestartMaxAttempts: o.maxAttempts},
			Idle:      workers.IdleConfig{After: o.idleAfter, Mode: o.sleepMode},
			Backups:   workers.BackupConfig{Dir: f.Backups},
			Audit:     workers.AuditConfig{ExportDir: f.Exports, Retention: 30 * 24 * time.Hour, ExportSettle: 50 * time.Millisecond},
			Reconcile: workers.ReconcileConfig{OrphanGrace: o.orphanGrace},
			Rollouts:  workers.RolloutConfig{Tick: 100 * time.Millisecond}},
		Fleet: scheduler.FleetConfig{Nodes: []string{f.Node}, HealthInterval: o.healthInterval,
			IdleAfter: o.idleAfter, IdleEvery: o.idleEvery},
		Scheduler:       scheduler.Config{Poll: 200 * time.Millisecond},
		ShutdownTimeout: 20 * time.Second,
	}
	if o.metrics != nil {
		cfg.Metrics, cfg.MetricsAddr = *o.metrics, "127.0.0.1:0"
	}
	if o.backend == "kubernetes" {
		// No host ports; engines are reached through their Service's name,
		// which kubeDial resolves as cluster DNS would.
		cfg.Core.URLTemplate, cfg.Core.NoHostPorts, cfg.Core.Namespace = kubeURLTemplate, true, f.Namespace
		cfg.Workers.Engines.ProbeURLTemplate, cfg.Workers.Engines.Namespace = kubeURLTemplate, f.Namespace
		cfg.Workers.Engines.PortMin, cfg.Workers.Engines.PortMax = 0, 0
		cfg.Workers.Engines.Dial = kubeDial
	}
	cfg.SkipRuntimeEvents = !o.events // the tests of crash detection from the runtime ask for it
	p, err := server.New(cfg, f.Pool, f.Keyring, f.Backend, log)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	require.NoError(t, p.Start(ctx))
	t.Cleanup(func() {
		sctx, c := context.WithTimeout(context.Background(), 20*time.Second)
		defer c()
		p.Stop(sctx) //nolint:errcheck
		cancel()
	})
	f.Proc, f.Workers, f.River, f.Sched = p, p.Workers, p.River, p.Scheduler
	if addr := p.MetricsAddr(); addr != "" {
		f.MetricsURL = "http://" + addr + "/metrics"
	}
	ts := httptest.NewServer(p.Handler())
	t.Cleanup(ts.Close)
	f.URL = ts.URL
	return f
}

// waitCatchUp waits until a worker's runtime-event watcher has subscribed
// since `since` and the catch-up jobs it enqueues then (a reconcile and a
// health sweep of its node, its batches) have all run, so that none of
// them acts in the middle of what the test does next.
func waitCatchUp(t testing.TB, pool *pgxpool.Pool, since time.Time) {
	t.Helper()
	testenv.Await(t, 30*time.Second, "the event watcher subscribed and its catch-up jobs ran", func() error {
		var subscribed, unfinished int
		err := pool.QueryRow(context.Background(), `SELECT
			count(*) FILTER (WHERE kind = 'health_sweep' AND args->>'reason' = 'events_subscribed' AND created_at >= $1),
			count(*) FILTER (WHERE kind IN ('health_sweep', 'health_sweep_batch', 'engine_reconcile') AND finalized_at IS NULL)
			FROM river_job`, since).Scan(&subscribed, &unfinished)
		if err != nil {
			return err
		}
		return testenv.Check(subscribed > 0 && unfinished == 0, "%d subscriptions, %d catch-up jobs not done", subscribed, unfinished)
	})
}

// fleetID is the fleet id of the database behind pool.
func fleetID(t testing.TB, pool *pgxpool.Pool) string {
	t.Helper()
	id, err := schema.New(pool).FleetID(context.Background())
	require.NoError(t, err)
	return id
}

// sweep runs one health sweep of the fleet's node now and waits for it.
func (f *fleet) sweep() workers.BatchResult {
	f.t.Helper()
	res, err := f.Workers.Health.SweepNow(context.Background(), f.River, f.Node)
	require.NoError(f.t, err)
	return res
}

// idleSweep runs one idle sweep now; returns how many engines it put to sleep.
func (f *fleet) idleSweep() int {
	f.t.Helper()
	n, err := f.Workers.Idle.Sweep(context.Background(), f.River)
	require.NoError(f.t, err)
	return n
}

// removeEngines removes every container/process and volume of this fleet's node.
func (f *fleet) removeEngines() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rts, vols, err := f.Backend.List(ctx)
	if err != nil {
		return
	}
	for _, r := range rts {
		f.Backend.RemoveContainer(ctx, r.EngineID) //nolint:errcheck
	}
	for _, v := range vols {
		f.Backend.RemoveVolume(ctx, v.EngineID) //nolint:errcheck
	}
}

// product registers a product directly in the database; returns id and key.
func (f *fleet) product(slug string, policy orch.Policy) (string, string) {
	f.t.Helper()
	key := keys.Generate()
	p, err := schema.New(f.Pool).InsertProduct(context.Background(), slug, slug, policy, keys.Hash(key))
	require.NoError(f.t, err)
	return p.ID, key
}

type resp struct {
	Status int
	Body   map[string]any
	Header http.Header
}

func (r resp) code() string {
	e, _ := r.Body["error"].(map[string]any)
	c, _ := e["code"].(string)
	return c
}

func (r resp) str(path ...string) string {
	var cur any = r.Body
	for _, p := range path {
		m, _ := cur.(map[string]any)
		cur = m[p]
	}
	s, _ := cur.(string)
	return s
}

// httpClient is the tests' client: products, the API, engines (the
// kubernetes fleets' Service names resolved by kubeDial).
var httpClient = func() *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.DialContext = kubeDial
	return &http.Client{Timeout: 3 * time.Minute, Transport: tr}
}()

func do(t testing.TB, method, url string, body any, headers map[string]string) resp {
	t.Helper()
	return doWith(t, httpClient, method, url, body, headers)
}

func doWith(t testing.TB, hc *http.Client, method, url string, body any, headers map[string]string) resp {
	t.Helper()
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		require.NoError(t, err)
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, url, r)
	require.NoError(t, err)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	res, err := hc.Do(req)
	require.NoError(t, err)
	defer res.Body.Close()
	raw, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	out := resp{Status: res.StatusCode, Header: res.Header}
	if len(bytes.TrimSpace(raw)) > 0 && strings.HasPrefix(res.Header.Get("Content-Type"), "application/json") {
		require.NoError(t, json.Unmarshal(raw, &out.Body), "body: %s", raw)
	}
	return out
}

// call is do against the orchestrator with a platform key.
func (f *fleet) call(method, path, key string, body any, extra ...string) resp {
	f.t.Helper()
	h := map[string]string{"X-Platform-Key": key}
	for i := 0; i+1 < len(extra); i += 2 {
		h[extra[i]] = extra[i+1]
	}
	hc := f.client
	if hc == nil {
		hc = httpClient
	}
	return doWith(f.t, hc, method, f.URL+path, body, h)
}

// engineCall calls an engine directly, as a product would.
func engineCall(t testing.TB, method, url, key string, body any) resp {
	t.Helper()
	h := map[string]string{}
	if key != "" {
		h["X-Engine-Key"] = key
	}
	return do(t, method, url, body, h)
}

// auditActions lists the audit actions of an engine in order.
func (f *fleet) auditActions(engineID string) []string {
	f.t.Helper()
	rows, err := f.Pool.Query(context.Background(), `SELECT action FROM audit_log WHERE engine_id = $1 ORDER BY id`, engineID)
	require.NoError(f.t, err)
	acts, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(f.t, err)
	return acts
}

// parallel runs fn n times concurrently and waits.
func parallel(n int, fn func(i int)) {
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); fn(i) }()
	}
	wg.Wait()
}

func decodeJSON(r io.Reader, v any) error { return json.NewDecoder(r).Decode(v) }

func orchPolicy() orch.Policy { return orch.Policy{} }
