package console_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/console"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

const adminKey = "console-test-admin-key-0123456789"

// fakeActions records what the console asked for.
type fakeActions struct {
	mu    sync.Mutex
	calls []string
	err   error
}

func (f *fakeActions) record(s string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, s)
	if f.err != nil {
		return "", f.err
	}
	return uuid.NewString(), nil
}

func (f *fakeActions) Operate(_ context.Context, productID, userID string, kind orch.OpKind, actor string) (string, error) {
	return f.record(fmt.Sprintf("%s %s/%s by %s", kind, productID, userID, actor))
}

func (f *fakeActions) Backup(_ context.Context, productID, userID, actor string) (string, error) {
	return f.record(fmt.Sprintf("backup %s/%s by %s", productID, userID, actor))
}

func (f *fakeActions) Restore(_ context.Context, productID, userID, backupID, actor string) (string, error) {
	return f.record(fmt.Sprintf("restore %s %s/%s by %s", backupID, productID, userID, actor))
}

func (f *fakeActions) SetPolicy(_ context.Context, productID string, p orch.Policy, actor string) error {
	_, err := f.record(fmt.Sprintf("policy %s max=%v by %s", productID, p.MaxEngines != nil, actor))
	return err
}

func (f *fakeActions) list() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

type env struct {
	t       *testing.T
	pool    *pgxpool.Pool
	url     string
	actions *fakeActions
}

func newEnv(t *testing.T) *env {
	t.Helper()
	pool := testenv.Pool(t, testenv.DB(t))
	acts := &fakeActions{}
	c, err := console.New(console.Config{AdminKey: adminKey, PortMin: 9001, PortMax: 9999,
		Log: testenv.Quiet()}, pool, acts)
	require.NoError(t, err)
	mux := http.NewServeMux()
	mux.Handle(console.Path, c)
	mux.Handle(console.Path+"/", c)
	ts := httptest.NewServer(mux)
	t.Cleanup(ts.Close)
	return &env{t: t, pool: pool, url: ts.URL, actions: acts}
}

// browser is a cookie-keeping client that does not follow redirects.
func (e *env) browser() *http.Client {
	jar, err := cookiejar.New(nil)
	require.NoError(e.t, err)
	return &http.Client{Jar: jar, Timeout: 30 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

type page struct {
	status int
	body   string
	header http.Header
}

func (e *env) get(c *http.Client, path string) page {
	e.t.Helper()
	return e.send(c, http.MethodGet, path, nil, nil)
}

func (e *env) post(c *http.Client, path string, form url.Values, hdr map[string]string) page {
	e.t.Helper()
	return e.send(c, http.MethodPost, path, form, hdr)
}

func (e *env) send(c *http.Client, method, path string, form url.Values, hdr map[string]string) page {
	e.t.Helper()
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req, err := http.NewRequest(method, e.url+path, body)
	require.NoError(e.t, err)
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	res, err := c.Do(req)
	require.NoError(e.t, err)
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	require.NoError(e.t, err)
	return page{status: res.StatusCode, body: string(b), header: res.Header}
}

func (e *env) login(c *http.Client, key, name string) page {
	e.t.Helper()
	return e.post(c, "/console/login", url.Values{"key": {key}, "name": {name}, "next": {"/console/"}}, nil)
}

var csrfRE = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

func csrfOf(t *testing.T, p page) string {
	t.Helper()
	m := csrfRE.FindStringSubmatch(p.body)
	require.NotNil(t, m, "no CSRF token in page")
	return m[1]
}

// seed inserts a product and n engines (states rotating, four nodes, two
// images) straight into the database; returns the product and its key.
func (e *env) seed(slug string, n, portBase int) (orch.Product, string) {
	e.t.Helper()
	ctx := context.Background()
	key := keys.Generate()
	p, err := schema.New(e.pool).InsertProduct(ctx, slug, slug+" product", orch.Policy{}, keys.Hash(key))
	require.NoError(e.t, err)
	_, err = e.pool.Exec(ctx, `INSERT INTO engines (id, product_id, user_id, status, node, port, engine_version,
			engine_key_hash, engine_key_enc, health_failures, last_health_at, last_active_at, created_at)
		SELECT gen_random_uuid(), $1, $2 || '-user-' || lpad(i::text, 5, '0'),
			(ARRAY['running','running','running','sleeping','stopped','failed'])[1 + i % 6],
			'node-' || (i % 4), $3 + i, CASE WHEN i % 10 = 0 THEN 'enginefleet/engine:2' ELSE 'enginefleet/engine:1' END,
			'h', 't', CASE WHEN i % 6 = 5 THEN 3 ELSE 0 END, now() - (i || ' seconds')::interval,
			now() - (i || ' minutes')::interval, now() - (i || ' minutes')::interval
		FROM generate_series(1, $4::int) AS i`, p.ID, slug, portBase, n)
	require.NoError(e.t, err)
	return p, key
}

func (e *env) engineID(productID, userID string) string {
	e.t.Helper()
	eng, err := schema.New(e.pool).EngineByUser(context.Background(), productID, userID)
	require.NoError(e.t, err)
	return eng.ID
}

func sum(xs []int) int {
	n := 0
	for _, x := range xs {
		n += x
	}
	return n
}

func TestLoginSessionAndHeaders(t *testing.T) {
	e := newEnv(t)
	var other *console.Console
	_, err := e.pool.Exec(context.Background(), `INSERT INTO audit_log ("timestamp", action, actor) VALUES
		(now() - interval '2 minutes', 'restart', 'admin'), (now() - interval '2 minutes', 'auto_restart_start', 'system'),
		(now() - interval '3 minutes', 'health_failed', 'system'), (now() - interval '2 hours', 'restart', 'admin')`)
	require.NoError(t, err)
	c := e.browser()

	p := e.get(c, "/console/engines?state=failed")
	require.Equal(t, http.StatusSeeOther, p.status)
	require.Equal(t, "/console/login?next="+url.QueryEscape("/console/engines?state=failed"), p.header.Get("Location"))

	p = e.get(c, "/console/login")
	require.Equal(t, http.StatusOK, p.status)
	csp := p.header.Get("Content-Security-Policy")
	require.Contains(t, csp, "script-src 'self'")
	require.Contains(t, csp, "frame-ancestors 'none'")
	require.NotContains(t, csp, "unsafe")
	require.Equal(t, "no-store", p.header.Get("Cache-Control"))

	start := time.Now()
	p = e.login(c, "wrong-key", "")
	require.Equal(t, http.StatusUnauthorized, p.status)
	require.GreaterOrEqual(t, time.Since(start), 400*time.Millisecond, "a wrong key costs time")
	require.Contains(t, p.body, "not accepted")

	p = e.login(c, adminKey, "alice")
	require.Equal(t, http.StatusSeeOther, p.status)
	require.Equal(t, "/console/", p.header.Get("Location"))
	sc := p.header.Get("Set-Cookie")
	require.Contains(t, sc, "HttpOnly")
	require.Contains(t, sc, "SameSite=Strict")
	require.Contains(t, sc, "Path=/console")
	require.NotContains(t, sc, "Secure", "plain HTTP: no Secure flag")
	require.NotContains(t, sc, adminKey)

	p = e.get(c, "/console/")
	require.Equal(t, http.StatusOK, p.status, p.body)
	require.Contains(t, p.body, "admin (alice)")
	require.NotContains(t, p.body, adminKey)
	require.Contains(t, p.body, `src="/console/static/console-v1.js"`)
	require.NotRegexp(t, `<script>|style="`, p.body, "no inline script or style")

	// Behind a TLS proxy the cookie is Secure.
	p = e.post(e.browser(), "/console/login", url.Values{"key": {adminKey}}, map[string]string{"X-Forwarded-Proto": "https"})
	require.Contains(t, p.header.Get("Set-Cookie"), "Secure")

	// A tampered cookie is no session.
	u, _ := url.Parse(e.url + "/console/")
	ck := c.Jar.Cookies(u)
	require.Len(t, ck, 1)
	forged := e.browser()
	forged.Jar.SetCookies(u, []*http.Cookie{{Name: ck[0].Name, Value: strings.Replace(ck[0].Value, "a", "b", 1), Path: "/console"}})
	require.Equal(t, http.StatusSeeOther, e.get(forged, "/console/").status)
	// Another admin key signs other sessions.
	other, err = console.New(console.Config{AdminKey: "another-admin-key"}, e.pool, e.actions)
	require.NoError(t, err)
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodGet, "/console/", nil)
	req.AddCookie(ck[0])
	other.ServeHTTP(rec, req)
	require.Equal(t, http.StatusSeeOther, rec.Code)

	// The script and stylesheet are embedded and served.
	js := e.get(c, "/console/static/console-v1.js")
	require.Equal(t, http.StatusOK, js.status)
	require.Contains(t, js.header.Get("Content-Type"), "javascript")
	require.Contains(t, js.body, "use strict")

	// The JSON endpoint needs a session too; it counts the last hour from
	// the audit log, minute by minute (rows inserted at the start: the
	// numbers are cached for 2 s).
	require.Equal(t, http.StatusUnauthorized, e.get(e.browser(), "/console/api/live").status)
	live := e.get(c, "/console/api/live")
	require.Equal(t, http.StatusOK, live.status, live.body)
	var l console.Live
	require.NoError(t, json.Unmarshal([]byte(live.body), &l))
	require.Len(t, l.Minutes.Restarts, 61)
	require.Equal(t, 2, sum(l.Minutes.Restarts))
	require.Equal(t, 1, sum(l.Minutes.Crashes))
	require.InDelta(t, 0.4, l.RestartsPerMin, 0.001)
	require.Len(t, l.ByState, len(orch.States))

	// Log out (a POST with the token) ends the session in this browser.
	home := e.get(c, "/console/")
	p = e.post(c, "/console/logout", url.Values{"csrf": {csrfOf(t, home)}}, nil)
	require.Equal(t, http.StatusSeeOther, p.status)
	require.Equal(t, http.StatusSeeOther, e.get(c, "/console/").status)
}

func TestActionsNeedCSRFAndAreAudited(t *testing.T) {
	e := newEnv(t)
	prod, _ := e.seed("acme", 3, 20000)
	id := e.engineID(prod.ID, "acme-user-00001") // running
	c := e.browser()
	require.Equal(t, http.StatusSeeOther, e.login(c, adminKey, "bob").status)

	conf := e.get(c, "/console/engines/"+id+"/confirm?action=restart")
	require.Equal(t, http.StatusOK, conf.status, conf.body)
	require.Contains(t, conf.body, "Restart the engine")
	token := csrfOf(t, conf)

	// No token, a wrong token, another site: refused, nothing done.
	form := url.Values{"action": {"restart"}}
	require.Equal(t, http.StatusForbidden, e.post(c, "/console/engines/"+id+"/actions", form, nil).status)
	form.Set("csrf", "nope")
	require.Equal(t, http.StatusForbidden, e.post(c, "/console/engines/"+id+"/actions", form, nil).status)
	form.Set("csrf", token)
	p := e.post(c, "/console/engines/"+id+"/actions", form, map[string]string{"Sec-Fetch-Site": "cross-site"})
	require.Equal(t, http.StatusForbidden, p.status)
	require.Empty(t, e.actions.list())

	p = e.post(c, "/console/engines/"+id+"/actions", form, nil)
	require.Equal(t, http.StatusSeeOther, p.status, p.body)
	require.Regexp(t, `^/console/engines/`+id+`\?op=[0-9a-f-]{36}$`, p.header.Get("Location"))
	require.Equal(t, []string{"restart " + prod.ID + "/acme-user-00001 by admin"}, e.actions.list())

	var actor string
	var meta map[string]any
	require.NoError(t, e.pool.QueryRow(context.Background(), `SELECT actor, metadata FROM audit_log
		WHERE action = 'admin_request' AND engine_id = $1`, id).Scan(&actor, &meta))
	require.Equal(t, "admin", actor)
	require.Equal(t, "console", meta["via"])
	require.Equal(t, "restart", meta["request"])
	require.Equal(t, "bob", meta["operator"])
	require.Equal(t, "accepted", meta["outcome"])

	// Destroy asks for the user id typed out.
	form = url.Values{"action": {"destroy"}, "csrf": {token}, "confirm": {"acme-user-0000"}}
	p = e.post(c, "/console/engines/"+id+"/actions", form, nil)
	require.Equal(t, http.StatusBadRequest, p.status)
	require.Len(t, e.actions.list(), 1)
	form.Set("confirm", "acme-user-00001")
	p = e.post(c, "/console/engines/"+id+"/actions", form, nil)
	require.Equal(t, http.StatusSeeOther, p.status)
	require.True(t, strings.HasPrefix(p.header.Get("Location"), "/console/operations/"))

	// A refusal is shown with its code and audited as refused.
	e.actions.err = orch.Errorf(orch.CodeEngineNotRunning, "engine is stopped, not running")
	form = url.Values{"action": {"rotate_key"}, "csrf": {token}}
	p = e.post(c, "/console/engines/"+id+"/actions", form, nil)
	require.Equal(t, http.StatusConflict, p.status)
	require.Contains(t, p.body, "ENGINE_NOT_RUNNING")
	var n int
	require.NoError(t, e.pool.QueryRow(context.Background(), `SELECT count(*) FROM audit_log WHERE action = 'admin_request'
		AND metadata->>'outcome' = 'refused' AND metadata->>'error_code' = 'ENGINE_NOT_RUNNING'`).Scan(&n))
	require.Equal(t, 1, n)
	e.actions.err = nil

	// Restore offers the user's backups and names the one restored.
	backupID := uuid.NewString()
	_, err := e.pool.Exec(context.Background(), `INSERT INTO backups (id, engine_id, product_id, user_id, node, path, size_bytes,
		sha256, engine_version, trigger) VALUES ($1, $2, $3, 'acme-user-00001', 'node-1', 'x/y.tar.gz', 123456, 'abc', 'img:1', 'manual')`,
		backupID, id, prod.ID)
	require.NoError(t, err)
	eng := e.get(c, "/console/engines/"+id)
	require.Contains(t, eng.body, "/confirm?action=restore&amp;backup="+backupID)
	require.Contains(t, eng.body, "120.6 KiB")
	conf = e.get(c, "/console/engines/"+id+"/confirm?action=restore&backup="+backupID)
	require.Equal(t, http.StatusOK, conf.status, conf.body)
	p = e.post(c, "/console/engines/"+id+"/actions", url.Values{"action": {"restore"}, "backup_id": {backupID}, "csrf": {token}}, nil)
	require.Equal(t, http.StatusSeeOther, p.status, p.body)
	require.Contains(t, e.actions.list()[len(e.actions.list())-1], "restore "+backupID)
	require.Equal(t, http.StatusNotFound, e.get(c, "/console/engines/"+id+"/confirm?action=restore&backup="+uuid.NewString()).status)
	bk := e.get(c, "/console/backups")
	require.Equal(t, http.StatusOK, bk.status, bk.body)
	require.Contains(t, bk.body, "1 backups, 120.6 KiB")

	// Freeze a product (policy) through the same guard.
	pol := e.get(c, "/console/products/"+prod.ID+"/policy?preset=freeze")
	require.Equal(t, http.StatusOK, pol.status, pol.body)
	require.Contains(t, pol.body, `name="max_engines" inputmode="numeric" pattern="[0-9]*" value="0"`)
	p = e.post(c, "/console/products/"+prod.ID+"/policy", url.Values{"csrf": {token}, "max_engines": {"0"}}, nil)
	require.Equal(t, http.StatusSeeOther, p.status, p.body)
	// (the fake does not write it: the products page of a frozen product)
	zero := 0
	_, err = schema.New(e.pool).UpdatePolicy(context.Background(), prod.ID, orch.Policy{MaxEngines: &zero})
	require.NoError(t, err)
	p = e.get(c, "/console/products")
	require.Equal(t, http.StatusOK, p.status, p.body)
	require.Contains(t, p.body, "frozen")
	require.Contains(t, p.body, "preset=unfreeze")
	p = e.post(c, "/console/products/"+prod.ID+"/policy", url.Values{"csrf": {token}, "max_engines": {"-3"}}, nil)
	require.Equal(t, http.StatusBadRequest, p.status)
	require.Contains(t, e.actions.list()[len(e.actions.list())-1], "policy "+prod.ID+" max=true by admin")
}

func TestPlatformKeySessionIsReadOnlyAndScoped(t *testing.T) {
	e := newEnv(t)
	acme, acmeKey := e.seed("acme", 5, 20000)
	other, _ := e.seed("other", 5, 21000)
	c := e.browser()
	require.Equal(t, http.StatusSeeOther, e.login(c, acmeKey, "").status)

	p := e.get(c, "/console/engines")
	require.Equal(t, http.StatusOK, p.status, p.body)
	require.Contains(t, p.body, "product acme (read-only)")
	require.Contains(t, p.body, "acme-user-00001")
	require.NotContains(t, p.body, "other-user-")
	require.NotContains(t, p.body, "/confirm?action=", "no action buttons")

	otherID := e.engineID(other.ID, "other-user-00001")
	require.Equal(t, http.StatusNotFound, e.get(c, "/console/engines/"+otherID).status)
	acmeID := e.engineID(acme.ID, "acme-user-00001")
	eng := e.get(c, "/console/engines/"+acmeID)
	require.Equal(t, http.StatusOK, eng.status)
	require.NotContains(t, eng.body, "/confirm?action=")
	require.Equal(t, http.StatusForbidden, e.get(c, "/console/engines/"+acmeID+"/confirm?action=restart").status)
	p = e.post(c, "/console/engines/"+acmeID+"/actions", url.Values{"action": {"restart"}, "csrf": {csrfOf(t, eng)}}, nil)
	require.Equal(t, http.StatusForbidden, p.status)
	require.Empty(t, e.actions.list())

	live := e.get(c, "/console/api/live")
	require.Contains(t, live.body, `"total":5`)
	require.NotContains(t, live.body, `"ports"`, "fleet-wide numbers are the admin's")

	// Rotating the platform key out ends its sessions.
	_, err := schema.New(e.pool).RotatePlatformKey(context.Background(), acme.ID, keys.Hash(keys.Generate()), time.Now().Add(-time.Second))
	require.NoError(t, err)
	require.Equal(t, http.StatusSeeOther, e.get(c, "/console/engines").status)
}

// TestThousandEngines: the engines page pages and filters on the server
// and stays fast with a fleet of 1,200 engines.
func TestThousandEngines(t *testing.T) {
	e := newEnv(t)
	acme, _ := e.seed("acme", 1000, 20000)
	e.seed("beta", 200, 30000)
	c := e.browser()
	require.Equal(t, http.StatusSeeOther, e.login(c, adminKey, "").status)
	e.get(c, "/console/engines") // warm the pool

	start := time.Now()
	p := e.get(c, "/console/engines")
	took := time.Since(start)
	require.Equal(t, http.StatusOK, p.status, p.body)
	t.Logf("engines page, 1,200 engines: %s, %d bytes", took, len(p.body))
	require.Less(t, took, 2*time.Second, "generous bound for a 2-core machine under load")
	require.Contains(t, p.body, "1–50 of 1200 · page 1 of 24")
	require.Equal(t, 50, strings.Count(p.body, `<td><a href="/console/engines/`))

	p = e.get(c, "/console/engines?offset=50")
	require.Contains(t, p.body, "51–100 of 1200 · page 2 of 24")

	p = e.get(c, "/console/engines?product="+acme.ID+"&state=failed&sort=failures")
	require.Contains(t, p.body, "1–50 of 166 ")
	require.NotContains(t, p.body, "beta-user-")
	require.NotContains(t, p.body, `class="state state-running"`)

	p = e.get(c, "/console/engines?q=ACME-USER-0099")
	require.Contains(t, p.body, "1–10 of 10 ")

	p = e.get(c, "/console/engines?image=enginefleet/engine:2&node=node-0")
	require.Contains(t, p.body, "of 60 ") // i % 10 = 0 and i % 4 = 0: i % 20 = 0 → 50 + 10

	start = time.Now()
	p = e.get(c, "/console/")
	t.Logf("overview, 1,200 engines: %s", time.Since(start))
	require.Equal(t, http.StatusOK, p.status, p.body)
	require.Contains(t, p.body, `data-live="total">1200<`)
	require.Less(t, time.Since(start), 3*time.Second)

	// Every other page renders at this size too.
	for _, path := range []string{"/console/products", "/console/operations", "/console/operations?view=failed",
		"/console/backups", "/console/audit", "/console/audit?action=provision&since=2h", "/console/engines/" + e.engineID(acme.ID, "acme-user-00007")} {
		p := e.get(c, path)
		require.Equal(t, http.StatusOK, p.status, "%s: %s", path, p.body)
	}
	require.Equal(t, http.StatusBadRequest, e.get(c, "/console/audit?since=yesterday").status)
	require.Equal(t, http.StatusNotFound, e.get(c, "/console/engines/"+uuid.NewString()).status)
	require.Equal(t, http.StatusNotFound, e.get(c, "/console/nowhere").status)
}
