// Package console is the operator console: the fleet at a glance in a
// browser, served by the API role under /console behind the admin key.
//
// It is server-rendered HTML (html/template, embedded in the binary) with
// one small hand-written script (static/console-v1.js) that refreshes the
// headline numbers and the charts by short polling of a JSON endpoint and
// follows operations in flight. Nothing is loaded from elsewhere: no font,
// no CDN, no build step. Pages carry a strict Content-Security-Policy
// (scripts and styles from this origin only, nothing inline).
//
// It reads Postgres through the schema package's console queries and acts
// only through Actions, which enqueues the same operations the HTTP API
// does: the console never touches a backend. Every action also writes an
// admin_request audit row (actor "admin", metadata via: console and the
// operator's name); the operation's own audit row records its outcome.
//
// Sessions: the admin key (or, read-only and scoped to one product, a
// platform key) is posted once to the login form; the answer is an
// HttpOnly, SameSite=Strict cookie (Secure over TLS) signed with a key
// derived from the admin key, holding neither key. Every POST carries a
// CSRF token bound to the session, and cross-origin POSTs are refused.
package console

import (
	"bytes"
	"context"
	"embed"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/schema"
)

// Path is where the console is mounted on the API's mux.
const Path = "/console"

// ScriptVersion names the one script and stylesheet the pages load
// (static/console-v<N>.js, .css). Bump it with any change to either, so a
// browser never runs a page against a cached older script.
const ScriptVersion = "v1"

//go:embed templates/*.html
var templateFS embed.FS

//go:embed static
var staticFS embed.FS

// Actions is what the console may do to the fleet: each call enqueues an
// ordinary operation (as the HTTP API does) and returns its id, or
// refuses with a domain error (ENGINE_NOT_FOUND, ENGINE_NOT_RUNNING,
// ENGINE_ALREADY_RUNNING, OPERATION_IN_PROGRESS, BACKUP_NOT_FOUND,
// PRODUCT_NOT_FOUND, INVALID_REQUEST…). actor is recorded on the operation
// ("admin"). The API package provides the implementation.
type Actions interface {
	// Operate starts start, stop, restart, destroy or rotate_key on a
	// product user's engine (joining the same kind already in flight).
	Operate(ctx context.Context, productID, userID string, kind orch.OpKind, actor string) (operationID string, err error)
	// Backup takes a backup of the user's brain now.
	Backup(ctx context.Context, productID, userID, actor string) (operationID string, err error)
	// Restore puts one of the user's backups back into the user's engine.
	Restore(ctx context.Context, productID, userID, backupID, actor string) (operationID string, err error)
	// SetPolicy replaces a product's policy (max_engines 0 freezes it:
	// no new engines); it writes its own policy_update audit row.
	SetPolicy(ctx context.Context, productID string, p orch.Policy, actor string) error
}

// Config is what the console needs; the API fills it from its own.
type Config struct {
	// AdminKey is what an admin logs in with; the session signing key is
	// derived from it, so changing it ends every session.
	AdminKey string
	// PortMin and PortMax are the engines' port range (ports used per node).
	PortMin, PortMax int
	// OpTimeout is how long an operation of a kind may take (the progress
	// of the long actions): the lifecycle core's wait. Nil: a minute and a
	// half for anything that boots.
	OpTimeout func(orch.OpKind) time.Duration
	// Version is the orchestrator's version, shown in the footer.
	Version string
	// Gatherer is this process's Prometheus registry, read for admit
	// latency; nil leaves it out.
	Gatherer prometheus.Gatherer
	// SessionTTL bounds a session (default 12 h).
	SessionTTL time.Duration
	Log        *slog.Logger
}

// Console is the console's HTTP handler.
type Console struct {
	cfg     Config
	pool    *pgxpool.Pool
	actions Actions
	log     *slog.Logger
	signKey []byte
	pages   map[string]*template.Template
	mux     *http.ServeMux
	csrf    *http.CrossOriginProtection
	live    liveCache
	admit   admitSampler
	metrics *schema.MetricsSource
}

// New builds the console. It fails only when its embedded templates do
// not parse (a build defect) or the admin key is empty.
func New(cfg Config, pool *pgxpool.Pool, actions Actions) (*Console, error) {
	if cfg.AdminKey == "" {
		return nil, errors.New("console: no admin key")
	}
	if cfg.SessionTTL <= 0 {
		cfg.SessionTTL = 12 * time.Hour
	}
	if cfg.Version == "" {
		cfg.Version = "dev"
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Console{cfg: cfg, pool: pool, actions: actions, log: log, signKey: deriveKey(cfg.AdminKey),
		mux: http.NewServeMux(), csrf: http.NewCrossOriginProtection(), metrics: schema.NewMetricsSource(pool)}
	c.admit.gatherer = cfg.Gatherer
	c.csrf.SetDenyHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.fail(w, r, http.StatusForbidden, "This request came from another site and was refused.")
	}))
	var err error
	if c.pages, err = parsePages(); err != nil {
		return nil, err
	}
	c.routes()
	return c, nil
}

func (c *Console) routes() {
	static, _ := fs.Sub(staticFS, "static")
	fileServer := http.StripPrefix(Path+"/static/", http.FileServerFS(static))
	c.mux.Handle("GET "+Path+"/static/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Versioned names: a changed file gets a new name, so cache long.
		w.Header().Set("Cache-Control", "public, max-age=86400")
		fileServer.ServeHTTP(w, r)
	}))
	c.mux.HandleFunc("GET "+Path+"/login", c.loginPage)
	c.mux.HandleFunc("POST "+Path+"/login", c.login)
	c.mux.Handle("POST "+Path+"/logout", c.authed(c.logout))

	c.mux.Handle("GET "+Path+"/{$}", c.authed(c.overview))
	c.mux.Handle("GET "+Path+"/products", c.authed(c.products))
	c.mux.Handle("GET "+Path+"/products/{id}/policy", c.admin(c.policyPage))
	c.mux.Handle("POST "+Path+"/products/{id}/policy", c.admin(c.setPolicy))
	c.mux.Handle("GET "+Path+"/engines", c.authed(c.engines))
	c.mux.Handle("GET "+Path+"/engines/{id}", c.authed(c.engine))
	c.mux.Handle("GET "+Path+"/engines/{id}/confirm", c.admin(c.confirm))
	c.mux.Handle("POST "+Path+"/engines/{id}/actions", c.admin(c.act))
	c.mux.Handle("GET "+Path+"/operations", c.authed(c.operations))
	c.mux.Handle("GET "+Path+"/operations/{id}", c.authed(c.operation))
	c.mux.Handle("GET "+Path+"/backups", c.authed(c.backups))
	c.mux.Handle("GET "+Path+"/audit", c.authed(c.audit))

	c.mux.Handle("GET "+Path+"/api/live", c.authed(c.liveJSON))
	c.mux.Handle("GET "+Path+"/api/engines/{id}", c.authed(c.engineJSON))
	c.mux.Handle("GET "+Path+"/api/operations/{id}", c.authed(c.operationJSON))

	c.mux.HandleFunc(Path+"/", func(w http.ResponseWriter, r *http.Request) {
		c.fail(w, r, http.StatusNotFound, "There is no such page.")
	})
}

// ServeHTTP serves every console path, with the console's security headers.
func (c *Console) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "+
		"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Referrer-Policy", "same-origin")
	h.Set("Cross-Origin-Opener-Policy", "same-origin")
	h.Set("Cross-Origin-Resource-Policy", "same-origin")
	if !strings.HasPrefix(r.URL.Path, Path+"/static/") {
		h.Set("Cache-Control", "no-store")
	}
	if r.URL.Path == Path {
		http.Redirect(w, r, Path+"/", http.StatusSeeOther)
		return
	}
	c.mux.ServeHTTP(w, r)
}

// page is what every template gets.
type page struct {
	Title   string
	Nav     string // the current section
	S       *session
	CSRF    string
	Version string
	Script  string
	Style   string
	Data    any
	// ScriptVersion is the console's script and stylesheet version (footer).
	ScriptVersion string
}

func (c *Console) render(w http.ResponseWriter, r *http.Request, status int, name, title, nav string, data any) {
	t, ok := c.pages[name]
	if !ok {
		panic("console: no template " + name)
	}
	s := sessionFrom(r.Context())
	p := page{Title: title, Nav: nav, S: s, Version: c.cfg.Version, Data: data, ScriptVersion: ScriptVersion,
		Script: Path + "/static/console-" + ScriptVersion + ".js", Style: Path + "/static/console-" + ScriptVersion + ".css"}
	if s != nil {
		p.CSRF = c.csrfToken(s)
	}
	var buf bytes.Buffer
	if err := t.ExecuteTemplate(&buf, "layout", p); err != nil {
		c.log.Error("console render", "template", name, "error", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	w.Write(buf.Bytes()) //nolint:errcheck
}

// fail renders an error page (or a JSON error under /console/api/).
func (c *Console) fail(w http.ResponseWriter, r *http.Request, status int, msg string) {
	if strings.HasPrefix(r.URL.Path, Path+"/api/") {
		writeJSON(w, status, map[string]any{"error": msg})
		return
	}
	c.render(w, r, status, "error", http.StatusText(status), "", msg)
}

// failErr renders a domain error with the status the API would use, and
// logs anything that is not a domain error (never shown).
func (c *Console) failErr(w http.ResponseWriter, r *http.Request, err error) {
	var de *orch.Error
	if errors.As(err, &de) && de.Code != orch.CodeInternal {
		c.fail(w, r, statusOf(de.Code), fmt.Sprintf("%s: %s", de.Code, de.Message))
		return
	}
	if errors.Is(err, context.Canceled) {
		return
	}
	c.log.Error("console", "path", r.URL.Path, "error", err)
	c.fail(w, r, http.StatusInternalServerError, "Something went wrong reading the fleet; the error is in the API's log.")
}

// statusOf maps a domain code to an HTTP status, as the API does.
func statusOf(code orch.Code) int {
	switch code {
	case orch.CodeInvalidRequest:
		return http.StatusBadRequest
	case orch.CodeEngineNotFound, orch.CodeProductNotFound, orch.CodeOperationNotFound, orch.CodeBackupNotFound, orch.CodeNotFound:
		return http.StatusNotFound
	case orch.CodeEngineAlreadyRunning, orch.CodeEngineNotRunning, orch.CodeOperationInProgress, orch.CodeInvalidState,
		orch.CodeEngineAlreadyExists:
		return http.StatusConflict
	case orch.CodeQuotaExceeded, orch.CodeRateLimited:
		return http.StatusTooManyRequests
	case orch.CodePolicyDenied:
		return http.StatusForbidden
	case orch.CodeUnavailable, orch.CodePortExhaustion:
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

// queryCtx bounds one page's reads: a console page must never hold a
// connection for long, whatever the filters.
func queryCtx(r *http.Request) (context.Context, context.CancelFunc) {
	return context.WithTimeout(r.Context(), 10*time.Second)
}
