// Package api is the orchestrator's HTTP API: huma operations, key
// authentication, the contract's error envelope and request logging.
// Handlers are thin: parse, call one thing, convert, return. It never
// touches a backend: lifecycle work is enqueued as River jobs.
package api

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"path"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/danielgtaylor/huma/v2"
	"github.com/danielgtaylor/huma/v2/adapters/humago"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/lifecycle"
	"github.com/enginefleet/orchestrator/metrics"
	"github.com/enginefleet/orchestrator/schema"
	"github.com/enginefleet/orchestrator/webhooks"
)

// Config is what the API needs; cmd/orchestrator fills it from the
// environment. What engines are and how operations run is the lifecycle
// core's (lifecycle.Config).
type Config struct {
	AdminKey string
	Version  string
	// PortMin and PortMax are the engine port range, for GET /status's
	// port usage.
	PortMin, PortMax int

	// ProductTTL is how long a cached platform key is trusted before the
	// database is asked again (0 = DefaultProductTTL).
	ProductTTL time.Duration
	// AuthFailuresPerSecond is how many failed authentications a client
	// may make per second in the long run (burst 4×) before it is answered
	// 429 RATE_LIMITED (0 = DefaultAuthFailuresPerSecond, < 0 = no limit).
	AuthFailuresPerSecond float64
	// TrustedProxies are the proxies whose X-Forwarded-For names the
	// client (ORCH_TRUSTED_PROXIES); none = the peer is the client.
	TrustedProxies []netip.Prefix

	Metrics *metrics.Metrics // admit and request latency (nil = none)

	// Webhooks is the request side of webhooks (nil: the /webhooks routes
	// answer 503).
	Webhooks *webhooks.Endpoints

	// UndocumentedError, when set, is told of every error answer whose
	// status or code openapi.yaml does not list for its operation (it is
	// logged regardless). The tests set it to fail.
	UndocumentedError func(operationID string, status int, code string)
}

// Server is one API replica: HTTP in front of the lifecycle core.
type Server struct {
	cfg          Config
	core         *lifecycle.Core // every request that changes an engine, and the waits
	pool         *pgxpool.Pool   // reads: products, audit, fleet status
	river        *river.Client[pgx.Tx]
	log          *slog.Logger
	api          huma.API
	mux          *http.ServeMux
	products     *productCache
	authFails    *authThrottle // failed authentications per client (throttle.go)
	rates        rateLimiter   // admit rate limits shared with every replica (ratelimit.go)
	migrated     atomic.Bool
	adminUI      *adminUI      // River UI at /admin/jobs (adminui.go)
	writeTimeout time.Duration // WriteTimeout (tests shorten it)
	// documented is each operation's documented error answers (status →
	// codes), as openapi.yaml lists them (codes.go).
	documented map[string]map[int]map[orch.Code]bool
}

// New builds the API on core. rc (for audit exports and the job UI) may be
// an insert-only client; core and rc may be nil to render the OpenAPI
// document only.
func New(cfg Config, core *lifecycle.Core, pool *pgxpool.Pool, rc *river.Client[pgx.Tx], log *slog.Logger) *Server {
	if cfg.Version == "" {
		cfg.Version = "dev"
	}
	s := &Server{cfg: cfg, core: core, pool: pool, river: rc, log: log, mux: http.NewServeMux(), writeTimeout: WriteTimeout}
	s.products = newProductCache(pool, cfg.ProductTTL)
	s.authFails = newAuthThrottle(cfg.AuthFailuresPerSecond)
	if core != nil {
		// Every replica drops a product's cached keys when it changes, and
		// everything when the listener reconnects (NOTIFYs were lost).
		core.Listen(schema.ChannelProducts, s.products.invalidate, s.products.flush)
	}
	s.api = humago.New(s.mux, humaConfig(cfg.Version))
	s.api.UseMiddleware(s.recordOperation, s.authMiddleware, s.validateUserPath) // key first: no key, no hints
	s.register()
	s.mountAdminUI()
	s.mountConsole() // the operator console at /console (console.go)
	s.documented = fixResponses(s.api.OpenAPI())
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
	s.registerWebhooks()
}

// Handler is the root HTTP handler: request ids, recovery, access log.
func (s *Server) Handler() http.Handler {
	return s.withRequestLog(http.HandlerFunc(s.route))
}

// route hands the request to the mux, except a path that is not clean
// ("//x", "/a/../b"): the mux would answer it with a redirect to the clean
// path and an HTML body, which clients would follow with a GET whatever
// the method. It is answered NOT_FOUND in the envelope instead.
func (s *Server) route(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodConnect {
		if clean := cleanPath(r.URL.Path); clean != r.URL.Path {
			writeEnvelope(w, r, http.StatusNotFound, orch.CodeNotFound,
				"no such route: "+r.Method+" "+r.URL.Path+" (a path must be clean: "+clean+")")
			return
		}
	}
	s.mux.ServeHTTP(w, r)
}

// cleanPath is the path ServeMux would redirect to (net/http's cleanPath).
func cleanPath(p string) string {
	if p == "" {
		return "/"
	}
	if p[0] != '/' {
		p = "/" + p
	}
	np := path.Clean(p)
	if p[len(p)-1] == '/' && np != "/" {
		np += "/"
	}
	return np
}

// Run starts the server's background work (the job UI) until ctx ends.
// The lifecycle core runs on its own (lifecycle.Core.Run): it holds the
// NOTIFY listener this server's product cache follows.
func (s *Server) Run(ctx context.Context) {
	s.startAdminUI(ctx)
	<-ctx.Done()
}

var requestIDRE = regexp.MustCompile(`^[A-Za-z0-9._-]{1,64}$`)

// statusRecorder records the status for the access log, and gives the
// response WriteTimeout to be written from the moment it starts: a client
// that does not read it cannot hold the handler forever, and a handler
// that waits long before answering is not cut.
type statusRecorder struct {
	http.ResponseWriter
	status       int
	writeTimeout time.Duration
	errBody      []byte // the start of an error answer, for checkDocumented
}

func (r *statusRecorder) start(code int) {
	if r.status == 0 {
		r.status = code
		http.NewResponseController(r.ResponseWriter).SetWriteDeadline(time.Now().Add(r.writeTimeout)) //nolint:errcheck // unsupported: no deadline
	}
}

func (r *statusRecorder) WriteHeader(code int) {
	r.start(code)
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Write(b []byte) (int, error) {
	r.start(http.StatusOK)
	if r.status >= 400 && len(r.errBody) < maxErrBody {
		r.errBody = append(r.errBody, b[:min(len(b), maxErrBody-len(r.errBody))]...)
	}
	return r.ResponseWriter.Write(b)
}

// maxErrBody bounds what an error answer's check reads (an envelope is a
// few hundred bytes).
const maxErrBody = 4096

func (r *statusRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

func (s *Server) withRequestLog(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		ri := &requestInfo{id: r.Header.Get("X-Request-ID")}
		if ri.id == "" || !requestIDRE.MatchString(ri.id) {
			ri.id = newRequestID()
		}
		w.Header().Set("X-Request-ID", ri.id)
		ri.client = clientAddr(r, s.cfg.TrustedProxies)
		ctx := context.WithValue(r.Context(), ctxRequest, ri)
		// A kept-alive connection may carry the previous response's write
		// deadline: this request's response sets its own when it starts.
		http.NewResponseController(w).SetWriteDeadline(time.Time{}) //nolint:errcheck
		rec := &statusRecorder{ResponseWriter: w, writeTimeout: s.writeTimeout}
		r2 := r.WithContext(ctx) // the mux records the matched pattern on it
		defer func() {
			if p := recover(); p != nil {
				s.log.Error("panic in handler", "request_id", ri.id, "panic", fmt.Sprint(p))
				if rec.status == 0 {
					writeEnvelope(rec, r2, http.StatusInternalServerError, orch.CodeInternal, "internal error")
				}
			}
			status, took, route := rec.status, time.Since(start), routeOf(r2.Pattern)
			if status == 0 {
				status = http.StatusOK // nothing written: net/http sends 200
			}
			s.cfg.Metrics.ObserveRequest(r.Method, route, status, took)
			if status >= 400 && ri.op != nil {
				s.checkDocumented(ri.op, status, rec.errBody)
			}
			level := slog.LevelInfo
			if status >= 500 {
				level = slog.LevelError
			}
			if !s.log.Enabled(ctx, level) {
				return
			}
			attrs := make([]slog.Attr, 0, 10)
			attrs = append(attrs, slog.String("method", r.Method), slog.String("route", route), slog.String("path", r.URL.Path),
				slog.Int("status", status), slog.Float64("duration_ms", float64(took.Microseconds())/1000),
				slog.String("request_id", ri.id), slog.String("client", ri.client.String()))
			if ri.product != "" {
				attrs = append(attrs, slog.String("product", ri.product))
			}
			if ri.err != nil {
				attrs = append(attrs, slog.String("error", ri.err.Error()))
			}
			s.log.LogAttrs(ctx, level, "request", attrs...)
		}()
		if limitBody(rec, r2) {
			next.ServeHTTP(rec, r2)
		}
	})
}

// requestIDs are this process's random prefix and a counter: unique, and
// free of a random read per request.
var (
	requestIDPrefix = func() string {
		b := make([]byte, 4)
		rand.Read(b) //nolint:errcheck
		return hex.EncodeToString(b)
	}()
	requestIDSeq atomic.Uint64
)

func newRequestID() string {
	return requestIDPrefix + strconv.FormatUint(requestIDSeq.Add(1), 16)
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

// writeError writes err as the contract's envelope (status, code and
// headers as toHTTP makes them) from outside huma.
func writeError(w http.ResponseWriter, r *http.Request, err error) {
	ae := toHTTP(r.Context(), err).(*ErrorResponse)
	for k, v := range ae.GetHeaders() {
		w.Header()[k] = v
	}
	writeEnvelope(w, r, ae.status, orch.Code(ae.ErrorBody.Error.Code), ae.ErrorBody.Error.Message)
}

// writeEnvelope writes the contract's error envelope from outside huma
// (unknown routes, the admin UI's guard, panics). It is encoded with
// encoding/json, never by hand: the message may carry a client's path,
// whose control bytes, quotes and invalid UTF-8 must still make valid JSON.
func writeEnvelope(w http.ResponseWriter, r *http.Request, status int, code orch.Code, msg string) {
	b, err := json.Marshal(ErrorBody{Error: ErrorDetail{Code: string(code), Message: msg, RequestID: requestID(r.Context())}})
	if err != nil { // cannot happen: three strings
		b = []byte(`{"error":{"code":"INTERNAL_ERROR","message":"internal error"}}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(b) //nolint:errcheck
}

// OpenAPIYAML renders the OpenAPI document of the API (no database needed).
func OpenAPIYAML(version string) ([]byte, error) { return document(version).YAML() }

// document is the OpenAPI document of an API built without a database.
func document(version string) *huma.OpenAPI {
	return New(Config{Version: version}, nil, nil, nil, slog.New(slog.DiscardHandler)).api.OpenAPI()
}

// fixResponses makes the document say what the server does, where huma's
// generation cannot: each operation's error answers per status with their
// codes (documentErrors); the ErrorCode and AuditAction enums; an operation
// that takes Prefer: respond-async also answers 202 with the same body plus
// operation_id. It returns the documented error answers per operation.
func fixResponses(doc *huma.OpenAPI) map[string]map[int]map[orch.Code]bool {
	documented := map[string]map[int]map[orch.Code]bool{}
	for _, item := range doc.Paths {
		for _, op := range []*huma.Operation{item.Get, item.Post, item.Put, item.Delete, item.Patch} {
			if op == nil || op.Responses == nil {
				continue
			}
			documented[op.OperationID] = documentErrors(op)
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
	enumSchemas(doc)
	return documented
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
