package api_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/danielgtaylor/huma/v2"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/api"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

// ---- harness variants ----

// replicaOpts customizes an API replica beyond newHarness.
type replicaOpts struct {
	log     *slog.Logger    // default: discard
	tracer  pgx.QueryTracer // sees every query of the replica's pool
	keyring *keys.Keyring   // default: a fresh master key
}

type server struct {
	URL     string
	Pool    *pgxpool.Pool
	Keyring *keys.Keyring
	Server  replica
}

// startServer starts one API replica on dbURL ("" = a fresh database).
func startServer(tb testing.TB, dbURL string, cfg api.Config, o replicaOpts) (server, string) {
	tb.Helper()
	if dbURL == "" {
		dbURL = testenv.DB(tb)
	}
	pcfg, err := pgxpool.ParseConfig(dbURL)
	require.NoError(tb, err)
	pcfg.ConnConfig.Tracer = o.tracer
	pool, err := pgxpool.NewWithConfig(context.Background(), pcfg)
	require.NoError(tb, err)
	tb.Cleanup(pool.Close)
	rc, err := river.NewClient(riverpgxv5.New(pool), &river.Config{})
	require.NoError(tb, err)
	kr := o.keyring
	if kr == nil {
		kr, err = keys.NewKeyring(keys.GenerateMasterKey(), nil)
		require.NoError(tb, err)
	}
	log := o.log
	if log == nil {
		log = testenv.Quiet()
	}
	srv := newAPI(cfg, pool, rc, kr, log)
	ctx, cancel := context.WithCancel(context.Background())
	tb.Cleanup(cancel)
	go srv.Run(ctx)
	ts := httptest.NewServer(srv.Handler())
	tb.Cleanup(ts.Close)
	return server{URL: ts.URL, Pool: pool, Keyring: kr, Server: srv}, dbURL
}

// newReplica is newHarness with options.
func newReplica(t *testing.T, dbURL string, cfg api.Config, o replicaOpts) *harness {
	t.Helper()
	s, dbURL := startServer(t, dbURL, cfg, o)
	return &harness{t: t, URL: s.URL, DBURL: dbURL, Pool: s.Pool, Keyring: s.Keyring, Server: s.Server}
}

// waitListeners waits until n API replicas LISTEN on the database, so a
// NOTIFY sent next reaches all of them.
func waitListeners(t *testing.T, pool *pgxpool.Pool, n int) {
	t.Helper()
	require.Eventually(t, func() bool {
		var got int
		err := pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND query LIKE 'LISTEN%'`).Scan(&got)
		return err == nil && got >= n
	}, 10*time.Second, 10*time.Millisecond)
}

// queryCounter is a pgx tracer recording every statement.
type queryCounter struct {
	mu   sync.Mutex
	sqls []string
}

func (c *queryCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	c.mu.Lock()
	c.sqls = append(c.sqls, d.SQL)
	c.mu.Unlock()
	return ctx
}

func (c *queryCounter) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// count is how many statements so far contain substr.
func (c *queryCounter) count(substr string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, s := range c.sqls {
		if strings.Contains(s, substr) {
			n++
		}
	}
	return n
}

// register registers a product and returns its id and platform key.
func (h *harness) register(slug string, policy any) (id, key string) {
	h.t.Helper()
	body := map[string]any{"slug": slug, "display_name": "Product " + slug}
	if policy != nil {
		body["policy"] = policy
	}
	status, out, _ := h.do("POST", "/products/register", body, admin())
	require.Equal(h.t, http.StatusOK, status, "register: %v", out)
	return out["product_id"].(string), out["platform_api_key"].(string)
}

// insertEngine records an engine directly (no worker runs in api tests).
func (h *harness) insertEngine(productID, userID string, port int, status orch.State) orch.Engine {
	h.t.Helper()
	key := keys.Generate()
	enc, err := h.Keyring.Encrypt(key)
	require.NoError(h.t, err)
	e := orch.Engine{ID: uuid.NewString(), ProductID: productID, UserID: userID, Status: status, Node: "local",
		Port: port, EngineVersion: "enginefleet/engine:test", KeyHash: keys.Hash(key), KeyEnc: enc}
	require.NoError(h.t, schema.New(h.Pool).InsertEngine(context.Background(), e))
	return e
}

// audits returns the metadata of a product's audit rows with action.
func audits(t *testing.T, pool *pgxpool.Pool, productID string, action orch.Action) []map[string]any {
	t.Helper()
	rows, err := pool.Query(context.Background(), `SELECT actor, metadata FROM audit_log
		WHERE product_id = $1 AND action = $2 ORDER BY id`, productID, string(action))
	require.NoError(t, err)
	defer rows.Close()
	var out []map[string]any
	for rows.Next() {
		var actor string
		var md map[string]any
		require.NoError(t, rows.Scan(&actor, &md))
		require.Equal(t, orch.ActorAdmin, actor)
		out = append(out, md)
	}
	require.NoError(t, rows.Err())
	return out
}

func countProducts(t testing.TB, pool *pgxpool.Pool) int {
	t.Helper()
	var n int
	require.NoError(t, pool.QueryRow(context.Background(), `SELECT count(*) FROM products`).Scan(&n))
	return n
}

func keysOf(m map[string]any) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// ---- registration ----

func TestRegisterProduct(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", testConfig())
	status, body, _ := h.do("POST", "/products/register",
		map[string]any{"slug": "acme", "display_name": "Acme Notes", "policy": map[string]any{"max_engines": 5}}, admin())
	require.Equal(t, http.StatusOK, status, body)
	require.ElementsMatch(t, []string{"product_id", "slug", "platform_api_key"}, keysOf(body))
	id, key := body["product_id"].(string), body["platform_api_key"].(string)
	require.Equal(t, "acme", body["slug"])
	require.Len(t, key, 43)

	// Stored only as its hash.
	var hash string
	require.NoError(t, h.Pool.QueryRow(context.Background(), `SELECT api_key_hash FROM products WHERE id = $1`, id).Scan(&hash))
	require.Equal(t, keys.Hash(key), hash)

	// Audited in the same transaction, by admin.
	md := audits(t, h.Pool, id, orch.ActionPolicyRegister)
	require.Len(t, md, 1)
	require.Equal(t, "acme", md[0]["slug"])
	require.Equal(t, map[string]any{"max_engines": float64(5)}, md[0]["policy"])

	// Readable by the admin, never with a key or hash.
	status, got, _ := h.do("GET", "/products/"+id, nil, admin())
	require.Equal(t, http.StatusOK, status)
	require.Equal(t, "Acme Notes", got["display_name"])
	require.Equal(t, map[string]any{"max_engines": float64(5)}, got["policy"])
	raw, _ := json.Marshal(got)
	require.NotContains(t, string(raw), hash)
	require.NotContains(t, string(raw), key)

	// The key opens the product's routes at once.
	status, _, _ = h.do("GET", "/engines", nil, platform(key))
	require.Equal(t, http.StatusOK, status)

	// No policy = no limits; null is the same as absent.
	status, body, _ = h.do("POST", "/products/register", `{"slug":"beta","display_name":"Beta","policy":null}`, admin())
	require.Equal(t, http.StatusOK, status, body)
	status, got, _ = h.do("GET", "/products/"+body["product_id"].(string), nil, admin())
	require.Equal(t, http.StatusOK, status)
	require.Equal(t, map[string]any{}, got["policy"])
}

func TestRegisterRejects(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", testConfig())
	h.register("taken", nil)
	cases := []struct {
		name   string
		body   string
		status int
		code   string
	}{
		{"slug exists", `{"slug":"taken","display_name":"x"}`, 409, "PRODUCT_SLUG_EXISTS"},
		{"uppercase slug", `{"slug":"Acme","display_name":"x"}`, 400, "INVALID_REQUEST"},
		{"dash first", `{"slug":"-acme","display_name":"x"}`, 400, "INVALID_REQUEST"},
		{"empty slug", `{"slug":"","display_name":"x"}`, 400, "INVALID_REQUEST"},
		{"long slug", `{"slug":"` + strings.Repeat("a", 64) + `","display_name":"x"}`, 400, "INVALID_REQUEST"},
		{"no slug", `{"display_name":"x"}`, 400, "INVALID_REQUEST"},
		{"no display name", `{"slug":"a1"}`, 400, "INVALID_REQUEST"},
		{"blank display name", `{"slug":"a1","display_name":"   "}`, 400, "INVALID_REQUEST"},
		{"NUL in display name", `{"slug":"a1","display_name":"a\u0000b"}`, 400, "INVALID_REQUEST"},
		{"unknown policy key", `{"slug":"a1","display_name":"x","policy":{"max_engine":3}}`, 400, "INVALID_REQUEST"},
		{"policy key in other case", `{"slug":"a1","display_name":"x","policy":{"MAX_ENGINES":3}}`, 400, "INVALID_REQUEST"},
		{"policy string value", `{"slug":"a1","display_name":"x","policy":{"max_engines":"3"}}`, 400, "INVALID_REQUEST"},
		{"policy fraction", `{"slug":"a1","display_name":"x","policy":{"rate_limit_rpm":1.5}}`, 400, "INVALID_REQUEST"},
		{"policy negative", `{"slug":"a1","display_name":"x","policy":{"rate_limit_rpm":-1}}`, 400, "INVALID_REQUEST"},
		{"policy too big", `{"slug":"a1","display_name":"x","policy":{"max_engines":1e30}}`, 400, "INVALID_REQUEST"},
		{"policy array", `{"slug":"a1","display_name":"x","policy":[1]}`, 400, "INVALID_REQUEST"},
		{"policy nested", `{"slug":"a1","display_name":"x","policy":{"max_engines":{"n":1}}}`, 400, "INVALID_REQUEST"},
		{"not json", `{"slug":`, 400, "INVALID_REQUEST"},
		{"empty body", ``, 400, "INVALID_REQUEST"},
	}
	for _, c := range cases {
		status, body, _ := h.do("POST", "/products/register", c.body, admin())
		require.Equal(t, c.status, status, "%s: %v", c.name, body)
		require.Equal(t, c.code, errCode(body), c.name)
	}
	require.Equal(t, 1, countProducts(t, h.Pool), "a refused registration wrote a row")
}

func TestListProducts(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", testConfig())
	for _, s := range []string{"p1", "p2", "p3"} {
		h.register(s, nil)
	}
	status, body, _ := h.do("GET", "/products?limit=2", nil, admin())
	require.Equal(t, http.StatusOK, status)
	require.Equal(t, float64(3), body["total"])
	ps := body["products"].([]any)
	require.Len(t, ps, 2)
	require.Equal(t, "p1", ps[0].(map[string]any)["slug"])
	_, _, _ = h.do("GET", "/products?limit=2&offset=2", nil, admin())
	status, body, _ = h.do("GET", "/products?limit=2&offset=2", nil, admin())
	require.Equal(t, http.StatusOK, status)
	require.Len(t, body["products"].([]any), 1)
	status, body, _ = h.do("GET", "/products?offset=10", nil, admin())
	require.Equal(t, http.StatusOK, status)
	require.Equal(t, []any{}, body["products"])
	status, body, _ = h.do("GET", "/products?limit=0", nil, admin())
	require.Equal(t, http.StatusBadRequest, status)
	require.Equal(t, "INVALID_REQUEST", errCode(body))

	for _, id := range []string{uuid.NewString(), "not-a-uuid"} {
		status, body, _ = h.do("GET", "/products/"+id, nil, admin())
		require.Equal(t, http.StatusNotFound, status)
		require.Equal(t, "PRODUCT_NOT_FOUND", errCode(body))
	}
}

// ---- policy ----

func TestUpdatePolicy(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", testConfig())
	id, _ := h.register("acme", map[string]any{"max_engines": 2})

	status, body, _ := h.do("PUT", "/products/"+id+"/policy", map[string]any{"policy": map[string]any{"rate_limit_rpm": 100}}, admin())
	require.Equal(t, http.StatusOK, status, body)
	require.Equal(t, map[string]any{"policy": map[string]any{"rate_limit_rpm": float64(100)}}, body)
	_, got, _ := h.do("GET", "/products/"+id, nil, admin())
	require.Equal(t, map[string]any{"rate_limit_rpm": float64(100)}, got["policy"], "PUT replaces the whole policy")

	md := audits(t, h.Pool, id, orch.ActionPolicyUpdate)
	require.Len(t, md, 1)
	require.Equal(t, map[string]any{"rate_limit_rpm": float64(100)}, md[0]["policy"])
	require.Equal(t, map[string]any{"max_engines": float64(2)}, md[0]["previous"])

	// {} removes every limit.
	status, body, _ = h.do("PUT", "/products/"+id+"/policy", `{"policy":{}}`, admin())
	require.Equal(t, http.StatusOK, status)
	require.Equal(t, map[string]any{"policy": map[string]any{}}, body)

	for _, bad := range []string{`{}`, `{"policy":null}`, `{"policy":{"max_engines":-1}}`, `{"policy":{"burst":3}}`,
		`{"policy":{"Rate_Limit_RPM":3}}`, `{"policy":{"max_engines":true}}`, `{"policy":"{}"}`} {
		status, body, _ = h.do("PUT", "/products/"+id+"/policy", bad, admin())
		require.Equal(t, http.StatusBadRequest, status, "%s: %v", bad, body)
		require.Equal(t, "INVALID_REQUEST", errCode(body), bad)
	}
	require.Len(t, audits(t, h.Pool, id, orch.ActionPolicyUpdate), 2, "refused updates are not audited")

	for _, missing := range []string{uuid.NewString(), "nope"} {
		status, body, _ = h.do("PUT", "/products/"+missing+"/policy", `{"policy":{}}`, admin())
		require.Equal(t, http.StatusNotFound, status)
		require.Equal(t, "PRODUCT_NOT_FOUND", errCode(body))
	}
}

// ---- platform keys ----

func TestRotatePlatformKey(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", testConfig())
	waitListeners(t, h.Pool, 1)
	id, oldKey := h.register("acme", nil)
	status, _, _ := h.do("GET", "/engines", nil, platform(oldKey)) // cached now
	require.Equal(t, http.StatusOK, status)

	status, body, _ := h.do("POST", "/products/"+id+"/rotate-platform-key", map[string]any{"overlap_seconds": 1}, admin())
	require.Equal(t, http.StatusOK, status, body)
	newKey := body["platform_api_key"].(string)
	require.NotEqual(t, oldKey, newKey)
	require.Equal(t, id, body["product_id"])
	exp, err := time.Parse(time.RFC3339Nano, body["previous_key_expires_at"].(string))
	require.NoError(t, err)
	require.WithinDuration(t, time.Now().Add(time.Second), exp, 500*time.Millisecond)

	// Inside the overlap both keys work.
	for _, k := range []string{oldKey, newKey} {
		status, _, _ = h.do("GET", "/engines", nil, platform(k))
		require.Equal(t, http.StatusOK, status)
	}
	time.Sleep(time.Until(exp) + 50*time.Millisecond) // the overlap runs out: the passage of time is what is tested
	status, body, _ = h.do("GET", "/engines", nil, platform(oldKey))
	require.Equal(t, http.StatusUnauthorized, status)
	require.Equal(t, "INVALID_PLATFORM_KEY", errCode(body))
	status, _, _ = h.do("GET", "/engines", nil, platform(newKey))
	require.Equal(t, http.StatusOK, status)

	md := audits(t, h.Pool, id, orch.ActionPlatformKeyRotated)
	require.Len(t, md, 1)
	require.Equal(t, float64(1), md[0]["overlap_seconds"])

	// Default overlap: 24 h. Without a body.
	status, body, _ = h.do("POST", "/products/"+id+"/rotate-platform-key", nil, admin())
	require.Equal(t, http.StatusOK, status, body)
	exp, err = time.Parse(time.RFC3339Nano, body["previous_key_expires_at"].(string))
	require.NoError(t, err)
	require.WithinDuration(t, time.Now().Add(24*time.Hour), exp, 5*time.Second)
	newest := body["platform_api_key"].(string)
	status, _, _ = h.do("GET", "/engines", nil, platform(newKey)) // now the previous key
	require.Equal(t, http.StatusOK, status)

	// overlap 0: the previous key stops at once; the one before is gone too.
	status, body, _ = h.do("POST", "/products/"+id+"/rotate-platform-key", `{"overlap_seconds":0}`, admin())
	require.Equal(t, http.StatusOK, status, body)
	for _, k := range []string{oldKey, newKey, newest} {
		status, body, _ = h.do("GET", "/engines", nil, platform(k))
		require.Equal(t, http.StatusUnauthorized, status)
		require.Equal(t, "INVALID_PLATFORM_KEY", errCode(body))
	}

	status, body, _ = h.do("POST", "/products/"+id+"/rotate-platform-key", `{"overlap_seconds":-1}`, admin())
	require.Equal(t, http.StatusBadRequest, status)
	require.Equal(t, "INVALID_REQUEST", errCode(body))
	status, body, _ = h.do("POST", "/products/"+uuid.NewString()+"/rotate-platform-key", `{}`, admin())
	require.Equal(t, http.StatusNotFound, status)
	require.Equal(t, "PRODUCT_NOT_FOUND", errCode(body))
}

// operations lists every registered operation as method, path template
// and security scheme.
type operation struct{ method, path, scheme string }

func operations(t *testing.T, h *harness) []operation {
	t.Helper()
	var out []operation
	for path, item := range h.Server.API().OpenAPI().Paths {
		for _, mo := range []struct {
			method string
			op     *huma.Operation
		}{{"GET", item.Get}, {"POST", item.Post}, {"PUT", item.Put}, {"PATCH", item.Patch}, {"DELETE", item.Delete}} {
			if mo.op == nil {
				continue
			}
			scheme := ""
			for _, req := range mo.op.Security {
				for name := range req {
					scheme = name
				}
			}
			out = append(out, operation{mo.method, path, scheme})
		}
	}
	return out
}

// fill replaces path parameters with plausible values.
func fill(path, productID string) string {
	r := strings.NewReplacer("{product_id}", productID, "{user_id}", "user-1", "{operation_id}", uuid.NewString(),
		"{backup_id}", uuid.NewString(), "{id}", uuid.NewString(), "{export_id}", uuid.NewString())
	return r.Replace(path)
}

func TestAuthMatrix(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.AuthFailuresPerSecond = -1 // hundreds of refusals in a row: 401s here, not the throttle's 429s
	h := newHarness(t, "", cfg)
	waitListeners(t, h.Pool, 1)
	id, key := h.register("acme", nil)
	otherID, oldKey := h.register("other", nil)
	// oldKey is rotated out with a 1-second overlap.
	status, body, _ := h.do("POST", "/products/"+otherID+"/rotate-platform-key", `{"overlap_seconds":1}`, admin())
	require.Equal(t, http.StatusOK, status, body)
	rotatedAt := time.Now()

	ops := operations(t, h)
	var nAdmin, nPlatform int
	for _, op := range ops {
		path := fill(op.path, id)
		name := op.method + " " + op.path
		switch op.scheme {
		case "adminKey":
			nAdmin++
			for _, hdr := range []map[string]string{nil, {"X-Admin-Key": "wrong-admin-key-0123456789"},
				{"X-Admin-Key": testAdminKey + "x"}, platform(key)} {
				status, body, _ := h.do(op.method, path, `{}`, hdr)
				require.Equal(t, http.StatusUnauthorized, status, "%s with %v", name, hdr)
				require.Equal(t, "INVALID_ADMIN_KEY", errCode(body), name)
			}
			status, body, _ := h.do(op.method, path, `{}`, admin())
			require.NotEqual(t, http.StatusUnauthorized, status, "%s with the admin key: %v", name, body)
		case "platformKey":
			nPlatform++
			for _, hdr := range []map[string]string{nil, platform("not-a-key"), admin()} {
				status, body, _ := h.do(op.method, path, `{}`, hdr)
				require.Equal(t, http.StatusUnauthorized, status, "%s with %v", name, hdr)
				require.Equal(t, "INVALID_PLATFORM_KEY", errCode(body), name)
			}
		}
	}
	require.GreaterOrEqual(t, nAdmin, 5, "admin routes")
	require.GreaterOrEqual(t, nPlatform, 9, "platform routes")

	// After the overlap the rotated-out key is refused on every product route.
	time.Sleep(time.Until(rotatedAt.Add(1100 * time.Millisecond))) // the 1 s overlap runs out: time is what is tested
	for _, op := range ops {
		if op.scheme != "platformKey" {
			continue
		}
		status, body, _ := h.do(op.method, fill(op.path, id), `{}`, platform(oldKey))
		require.Equal(t, http.StatusUnauthorized, status, "%s %s with a rotated-out key", op.method, op.path)
		require.Equal(t, "INVALID_PLATFORM_KEY", errCode(body))
	}
}

// ---- the product cache ----

func TestProductCacheNoRoundTrip(t *testing.T) {
	t.Parallel()
	qc := &queryCounter{}
	h := newReplica(t, "", testConfig(), replicaOpts{tracer: qc})
	waitListeners(t, h.Pool, 1)
	// Inserted directly: a registration through the API sends a NOTIFY that
	// could land in the middle of the count below and drop the entry once.
	key := keys.Generate()
	rpm := 100000
	p, err := schema.New(h.Pool).InsertProduct(context.Background(), "acme", "acme", orch.Policy{RateLimitRPM: &rpm}, keys.Hash(key))
	require.NoError(t, err)
	id := p.ID
	const lookup = "api_key_hash = $1"
	status, _, _ := h.do("GET", "/engines", nil, platform(key)) // warm up
	require.Equal(t, http.StatusOK, status)
	lookups, leases := qc.count(lookup), qc.count("INSERT INTO rate_windows")
	require.GreaterOrEqual(t, lookups, 1)
	for range 25 {
		status, _, _ := h.do("GET", "/engines", nil, platform(key))
		require.Equal(t, http.StatusOK, status)
		status, _, _ = h.do("POST", "/engines/u1/admit", nil, platform(key))
		require.Equal(t, http.StatusOK, status)
	}
	require.Equal(t, lookups, qc.count(lookup), "nothing changed: the product is served from the cache")
	require.LessOrEqual(t, qc.count("INSERT INTO rate_windows")-leases, 1, "admits lease permits in batches")

	// A change drops the entry: one lookup again.
	status, _, _ = h.do("PUT", "/products/"+id+"/policy", `{"policy":{}}`, admin())
	require.Equal(t, http.StatusOK, status)
	require.Eventually(t, func() bool {
		h.do("GET", "/engines", nil, platform(key))
		return qc.count(lookup) > lookups
	}, time.Second, 10*time.Millisecond)
}

func TestSecondReplicaSeesChanges(t *testing.T) {
	t.Parallel()
	a := newHarness(t, "", testConfig())
	b := newHarness(t, a.DBURL, testConfig())
	waitListeners(t, a.Pool, 2)

	// A product registered on A works on B at once.
	id, key := a.register("acme", nil)
	status, _, hdr := b.do("POST", "/engines/u1/admit", nil, platform(key))
	require.Equal(t, http.StatusOK, status)
	require.Empty(t, hdr.Get("X-RateLimit-Limit"))

	// A policy change on A is honoured by B (which has the product cached) within a second.
	status, _, _ = a.do("PUT", "/products/"+id+"/policy", `{"policy":{"rate_limit_rpm":1000}}`, admin())
	require.Equal(t, http.StatusOK, status)
	require.Eventually(t, func() bool {
		_, _, hdr := b.do("POST", "/engines/u1/admit", nil, platform(key))
		return hdr.Get("X-RateLimit-Limit") == "1000"
	}, time.Second, 20*time.Millisecond)

	// A rotation on A without overlap: B refuses the old key within a second.
	status, body, _ := a.do("POST", "/products/"+id+"/rotate-platform-key", `{"overlap_seconds":0}`, admin())
	require.Equal(t, http.StatusOK, status)
	newKey := body["platform_api_key"].(string)
	require.Eventually(t, func() bool {
		status, _, _ := b.do("GET", "/engines", nil, platform(key))
		return status == http.StatusUnauthorized
	}, time.Second, 20*time.Millisecond)
	status, _, _ = b.do("GET", "/engines", nil, platform(newKey))
	require.Equal(t, http.StatusOK, status)
}

// ---- rate limit across replicas ----

func TestRateLimitAcrossReplicas(t *testing.T) {
	t.Parallel()
	const limit = 40
	a := newHarness(t, "", testConfig())
	b := newReplica(t, a.DBURL, testConfig(), replicaOpts{keyring: a.Keyring}) // replicas share the master key
	id, key := a.register("acme", map[string]any{"rate_limit_rpm": limit})
	// A user with a running engine and a missing user (answered 200 admitted:false).
	a.insertEngine(id, "alice", 20001, orch.StateRunning)

	testenv.AwayFromMinuteEnd(4 * time.Second)
	var mu sync.Mutex
	counts := map[int]int{}
	var wg sync.WaitGroup
	for i := range 300 {
		wg.Go(func() {
			h := a
			if i%2 == 1 {
				h = b
			}
			user := "alice"
			if i%3 == 0 {
				user = "nobody"
			}
			req, _ := http.NewRequest("POST", h.URL+"/engines/"+user+"/admit", nil)
			req.Header.Set("X-Platform-Key", key)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			defer resp.Body.Close()
			var body map[string]any
			json.NewDecoder(resp.Body).Decode(&body) //nolint:errcheck
			switch resp.StatusCode {
			case http.StatusOK:
				if resp.Header.Get("X-RateLimit-Limit") != strconv.Itoa(limit) {
					t.Errorf("200 without X-RateLimit-Limit: %v", resp.Header)
				}
				if _, err := strconv.Atoi(resp.Header.Get("X-RateLimit-Remaining")); err != nil {
					t.Errorf("200 without X-RateLimit-Remaining: %v", resp.Header)
				}
			case http.StatusTooManyRequests:
				if errCode(body) != "RATE_LIMITED" {
					t.Errorf("429 code %q", errCode(body))
				}
				ra, err := strconv.Atoi(resp.Header.Get("Retry-After"))
				if err != nil || ra < 1 || ra > 60 {
					t.Errorf("429 Retry-After %q", resp.Header.Get("Retry-After"))
				}
			}
			mu.Lock()
			counts[resp.StatusCode]++
			mu.Unlock()
		})
	}
	wg.Wait()
	require.Equal(t, limit, counts[http.StatusOK], "admitted across both replicas: %v", counts)
	require.Equal(t, 300-limit, counts[http.StatusTooManyRequests], "%v", counts)

	// Both replicas deny until the window ends.
	for _, h := range []*harness{a, b} {
		status, body, hdr := h.do("POST", "/engines/alice/admit", nil, platform(key))
		require.Equal(t, http.StatusTooManyRequests, status)
		require.Equal(t, "RATE_LIMITED", errCode(body))
		require.NotEmpty(t, hdr.Get("Retry-After"))
		require.Equal(t, strconv.Itoa(limit), hdr.Get("X-RateLimit-Limit"), "a 429 admit still carries the rate-limit headers")
		require.Equal(t, "0", hdr.Get("X-RateLimit-Remaining"))
	}
	// Denials are audited (sampled).
	require.Eventually(t, func() bool {
		var n int
		a.Pool.QueryRow(context.Background(), `SELECT count(*) FROM audit_log WHERE product_id = $1 AND action = 'admit_denied'
			AND metadata->>'reason' = 'rate_limited'`, id).Scan(&n) //nolint:errcheck
		return n >= 1
	}, 5*time.Second, 20*time.Millisecond)
}

// ---- logs ----

func TestNoKeyMaterialInLogs(t *testing.T) {
	t.Parallel()
	var buf testenv.SyncBuffer
	log := slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	h := newReplica(t, "", testConfig(), replicaOpts{log: log})

	id, key := h.register("acme", map[string]any{"rate_limit_rpm": 3})
	e := h.insertEngine(id, "alice", 20001, orch.StateRunning)
	engineKey, err := h.Keyring.Decrypt(e.KeyEnc)
	require.NoError(t, err)
	for range 5 { // 3 admitted, then 429s
		h.do("POST", "/engines/alice/admit", nil, platform(key))
	}
	h.do("GET", "/engines/alice", nil, platform(key))
	h.do("POST", "/engines/nobody/admit", nil, platform("wrong-"+key))
	h.do("PUT", "/products/"+id+"/policy", `{"policy":{"max_engines":1}}`, admin())
	h.do("PUT", "/products/"+id+"/policy", `{"policy":{"bogus":1}}`, admin())
	h.do("GET", "/products", nil, map[string]string{"X-Admin-Key": "guess-" + testAdminKey})
	status, body, _ := h.do("POST", "/products/"+id+"/rotate-platform-key", `{"overlap_seconds":0}`, admin())
	require.Equal(t, http.StatusOK, status)
	newKey := body["platform_api_key"].(string)
	h.do("GET", "/engines", nil, platform(newKey))
	h.do("GET", "/engines", nil, platform(key))
	h.do("POST", "/products/register", `{"slug":"acme","display_name":"dup"}`, admin())

	logs := buf.String()
	require.Contains(t, logs, `"path":"/products/register"`, "the access log was captured")
	for name, secret := range map[string]string{
		"platform key": key, "platform key hash": keys.Hash(key),
		"new platform key": newKey, "new platform key hash": keys.Hash(newKey),
		"admin key": testAdminKey, "admin key hash": keys.Hash(testAdminKey),
		"engine key": engineKey, "engine key hash": e.KeyHash, "engine key token": e.KeyEnc,
	} {
		require.NotContains(t, logs, secret, "the logs contain the %s", name)
	}
}
