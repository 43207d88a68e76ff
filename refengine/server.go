// Package refengine is the reference engine: a single-tenant HTTP server that
// implements the engine contract so the orchestrator can be run
// and tested end to end without a private engine image.
//
// Routes (JSON unless noted; every route but /health needs X-Engine-Key,
// whose SHA-256 must match Config.KeyHash, or Config.PrevKeyHash before
// Config.PrevKeyExpiresAt; otherwise 401 INVALID_ENGINE_KEY):
//
//	GET  /health          200 {"status":"ok",...} or 503 "starting"/"unhealthy"
//	GET  /debug/health    {"healthy":bool}
//	PUT  /debug/health    {"healthy":bool}: the on-demand unhealthy switch
//	POST /memories        {content, tags?} → 201 memory
//	GET  /memories        ?q=&limit=&match=all|any|fts5 → {"memories":[...]}
//	GET  /memory/export   the whole brain as a Bundle
//	POST /memory/import   a Bundle replaces the brain → {"imported":n}
//	POST /execute         {"input"} → text/event-stream: memory*, token*, done
//
// Errors are {"error":{"code":"...","message":"..."}} with the codes
// INVALID_ENGINE_KEY (401), INVALID_REQUEST (400), INVALID_QUERY (400),
// PAYLOAD_TOO_LARGE (413), NOT_FOUND (404), METHOD_NOT_ALLOWED (405) and
// INTERNAL_ERROR (500).
package refengine

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Error codes the engine returns.
const (
	CodeInvalidEngineKey = "INVALID_ENGINE_KEY"
	CodeInvalidRequest   = "INVALID_REQUEST"
	CodeInvalidQuery     = "INVALID_QUERY"
	CodePayloadTooLarge  = "PAYLOAD_TOO_LARGE"
	CodeNotFound         = "NOT_FOUND"
	CodeMethodNotAllowed = "METHOD_NOT_ALLOWED"
	CodeInternal         = "INTERNAL_ERROR"
)

// Request body limits.
const (
	MaxBodyBytes   = 1 << 20   // every JSON body but an import
	MaxImportBytes = 256 << 20 // POST /memory/import
)

// Search limits of GET /memories.
const (
	DefaultSearchLimit = 20
	MaxSearchLimit     = 1000
)

// HeaderEngineKey carries the engine key.
const HeaderEngineKey = "X-Engine-Key"

// Server is the engine's HTTP handler and the state behind it.
type Server struct {
	cfg     Config
	log     *slog.Logger
	brain   *Brain
	key     [32]byte
	prevKey [32]byte
	hasPrev bool
	marker  string
	started time.Time
	now     func() time.Time

	unhealthy atomic.Bool
	switchMu  sync.Mutex // serialises the unhealthy switch and its marker file

	routes map[string]map[string]http.HandlerFunc
}

// New validates cfg, opens the brain and returns a ready Server. The caller
// must Close it.
func New(ctx context.Context, cfg Config, log *slog.Logger) (*Server, error) {
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("invalid configuration: %w", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		cfg:     cfg,
		log:     log,
		marker:  filepath.Join(filepath.Dir(cfg.DBPath), UnhealthyMarker),
		started: time.Now(),
		now:     time.Now,
	}
	s.key, _ = parseKeyHash(cfg.KeyHash)
	if cfg.PrevKeyHash != "" {
		s.prevKey, _ = parseKeyHash(cfg.PrevKeyHash)
		s.hasPrev = true
	}
	brain, err := OpenBrain(ctx, cfg.DBPath)
	if err != nil {
		return nil, err
	}
	s.brain = brain
	if _, err := os.Stat(s.marker); err == nil {
		s.unhealthy.Store(true)
		log.Warn("starting unhealthy: marker file present", "marker", s.marker)
	}
	if cfg.ForceUnhealthy {
		s.unhealthy.Store(true)
		log.Warn("starting unhealthy: ENGINE_UNHEALTHY is set")
	}
	s.routes = map[string]map[string]http.HandlerFunc{
		"/debug/health":  {http.MethodGet: s.getSwitch, http.MethodPut: s.putSwitch},
		"/memories":      {http.MethodGet: s.listMemories, http.MethodPost: s.addMemory},
		"/memory/export": {http.MethodGet: s.exportBrain},
		"/memory/import": {http.MethodPost: s.importBrain},
		"/execute":       {http.MethodPost: s.execute},
	}
	return s, nil
}

// Brain is the server's brain.
func (s *Server) Brain() *Brain { return s.brain }

// Close closes the brain (checkpointing its WAL).
func (s *Server) Close() error { return s.brain.Close() }

// Run serves cfg on cfg.ListenAddr until ctx ends, then drains in-flight
// requests (up to cfg.ShutdownTimeout) and closes the brain.
func Run(ctx context.Context, cfg Config, log *slog.Logger) error {
	s, err := New(ctx, cfg, log)
	if err != nil {
		if ctx.Err() != nil {
			// SIGTERM while opening the brain: a clean exit, not a crash.
			log.Info("stopped while starting")
			return nil
		}
		return err
	}
	ln, err := net.Listen("tcp", s.cfg.ListenAddr)
	if err != nil {
		s.Close()
		return fmt.Errorf("listen: %w", err)
	}
	serr := s.Serve(ctx, ln)
	if err := s.Close(); err != nil {
		return errors.Join(serr, err)
	}
	s.log.Info("brain closed")
	return serr
}

// Serve answers on ln until ctx ends, then stops accepting and waits up to
// the shutdown timeout for in-flight requests to finish. It does not close
// the brain.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	s.log.Info("engine listening", "addr", ln.Addr().String(), "version", s.cfg.Version)
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	s.log.Info("shutting down", "timeout_s", s.cfg.ShutdownTimeout.Seconds())
	sctx, cancel := context.WithTimeout(context.Background(), s.cfg.ShutdownTimeout)
	defer cancel()
	var err error
	if serr := srv.Shutdown(sctx); serr != nil {
		s.log.Warn("shutdown timed out, closing connections", "err", serr)
		srv.Close()
		err = fmt.Errorf("shutdown: %w", serr)
	}
	<-errc
	return err
}

// ServeHTTP routes a request: /health is open, everything else needs the key.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	rec := &recorder{ResponseWriter: w, status: http.StatusOK}
	defer func() {
		if p := recover(); p != nil {
			if p == http.ErrAbortHandler {
				s.log.Warn("request aborted", "method", r.Method, "path", r.URL.Path,
					"duration_ms", time.Since(start).Milliseconds())
				panic(p)
			}
			s.log.Error("panic in handler", "path", r.URL.Path, "panic", fmt.Sprint(p))
			if !rec.wrote {
				writeError(rec, http.StatusInternalServerError, CodeInternal, "internal error")
			}
		}
		level := slog.LevelInfo
		if r.URL.Path == "/health" {
			level = slog.LevelDebug
		}
		s.log.Log(r.Context(), level, "request", "method", r.Method, "path", r.URL.Path,
			"status", rec.status, "duration_ms", time.Since(start).Milliseconds())
	}()
	rec.Header().Set("Cache-Control", "no-store")

	if r.URL.Path == "/health" {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			rec.Header().Set("Allow", "GET, HEAD")
			writeError(rec, http.StatusMethodNotAllowed, CodeMethodNotAllowed, "method not allowed")
			return
		}
		s.health(rec, r)
		return
	}
	if !s.authorized(r.Header.Get(HeaderEngineKey)) {
		writeError(rec, http.StatusUnauthorized, CodeInvalidEngineKey, "missing or invalid X-Engine-Key")
		return
	}
	methods, ok := s.routes[r.URL.Path]
	if !ok {
		writeError(rec, http.StatusNotFound, CodeNotFound, "no such route")
		return
	}
	h, ok := methods[r.Method]
	if !ok {
		allow := make([]string, 0, len(methods))
		for m := range methods {
			allow = append(allow, m)
		}
		rec.Header().Set("Allow", strings.Join(slices.Sorted(slices.Values(allow)), ", "))
		writeError(rec, http.StatusMethodNotAllowed, CodeMethodNotAllowed, "method not allowed")
		return
	}
	h(rec, r)
}

// authorized reports whether key opens this engine: its SHA-256 equals the
// current hash, or the previous one before it expires. Constant time.
func (s *Server) authorized(key string) bool {
	if key == "" {
		return false
	}
	sum := sha256.Sum256([]byte(key))
	ok := subtle.ConstantTimeCompare(sum[:], s.key[:]) == 1
	if s.hasPrev {
		prevOK := subtle.ConstantTimeCompare(sum[:], s.prevKey[:]) == 1
		if prevOK && s.now().Before(s.cfg.PrevKeyExpiresAt) {
			ok = true
		}
	}
	return ok
}

// Health statuses reported by /health.
const (
	StatusOK        = "ok"
	StatusStarting  = "starting"
	StatusUnhealthy = "unhealthy"
)

// HealthResponse is the body of GET /health.
type HealthResponse struct {
	Status        string            `json:"status"`
	UptimeSeconds float64           `json:"uptime_seconds"`
	Version       string            `json:"version"`
	Subsystems    map[string]string `json:"subsystems"`
}

func (s *Server) health(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
	defer cancel()
	uptime := s.now().Sub(s.started)
	resp := HealthResponse{
		Status:        StatusOK,
		UptimeSeconds: uptime.Seconds(),
		Version:       s.cfg.Version,
		Subsystems:    map[string]string{"database": "ok", "catalog": "ok"},
	}
	failed := false
	if err := s.brain.Ping(ctx); err != nil {
		resp.Subsystems["database"] = "error: " + err.Error()
		failed = true
	}
	if st := catalogState(s.cfg.CatalogDir); st != "ok" && st != "absent" {
		resp.Subsystems["catalog"] = st
		failed = true
	} else {
		resp.Subsystems["catalog"] = st
	}
	if s.unhealthy.Load() {
		resp.Subsystems["debug"] = "error: forced unhealthy (PUT /debug/health, marker file or ENGINE_UNHEALTHY)"
		failed = true
	}
	if s.cfg.UnhealthyAfter > 0 && uptime >= s.cfg.UnhealthyAfter {
		resp.Subsystems["debug"] = "error: unhealthy since ENGINE_UNHEALTHY_AFTER_S after start"
		failed = true
	}
	code := http.StatusOK
	switch {
	case uptime < s.cfg.BootDelay:
		resp.Status, code = StatusStarting, http.StatusServiceUnavailable
	case failed:
		resp.Status, code = StatusUnhealthy, http.StatusServiceUnavailable
	}
	writeJSON(w, code, resp)
}

// catalogState is "ok", "absent" (no catalog: fine) or "error: ...".
func catalogState(dir string) string {
	fi, err := os.Stat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return "absent"
	}
	if err != nil {
		return "error: " + err.Error()
	}
	if !fi.IsDir() {
		return "error: " + dir + " is not a directory"
	}
	f, err := os.Open(dir)
	if err != nil {
		return "error: " + err.Error()
	}
	defer f.Close()
	if _, err := f.ReadDir(1); err != nil && err != io.EOF {
		return "error: " + err.Error()
	}
	return "ok"
}

// SwitchBody is the body of GET and PUT /debug/health.
type SwitchBody struct {
	Healthy *bool `json:"healthy"`
}

func (s *Server) getSwitch(w http.ResponseWriter, r *http.Request) {
	healthy := !s.unhealthy.Load()
	writeJSON(w, http.StatusOK, SwitchBody{Healthy: &healthy})
}

// putSwitch sets the unhealthy switch and writes or removes the marker
// file so the state survives a restart.
func (s *Server) putSwitch(w http.ResponseWriter, r *http.Request) {
	var body SwitchBody
	if !decodeBody(w, r, MaxBodyBytes, &body) {
		return
	}
	if body.Healthy == nil {
		writeError(w, http.StatusBadRequest, CodeInvalidRequest, `"healthy" (boolean) is required`)
		return
	}
	s.switchMu.Lock()
	defer s.switchMu.Unlock()
	if *body.Healthy {
		if err := os.Remove(s.marker); err != nil && !errors.Is(err, fs.ErrNotExist) {
			s.internalError(w, "remove unhealthy marker", err)
			return
		}
	} else {
		msg := "set by PUT /debug/health at " + s.now().UTC().Format(time.RFC3339) + "\n"
		if err := os.WriteFile(s.marker, []byte(msg), 0o600); err != nil {
			s.internalError(w, "write unhealthy marker", err)
			return
		}
	}
	s.unhealthy.Store(!*body.Healthy)
	s.log.Info("health switch set", "healthy", *body.Healthy)
	writeJSON(w, http.StatusOK, body)
}

// AddMemoryRequest is the body of POST /memories.
type AddMemoryRequest struct {
	Content string   `json:"content"`
	Tags    []string `json:"tags,omitempty"`
}

func (s *Server) addMemory(w http.ResponseWriter, r *http.Request) {
	var req AddMemoryRequest
	if !decodeBody(w, r, MaxBodyBytes, &req) {
		return
	}
	m, err := s.brain.Add(r.Context(), req.Content, req.Tags)
	if errors.Is(err, ErrInvalid) {
		writeError(w, http.StatusBadRequest, CodeInvalidRequest, err.Error())
		return
	}
	if err != nil {
		s.internalError(w, "add memory", err)
		return
	}
	writeJSON(w, http.StatusCreated, m)
}

// MemoriesResponse is the body of GET /memories.
type MemoriesResponse struct {
	Memories []Memory `json:"memories"`
}

func (s *Server) listMemories(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	limit := DefaultSearchLimit
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > MaxSearchLimit {
			writeError(w, http.StatusBadRequest, CodeInvalidRequest, fmt.Sprintf("limit must be an integer from 1 to %d", MaxSearchLimit))
			return
		}
		limit = n
	}
	var mode SearchMode
	switch q.Get("match") {
	case "", "all":
		mode = AllWords
	case "any":
		mode = AnyWord
	case "fts5":
		mode = RawFTS5
	default:
		writeError(w, http.StatusBadRequest, CodeInvalidRequest, `match must be "all", "any" or "fts5"`)
		return
	}
	ms, err := s.brain.Search(r.Context(), q.Get("q"), mode, limit)
	if errors.Is(err, ErrInvalidQuery) {
		writeError(w, http.StatusBadRequest, CodeInvalidQuery, err.Error())
		return
	}
	if err != nil {
		s.internalError(w, "search memories", err)
		return
	}
	writeJSON(w, http.StatusOK, MemoriesResponse{Memories: ms})
}

// exportBrain streams the whole brain as a Bundle. The bytes depend only
// on the brain's contents, so two brains with the same memories export
// identically.
func (s *Server) exportBrain(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	cw := &countWriter{w: w}
	bw := bufio.NewWriterSize(cw, 64<<10)
	fmt.Fprintf(bw, `{"format":%q,"version":%d,"memories":[`, BundleFormat, BundleVersion)
	first := true
	err := s.brain.Export(r.Context(), func(m Memory) error {
		if !first {
			bw.WriteByte(',')
		}
		first = false
		b, err := json.Marshal(m)
		if err != nil {
			return err
		}
		_, err = bw.Write(b)
		return err
	})
	if err == nil {
		bw.WriteString("]}\n")
		err = bw.Flush()
	}
	if err != nil {
		if cw.n == 0 && r.Context().Err() == nil {
			s.internalError(w, "export brain", err)
			return
		}
		// Part of the bundle is out: cut the response so the client never
		// takes a truncated bundle for a whole one.
		s.log.Error("export brain", "err", err)
		panic(http.ErrAbortHandler)
	}
}

// ImportResponse is the body of a successful POST /memory/import.
type ImportResponse struct {
	Imported int `json:"imported"`
}

func (s *Server) importBrain(w http.ResponseWriter, r *http.Request) {
	var bn Bundle
	if !decodeBody(w, r, MaxImportBytes, &bn) {
		return
	}
	n, err := s.brain.Import(r.Context(), bn)
	if errors.Is(err, ErrInvalid) {
		writeError(w, http.StatusBadRequest, CodeInvalidRequest, err.Error())
		return
	}
	if err != nil {
		s.internalError(w, "import brain", err)
		return
	}
	s.log.Info("brain imported", "memories", n)
	writeJSON(w, http.StatusOK, ImportResponse{Imported: n})
}

func (s *Server) internalError(w http.ResponseWriter, what string, err error) {
	s.log.Error(what, "err", err)
	writeError(w, http.StatusInternalServerError, CodeInternal, "internal error")
}

// ErrorBody is the error envelope of every non-2xx response.
type ErrorBody struct {
	Error ErrorDetail `json:"error"`
}

// ErrorDetail is the inside of ErrorBody.
type ErrorDetail struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, ErrorBody{Error: ErrorDetail{Code: code, Message: msg}})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		b = []byte(`{"error":{"code":"INTERNAL_ERROR","message":"internal error"}}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(append(b, '\n'))
}

// decodeBody reads one JSON value of at most limit bytes into v, rejecting
// unknown fields and trailing data. On failure it writes a 400 or 413 and
// returns false.
func decodeBody(w http.ResponseWriter, r *http.Request, limit int64, v any) bool {
	r.Body = http.MaxBytesReader(w, r.Body, limit)
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil {
		if _, terr := dec.Token(); terr != io.EOF {
			err = errors.New("unexpected data after the JSON value")
			if mbe := (*http.MaxBytesError)(nil); errors.As(terr, &mbe) {
				err = terr
			}
		}
	}
	if err == nil {
		return true
	}
	if mbe := (*http.MaxBytesError)(nil); errors.As(err, &mbe) {
		writeError(w, http.StatusRequestEntityTooLarge, CodePayloadTooLarge, fmt.Sprintf("body is larger than %d bytes", limit))
		return false
	}
	if errors.Is(err, io.EOF) {
		err = errors.New("empty body")
	}
	writeError(w, http.StatusBadRequest, CodeInvalidRequest, "malformed JSON body: "+err.Error())
	return false
}

// recorder remembers the status for the request log; Unwrap lets
// http.ResponseController reach the real writer (Flush for SSE).
type recorder struct {
	http.ResponseWriter
	status int
	wrote  bool
}

func (r *recorder) WriteHeader(code int) {
	if !r.wrote {
		r.status, r.wrote = code, true
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	r.wrote = true
	return r.ResponseWriter.Write(b)
}

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// countWriter counts the bytes written through it.
type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n += int64(n)
	return n, err
}
