// Package api is the orchestrator's HTTP API: huma operations, key
// authentication, the contract's error envelope and request logging.
// Handlers are thin: parse, call one thing, convert, return. It never
// touches a backend: lifecycle work is enqueued as River jobs.
package api

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/danielgtaylor/huma/v2"
	"github.com/danielgtaylor/huma/v2/adapters/humago"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/metrics"
	"github.com/enginefleet/orchestrator/schema"
)

// Config is what the API needs; cmd/orchestrator fills it from the environment.
type Config struct {
	AdminKey      string
	DefaultImage  string        // ORCH_ENGINE_IMAGE
	Images        *orch.Images  // ORCH_ENGINE_IMAGE_ALLOWLIST (nil = DefaultImage's repository)
	PortMin       int           // ORCH_PORT_MIN
	PortMax       int           // ORCH_PORT_MAX
	Node          string        // engine host this replica provisions on ("local")
	BootTimeout   time.Duration // ORCH_BOOT_TIMEOUT_S: how long a synchronous call waits
	URLTemplate   string        // ORCH_ENGINE_URL_TEMPLATE, e.g. http://127.0.0.1:{port}
	KeyOverlap    time.Duration // engine key rotation overlap
	Version       string
	ProductsCache time.Duration // negative-cache lifetime for unknown platform keys

	Metrics *metrics.Metrics // admit and request latency (nil = none)
}

// Server is one API replica.
type Server struct {
	cfg      Config
	pool     *pgxpool.Pool
	river    *river.Client[pgx.Tx]
	keyring  *keys.Keyring
	log      *slog.Logger
	api      huma.API
	mux      *http.ServeMux
	products *productCache
	waiters  *waiters
	// stopWaits is closed when a draining process can wait no longer
	// (StopWaiting): requests waiting for an operation answer at once.
	stopWaits    chan struct{}
	stopWaitsOne sync.Once
	activity     activity
	rates        rateLimiter // admit rate limits shared with every replica (ratelimit.go)
	migrated     atomic.Bool
	adminUI      *adminUI // River UI at /admin/jobs (adminui.go)
}

// New builds the API. river may be an insert-only client (no workers).
func New(cfg Config, pool *pgxpool.Pool, rc *river.Client[pgx.Tx], kr *keys.Keyring, log *slog.Logger) *Server {
	if cfg.Node == "" {
		cfg.Node = "local"
	}
	if cfg.Version == "" {
		cfg.Version = "dev"
	}
	if cfg.Images == nil {
		im, _ := orch.ParseImages(cfg.DefaultImage, "") // cannot fail without a list
		cfg.Images = &im
	}
	s := &Server{cfg: cfg, pool: pool, river: rc, keyring: kr, log: log, mux: http.NewServeMux()}
	s.products = newProductCache(pool)
	s.waiters = newWaiters()
	s.stopWaits = make(chan struct{})
	s.api = humago.New(s.mux, humaConfig(cfg.Version))
	s.api.UseMiddleware(s.authMiddleware, s.validateUserPath) // key first: no key, no hints
	s.register()
	s.mountAdminUI()
	s.mountConsole() // the operator console at /console (console.go)
	fixResponses(s.api.OpenAPI())
	// Anything huma does not route gets the envelope too: 405 when the
	// path exists under other methods, else 404.
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if allow := s.allowedMethods(r); len(allow) > 0 {
			w.Header().Set("Allow", strings.Join(allow, ", "))
			writeEnvelope(w, r, http.StatusMethodNotAllowed, orch.CodeMethodNotAllowed, r.Method+" is not allowed on "+r.URL.Path)
			return
		}
		writeEnvelope(w, r, http.StatusNotFound, orch.CodeNotFound, "no such route: "+r.Method+" "+r.URL.Path)
	})
	return s
}

// humaConfig is the huma configuration shared by the server and `orchestrator openapi`.
func humaConfig(version string) huma.Config {
	c := huma.DefaultConfig("Engine fleet orchestrator", version)
	c.CreateHooks = nil // no $schema links in bodies or the spec
	c.DocsPath = ""
	c.SchemasPath = ""
	c.OpenAPIPath = "/openapi"
	c.Info.Description = "Gives every end user of a product their own long-lived engine, keeps the fleet healthy, and tells products where each engine is and which key opens it."
	c.Components.SecuritySchemes = map[string]*huma.SecurityScheme{
		securityAdmin:    {Type: "apiKey", In: "header", Name: "X-Admin-Key", Description: "The orchestrator's admin key (ORCH_ADMIN_KEY)."},
		securityPlatform: {Type: "apiKey", In: "header", Name: "X-Platform-Key", Description: "A product's platform key, returned once at registration."},
	}
	return c
}

// StopWaiting answers every request still waiting for an operation with
// 503 SERVICE_UNAVAILABLE naming the operation to follow, instead of
// letting the end of a drain cut it off. The operations go on.
func (s *Server) StopWaiting() { s.stopWaitsOne.Do(func() { close(s.stopWaits) }) }

// API exposes the huma API (for the OpenAPI document).
func (s *Server) API() huma.API { return s.api }

// register adds every operation. Each group lives in its own file.
func (s *Server) register() {
	s.registerHealth()
	s.registerProducts()
	s.registerEngines()
	s.registerBackups()
	s.registerAudit()
	s.registerFleet()
}

// Handler is the root HTTP handler: request ids, recovery, access log.
func (s *Server) Handler() http.Handler {
	return s.withRequestLog(s.mux)
}

// Run starts the server's background work (the NOTIFY listener) until ctx ends.
func (s *Server) Run(ctx context.Context) {
	s.startAdminUI(ctx)
	l := &listener{pool: s.pool, log: s.log, handlers: map[string]func(string){
		schema.ChannelProducts: s.products.invalidate,
		schema.ChannelOps:      s.waiters.wake,
	}, onReconnect: func() {
		s.products.flush()
		s.waiters.wakeAll()
	}}
	l.run(ctx)
}

var requestIDRE = regexp.MustCompile(`^[A-Za-z0-9._-]{1,64}$`)

type logAttrs struct {
	product string
	err     error
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (r *statusRecorder) WriteHeader(code int) {
	if r.status == 0 {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	return r.ResponseWriter.Write(b)
}

func (r *statusRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

func (s *Server) withRequestLog(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rid := r.Header.Get("X-Request-ID")
		if !requestIDRE.MatchString(rid) {
			b := make([]byte, 8)
			rand.Read(b) //nolint:errcheck
			rid = hex.EncodeToString(b)
		}
		w.Header().Set("X-Request-ID", rid)
		la := &logAttrs{}
		ctx := context.WithValue(r.Context(), ctxRequestID, rid)
		ctx = context.WithValue(ctx, ctxLogAttrs, la)
		rec := &statusRecorder{ResponseWriter: w}
		r2 := r.WithContext(ctx) // the mux records the matched pattern on it
		defer func() {
			if p := recover(); p != nil {
				s.log.Error("panic in handler", "request_id", rid, "panic", fmt.Sprint(p))
				if rec.status == 0 {
					writeEnvelope(rec, r.WithContext(ctx), http.StatusInternalServerError, orch.CodeInternal, "internal error")
				}
			}
			status, took, route := rec.status, time.Since(start), routeOf(r2.Pattern)
			if status == 0 {
				status = http.StatusOK // nothing written: net/http sends 200
			}
			s.cfg.Metrics.ObserveRequest(r.Method, route, status, took)
			attrs := []any{"method", r.Method, "route", route, "path", r.URL.Path, "status", status,
				"duration_ms", float64(took.Microseconds()) / 1000, "request_id", rid}
			if la.product != "" {
				attrs = append(attrs, "product", la.product)
			}
			if la.err != nil {
				attrs = append(attrs, "error", la.err.Error())
			}
			level := slog.LevelInfo
			if status >= 500 {
				level = slog.LevelError
			}
			s.log.Log(ctx, level, "request", attrs...)
		}()
		next.ServeHTTP(rec, r2)
	})
}

// allowedMethods lists the methods some route serves at r's path.
func (s *Server) allowedMethods(r *http.Request) []string {
	var allow []string
	for _, m := range []string{http.MethodGet, http.MethodPost, http.MethodPut, http.MethodDelete, http.MethodPatch} {
		probe := &http.Request{Method: m, URL: r.URL, Host: r.Host, Header: http.Header{}}
		if _, pattern := s.mux.Handler(probe); pattern != "" && pattern != "/" {
			allow = append(allow, m)
		}
	}
	return allow
}

// routeOf is a mux pattern without its method ("POST /engines/{user_id}/admit"
// → "/engines/{user_id}/admit"); "" for the catch-all (no route matched).
func routeOf(pattern string) string {
	if i := strings.IndexByte(pattern, ' '); i >= 0 {
		pattern = pattern[i+1:]
	}
	if pattern == "/" {
		return ""
	}
	return pattern
}

func writeEnvelope(w http.ResponseWriter, r *http.Request, status int, code orch.Code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"error":{"code":%q,"message":%q,"request_id":%q}}`, code, msg, requestID(r.Context()))
}

// OpenAPIYAML renders the OpenAPI document of the API (no database needed).
func OpenAPIYAML(version string) ([]byte, error) { return document(version).YAML() }

// document is the OpenAPI document of an API built without a database.
func document(version string) *huma.OpenAPI {
	return New(Config{Version: version}, nil, nil, nil, slog.New(slog.DiscardHandler)).api.OpenAPI()
}

// fixResponses makes the document say what the server does, where huma's
// generation cannot: validation failures are 400 (huma says 422); an
// operation that takes Prefer: respond-async also answers 202 with the same
// body plus operation_id; 429 and 503 carry Retry-After.
func fixResponses(doc *huma.OpenAPI) {
	retryAfter := &huma.Param{Description: "Seconds to wait before retrying", Schema: &huma.Schema{Type: "integer"}}
	for _, item := range doc.Paths {
		for _, op := range []*huma.Operation{item.Get, item.Post, item.Put, item.Delete, item.Patch} {
			if op == nil || op.Responses == nil {
				continue
			}
			if r, ok := op.Responses["422"]; ok {
				delete(op.Responses, "422")
				if _, has := op.Responses["400"]; !has {
					r.Description = "Bad Request"
					op.Responses["400"] = r
				}
			}
			for _, code := range []string{"429", "503"} {
				if r, ok := op.Responses[code]; ok {
					if r.Headers == nil {
						r.Headers = map[string]*huma.Param{}
					}
					r.Headers["Retry-After"] = retryAfter
				}
			}
			ok := op.Responses["200"]
			if _, has := op.Responses["202"]; has || ok == nil || !takesPrefer(op) {
				continue
			}
			op.Responses["202"] = &huma.Response{
				Description: "Accepted (Prefer: respond-async): the work goes on; follow operation_id at GET /operations/{operation_id}",
				Content:     ok.Content,
			}
		}
	}
}

func takesPrefer(op *huma.Operation) bool {
	for _, p := range op.Parameters {
		if p.In == "header" && p.Name == "Prefer" {
			return true
		}
	}
	return false
}

// OpenAPI30YAML renders the document downgraded to OpenAPI 3.0.3, for code
// generators that do not read 3.1 yet (the Go SDK's oapi-codegen).
func OpenAPI30YAML(version string) ([]byte, error) { return document(version).DowngradeYAML() }
