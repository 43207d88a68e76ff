package e2e_test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
)

// The operator console in a real browser: Debian's headless Chromium
// driven over the DevTools protocol (chromedp) against a whole fleet
// (API, workers, subprocess engines) on a fresh database, with 1,000 more
// engine rows on another node for scale. It logs in with the admin key,
// finds an engine, restarts, stops and starts it from the pages and sees
// its state change without reloading; screenshots of the main pages go to
// .data/artifacts/console/. Any error in the browser's console (a script
// error, a CSP violation, a failed request) fails the test.

// chromiumPath finds Debian's chromium (or another Chrome) or reports it
// unavailable: a failure under CI=true, a skip otherwise.
func chromiumPath(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	testenv.Unavailable(t, "no chromium on PATH (Debian: apt-get install chromium)")
	return ""
}

// browserSession is one headless browser tab and what its console said.
type browserSession struct {
	t         *testing.T
	ctx       context.Context
	artifacts string

	mu       sync.Mutex
	messages []chromedp.ConsoleMessage
}

func newBrowser(t *testing.T) *browserSession {
	t.Helper()
	exe := chromiumPath(t)
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(exe), chromedp.NoSandbox,
		chromedp.WindowSize(1440, 1000), chromedp.Flag("disable-gpu", true), chromedp.Flag("lang", "en-US"))
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelTab := chromedp.NewContext(actx)
	t.Cleanup(func() { cancelTab(); cancelAlloc() })
	dir := filepath.Join("..", ".data", "artifacts", "console")
	require.NoError(t, os.MkdirAll(dir, 0o755))
	b := &browserSession{t: t, ctx: ctx, artifacts: dir}
	// Start the browser, then read its console for the whole test.
	start := time.Now()
	require.NoError(t, chromedp.Do(ctx, chromedp.Navigate("about:blank")))
	t.Logf("chromium started in %s (%s)", time.Since(start).Round(time.Millisecond), exe)
	messages := chromedp.Console(ctx)
	go func() {
		for m, err := range messages {
			if err != nil {
				return
			}
			b.mu.Lock()
			b.messages = append(b.messages, m)
			b.mu.Unlock()
		}
	}()
	return b
}

// do runs browser steps with a bound, failing the test on error with a
// screenshot of where it stood.
func (b *browserSession) do(what string, steps ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 90*time.Second)
	defer cancel()
	if err := chromedp.Do(ctx, steps...); err != nil {
		b.shot("failed-" + strings.ReplaceAll(what, " ", "-"))
		loc, _ := chromedp.Run(b.ctx, chromedp.Location())
		b.t.Fatalf("browser: %s: %v (at %s; console: %v)", what, err, loc, b.errors())
	}
}

// waitJS waits until a JavaScript expression is true in the page.
func (b *browserSession) waitJS(what, expr string, timeout time.Duration) {
	b.t.Helper()
	b.do(what, func(ctx context.Context, t *chromedp.Target) (chromedp.Void, error) {
		_, err := chromedp.Poll[bool](expr, chromedp.WithPollingTimeout(timeout), chromedp.WithPollingInterval(100*time.Millisecond))(ctx, t)
		return chromedp.Void{}, err
	})
}

// checkAccessible fails the test when the page has a form control
// without a label, an image or chart without a text alternative, or a
// table without header cells.
func (b *browserSession) checkAccessible(where string) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
	defer cancel()
	bad, err := chromedp.Run(ctx, chromedp.Evaluate[[]string](`(() => {
		const out = [];
		for (const e of document.querySelectorAll('input:not([type=hidden]), select, textarea')) {
			if (!e.labels || e.labels.length === 0) out.push('unlabelled ' + e.tagName + '#' + e.id + '[name=' + e.name + ']');
		}
		for (const e of document.querySelectorAll('svg[role=img]')) {
			if (!e.getAttribute('aria-label') && !e.getAttribute('aria-labelledby')) out.push('svg without a text alternative');
		}
		for (const e of document.querySelectorAll('table')) {
			if (!e.querySelector('th')) out.push('table without header cells');
		}
		for (const e of document.querySelectorAll('a, button')) {
			if (!e.textContent.trim() && !e.getAttribute('aria-label')) out.push('nameless ' + e.tagName);
		}
		if (!document.documentElement.lang) out.push('no lang');
		return out;
	})()`))
	require.NoError(b.t, err)
	require.Empty(b.t, bad, "accessibility of %s", where)
}

func (b *browserSession) text(sel string) string {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
	defer cancel()
	s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(sel)))
	require.NoError(b.t, err, "text of %s", sel)
	return strings.TrimSpace(s)
}

func (b *browserSession) location() string {
	b.t.Helper()
	s, err := chromedp.Run(b.ctx, chromedp.Location())
	require.NoError(b.t, err)
	return s
}

// shot saves a full-page screenshot as <name>.png in the artifacts.
func (b *browserSession) shot(name string) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
	defer cancel()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		b.t.Logf("screenshot %s: %v", name, err)
		return
	}
	p := filepath.Join(b.artifacts, name+".png")
	require.NoError(b.t, os.WriteFile(p, png, 0o644))
}

// errors lists the console's errors and exceptions so far.
func (b *browserSession) errors() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for _, m := range b.messages {
		if m.Type == chromedp.ConsoleError || m.IsException() {
			out = append(out, fmt.Sprintf("%s (%s:%d)", m, m.URL, m.Line+1))
		}
	}
	return out
}

func (b *browserSession) clearMessages() {
	b.mu.Lock()
	b.messages = nil
	b.mu.Unlock()
}

func TestConsoleInBrowser(t *testing.T) {
	b := newBrowser(t)
	f := newFleet(t, fleetOpts{})
	start := time.Now()
	prodID, key := f.product("acme", orch.Policy{})
	f.product("globex", orch.Policy{})
	alice := f.provisionUser(key, "alice")
	f.provisionUser(key, "bob")
	// A thousand more engines of another product on a node no worker
	// of this fleet serves: the pages at scale (workers never touch them).
	_, err := f.Pool.Exec(context.Background(), `INSERT INTO engines (id, product_id, user_id, status, node, port,
			engine_version, engine_key_hash, engine_key_enc, health_failures, last_health_at, last_active_at, created_at)
		SELECT gen_random_uuid(), (SELECT id FROM products WHERE slug = 'globex'), 'g-user-' || lpad(i::text, 4, '0'),
			(ARRAY['running','running','running','sleeping','stopped','failed'])[1 + i % 6], 'seed-node-' || (i % 3), 20000 + i,
			'enginefleet/engine:e2e-' || (1 + i % 2), 'h', 't', CASE WHEN i % 6 = 5 THEN 3 ELSE 0 END,
			now() - (i || ' seconds')::interval, now() - (i || ' minutes')::interval, now() - (i || ' minutes')::interval
		FROM generate_series(1, 1000) AS i`)
	require.NoError(t, err)
	// And a day of health history for one of them: sampled checks every
	// 10 minutes, failing for the last hour, then marked failed.
	_, err = f.Pool.Exec(context.Background(), `INSERT INTO audit_log ("timestamp", product_id, user_id, engine_id, action, actor, metadata, duration_ms)
		SELECT now() - (i * 10 || ' minutes')::interval, e.product_id, e.user_id, e.id, 'health_check', 'system',
			CASE WHEN i < 6 THEN '{"ok": false, "error": "timeout", "failures": 1}'::jsonb ELSE '{"ok": true, "sampled": true}'::jsonb END,
			CASE WHEN i < 6 THEN 2000 ELSE 5 + (i * 7) % 40 END
		FROM engines e, generate_series(1, 144) AS i WHERE e.user_id = 'g-user-0005'
		UNION ALL
		SELECT now() - interval '5 minutes', e.product_id, e.user_id, e.id, 'health_failed', 'system', '{"reason": "health", "failures": 3}', NULL
		FROM engines e WHERE e.user_id = 'g-user-0005'`)
	require.NoError(t, err)
	t.Logf("fleet with 2 live and 1,000 seeded engines ready in %s", time.Since(start).Round(time.Millisecond))

	// The detector works: a console.error in the page is seen.
	b.do("probe console", chromedp.Navigate(f.URL+"/console/login"))
	b.do("console.error probe", func(ctx context.Context, tg *chromedp.Target) (chromedp.Void, error) {
		_, err := chromedp.Evaluate[any](`console.error("console probe")`)(ctx, tg)
		return chromedp.Void{}, err
	})
	require.Eventually(t, func() bool { return len(b.errors()) == 1 }, 5*time.Second, 20*time.Millisecond, "console errors are captured")
	b.clearMessages()

	// Log in: any console page sends the browser to the login first.
	steps := time.Now()
	b.do("open the console", chromedp.Navigate(f.URL+"/console/engines"), chromedp.WaitVisible(chromedp.CSS("#key")))
	require.Contains(t, b.location(), "/console/login?next=")
	b.checkAccessible("login")
	b.shot("01-login")
	b.do("log in", chromedp.SendKeys(chromedp.CSS("#key"), adminKey), chromedp.SendKeys(chromedp.CSS("#name"), "e2e on-call"),
		chromedp.Click(chromedp.CSS("form.stack button[type=submit]")), chromedp.WaitVisible(chromedp.CSS("table.engines")))
	require.True(t, strings.HasSuffix(b.location(), "/console/engines"), b.location())
	require.Contains(t, b.text("header.top .who span"), "admin (e2e on-call)")
	require.Contains(t, b.text(".pager"), "of 1002")
	b.shot("02-engines-1002")

	// The fleet at a glance, live: the charts are drawn by the script.
	b.do("overview", chromedp.Click(chromedp.CSS(`header.top a[href="/console/"]`)), chromedp.WaitVisible(chromedp.CSS(".tiles")))
	b.waitJS("charts drawn", `document.querySelectorAll('svg[data-chart] text').length === 4 && document.querySelector('svg[data-track] polyline') !== null`, 20*time.Second)
	require.Equal(t, "1002", b.text(`[data-live="total"]`))
	b.checkAccessible("overview")
	b.shot("03-overview")

	// Find alice's engine by search.
	b.do("search", chromedp.Navigate(f.URL+"/console/engines"), chromedp.WaitVisible(chromedp.CSS("#q")),
		chromedp.SendKeys(chromedp.CSS("#q"), "ali"), chromedp.Submit(chromedp.CSS("#q")),
		chromedp.WaitVisible(chromedp.CSS(`table.engines a[href="/console/engines/`+alice.ID+`"]`)))
	require.Contains(t, b.text(".pager"), "1–1 of 1")
	b.checkAccessible("engines")
	b.shot("04-engines-search")
	// The keyboard: "/" jumps to the search box.
	b.do("slash", chromedp.Focus(chromedp.CSS("header.top .brand")), chromedp.KeyEvent("/"))
	b.waitJS("search focused", `document.activeElement && document.activeElement.id === 'q'`, 5*time.Second)
	b.do("open alice", chromedp.Click(chromedp.CSS(`table.engines a[href="/console/engines/`+alice.ID+`"]`)),
		chromedp.WaitVisible(chromedp.CSS("[data-engine-state]")))
	require.Equal(t, "running", b.text("[data-engine-state]"))
	b.shot("05-engine")

	// Restart it: confirm, then follow the operation to its end.
	b.do("restart", chromedp.Click(chromedp.CSS(`nav.actions a[href$="action=restart"]`)), chromedp.WaitVisible(chromedp.CSS("#confirm-action")))
	b.checkAccessible("confirm")
	b.shot("06-confirm-restart")
	b.do("confirm restart", chromedp.Click(chromedp.CSS("#confirm-action")), chromedp.WaitVisible(chromedp.CSS("[data-op-url]")))
	require.Contains(t, b.location(), "?op=")
	b.waitJS("restart succeeded", `document.querySelector('[data-op-url]').getAttribute('data-op-done') === 'succeeded'`, 60*time.Second)
	require.Equal(t, "running", b.text("[data-engine-state]"))
	b.waitJS("operations list shows it", `document.querySelector('[data-engine-ops] tr td').textContent === 'restart'`, 20*time.Second)
	b.shot("07-engine-restarted")
	require.Equal(t, []string{"provision", "admin_request", "restart"}, f.auditActions(alice.ID))

	// Stop it: the state on the open page turns stopped, without a reload.
	b.do("stop", chromedp.Click(chromedp.CSS(`nav.actions a[href$="action=stop"]`)), chromedp.WaitVisible(chromedp.CSS("#confirm-action")),
		chromedp.Click(chromedp.CSS("#confirm-action")), chromedp.WaitVisible(chromedp.CSS("[data-op-url]")))
	b.do("mark the page", func(ctx context.Context, tg *chromedp.Target) (chromedp.Void, error) {
		_, err := chromedp.Evaluate[any](`window.notReloaded = true`)(ctx, tg)
		return chromedp.Void{}, err
	})
	b.waitJS("engine stopped", `document.querySelector('[data-engine-state]').textContent.trim() === 'stopped' && window.notReloaded === true`, 60*time.Second)
	b.shot("08-engine-stopped")
	r := f.call(http.MethodGet, "/engines/alice", key, nil)
	require.Equal(t, "stopped", r.str("status"))

	// Start it again.
	b.do("start", chromedp.Navigate(f.URL+"/console/engines/"+alice.ID), chromedp.WaitVisible(chromedp.CSS(`nav.actions a[href$="action=start"]`)),
		chromedp.Click(chromedp.CSS(`nav.actions a[href$="action=start"]`)), chromedp.WaitVisible(chromedp.CSS("#confirm-action")),
		chromedp.Click(chromedp.CSS("#confirm-action")), chromedp.WaitVisible(chromedp.CSS("[data-op-url]")))
	b.waitJS("engine running", `document.querySelector('[data-engine-state]').textContent.trim() === 'running'`, 60*time.Second)
	require.Equal(t, "running", f.call(http.MethodGet, "/engines/alice", key, nil).str("status"))

	// Take a backup, then restore it: the long ones show their progress.
	b.do("backup", chromedp.Click(chromedp.CSS(`nav.actions a[href$="action=backup"]`)), chromedp.WaitVisible(chromedp.CSS("#confirm-action")),
		chromedp.Click(chromedp.CSS("#confirm-action")), chromedp.WaitVisible(chromedp.CSS("[data-op-url]")))
	b.waitJS("backup succeeded", `document.querySelector('[data-op-url]').getAttribute('data-op-done') === 'succeeded'`, 60*time.Second)
	b.do("restore", chromedp.Navigate(f.URL+"/console/engines/"+alice.ID), chromedp.WaitVisible(chromedp.CSS(`a[href*="action=restore"]`)),
		chromedp.Click(chromedp.CSS(`a[href*="action=restore"]`)), chromedp.WaitVisible(chromedp.CSS("#confirm-action")))
	b.shot("09-confirm-restore")
	b.do("confirm restore", chromedp.Click(chromedp.CSS("#confirm-action")), chromedp.WaitVisible(chromedp.CSS("[data-op-url]")))
	b.waitJS("restore in progress or done", `document.querySelector('[data-op-progress]').value > 0`, 30*time.Second)
	b.shot("10-restore-progress")
	b.waitJS("restore succeeded", `document.querySelector('[data-op-url]').getAttribute('data-op-done') === 'succeeded'`, 90*time.Second)
	b.waitJS("running after restore", `document.querySelector('[data-engine-state]').textContent.trim() === 'running'`, 30*time.Second)

	// Rotate its key: the engine comes back with a new key the product
	// reads from the API; the console never shows it.
	before := f.call(http.MethodGet, "/engines/alice", key, nil).str("api_key")
	b.do("rotate key", chromedp.Navigate(f.URL+"/console/engines/"+alice.ID), chromedp.WaitVisible(chromedp.CSS(`nav.actions a[href$="action=rotate_key"]`)),
		chromedp.Click(chromedp.CSS(`nav.actions a[href$="action=rotate_key"]`)), chromedp.WaitVisible(chromedp.CSS("#confirm-action")),
		chromedp.Click(chromedp.CSS("#confirm-action")), chromedp.WaitVisible(chromedp.CSS("[data-op-url]")))
	b.waitJS("rotation succeeded", `document.querySelector('[data-op-url]').getAttribute('data-op-done') === 'succeeded'`, 60*time.Second)
	after := f.call(http.MethodGet, "/engines/alice", key, nil).str("api_key")
	require.NotEqual(t, before, after)
	html, err := chromedp.Run(b.ctx, chromedp.OuterHTML(chromedp.CSS("html")))
	require.NoError(t, err)
	require.NotContains(t, html, after, "the console never shows an engine key")

	// Every action is audited with the admin and the operator's name.
	var n int
	require.NoError(t, f.Pool.QueryRow(context.Background(), `SELECT count(*) FROM audit_log WHERE action = 'admin_request'
		AND actor = 'admin' AND engine_id = $1 AND metadata->>'via' = 'console' AND metadata->>'operator' = 'e2e on-call'
		AND metadata->>'outcome' = 'accepted'`, alice.ID).Scan(&n))
	require.Equal(t, 6, n)
	require.Equal(t, []string{"provision", "admin_request", "restart", "admin_request", "stop", "admin_request", "start",
		"admin_request", "backup", "admin_request", "restore", "admin_request", "rotate_key"}, f.auditActions(alice.ID))

	// Destroy bob's engine: the user id must be typed; the page then
	// follows the operation of an engine that is going away.
	bob := f.call(http.MethodGet, "/engines/bob", key, nil).str("engine_id")
	b.do("destroy", chromedp.Navigate(f.URL+"/console/engines/"+bob+"/confirm?action=destroy"), chromedp.WaitVisible(chromedp.CSS("#confirm")))
	disabled, err := chromedp.Run(b.ctx, chromedp.Evaluate[bool](`document.querySelector('#confirm-action').disabled`))
	require.NoError(t, err)
	require.True(t, disabled, "the destroy button waits for the user id")
	b.do("type bob", chromedp.SendKeys(chromedp.CSS("#confirm"), "bob"))
	b.shot("10b-confirm-destroy")
	b.do("confirm destroy", chromedp.Click(chromedp.CSS("#confirm-action")), chromedp.WaitVisible(chromedp.CSS("[data-op-url]")))
	b.waitJS("destroy succeeded", `document.querySelector('[data-op-url]').getAttribute('data-op-done') === 'succeeded'`, 60*time.Second)
	require.Equal(t, "ENGINE_NOT_FOUND", f.call(http.MethodGet, "/engines/bob", key, nil).code())

	// Freeze a product (its only cordon), then unfreeze it.
	b.do("freeze", chromedp.Navigate(f.URL+"/console/products"), chromedp.WaitVisible(chromedp.CSS(`tr#acme a[href$="preset=freeze"]`)),
		chromedp.Click(chromedp.CSS(`tr#acme a[href$="preset=freeze"]`)), chromedp.WaitVisible(chromedp.CSS("#max")))
	b.checkAccessible("policy")
	b.do("apply freeze", chromedp.Click(chromedp.CSS("form.stack button[type=submit]")), chromedp.WaitVisible(chromedp.CSS(`tr#acme`)))
	require.Equal(t, "QUOTA_EXCEEDED", f.call(http.MethodPost, "/engines/provision", key, map[string]any{"user_id": "carol"}).code())
	b.do("unfreeze", chromedp.Click(chromedp.CSS(`tr#acme a[href$="preset=unfreeze"]`)), chromedp.WaitVisible(chromedp.CSS("#max")),
		chromedp.Click(chromedp.CSS("form.stack button[type=submit]")), chromedp.WaitVisible(chromedp.CSS(`tr#acme a[href$="preset=freeze"]`)))
	require.Equal(t, http.StatusOK, f.call(http.MethodPost, "/engines/provision", key, map[string]any{"user_id": "carol"}).Status)

	// The other main pages render, each a screenshot.
	var failedID string
	require.NoError(t, f.Pool.QueryRow(context.Background(), `SELECT id::text FROM engines WHERE user_id = 'g-user-0005'`).Scan(&failedID))
	for _, pg := range []struct{ name, path, wait string }{
		{"11-operations", "/console/operations?view=failed", "nav.tabs"},
		{"12-audit", "/console/audit?user=alice", "table"},
		{"13-backups", "/console/backups", "table"},
		{"14-products", "/console/products", "table"},
		{"15-engines-failed", "/console/engines?state=failed&sort=failures", "table.engines"},
		{"16-engine-failed-health", "/console/engines/" + failedID, ".health svg circle.fail"},
		{"17-engine-after", "/console/engines/" + alice.ID, "[data-engine-state]"},
	} {
		b.do(pg.name, chromedp.Navigate(f.URL+pg.path), chromedp.WaitVisible(chromedp.CSS(pg.wait)))
		b.checkAccessible(pg.path)
		b.shot(pg.name)
	}
	require.Contains(t, b.text(".timeline"), "admin_request")
	_ = prodID

	// Log out: the session ends.
	b.do("log out", chromedp.Click(chromedp.CSS("header.top .who button")), chromedp.WaitVisible(chromedp.CSS("#key")))
	b.do("after logout", chromedp.Navigate(f.URL+"/console/"), chromedp.WaitVisible(chromedp.CSS("#key")))

	require.Empty(t, b.errors(), "the browser's console must stay clean")
	t.Logf("browser steps took %s; screenshots in %s", time.Since(steps).Round(time.Millisecond), b.artifacts)
}
