package api

import (
	"fmt"
	"net/http"
	"time"

	orch "github.com/enginefleet/orchestrator"
)

// Limits of the API's HTTP server, so a slow or oversized client costs
// bounded time and memory.
const (
	// MaxHeaderBytes bounds a request's header (431 beyond it).
	MaxHeaderBytes = 64 << 10
	// MaxBodyBytes bounds a request's body (413 INVALID_REQUEST beyond it).
	MaxBodyBytes = 1 << 20
	// ReadHeaderTimeout cuts a client trickling its header (slowloris).
	ReadHeaderTimeout = 10 * time.Second
	// ReadTimeout bounds reading a whole request, header and body (an
	// operation's own body deadline, 5 s, is tighter). Only reading: once
	// the body is read, net/http lifts the deadline, so a request that
	// then waits minutes for its operation is not cut.
	ReadTimeout = 30 * time.Second
	// WriteTimeout bounds writing a response once it has started (see
	// statusRecorder). It is not the server's WriteTimeout, which counts
	// from the end of the header and would cut synchronous requests that
	// wait for an operation (minutes: a boot, a backup, a restore) before
	// they write anything.
	WriteTimeout = time.Minute
	// IdleTimeout closes a kept-alive connection with no request for this
	// long; above the 90–120 s reverse proxies keep idle upstream
	// connections, so a proxy does not reuse one being closed.
	IdleTimeout = 150 * time.Second
)

// HTTPServer is the http.Server for the API on addr, with the limits above.
func (s *Server) HTTPServer(addr string) *http.Server {
	return &http.Server{
		Addr:              addr,
		Handler:           s.Handler(),
		ReadHeaderTimeout: ReadHeaderTimeout,
		ReadTimeout:       ReadTimeout,
		IdleTimeout:       IdleTimeout,
		MaxHeaderBytes:    MaxHeaderBytes,
		// WriteTimeout stays 0: per response instead (WriteTimeout above).
		// "OPTIONS *" reaches the API too, and is answered in its envelope.
		DisableGeneralOptionsHandler: true,
	}
}

// limitBody refuses a body announced larger than MaxBodyBytes at once and
// cuts one that turns out larger while read (chunked); reading past the
// limit fails with *http.MaxBytesError, which huma's error hook answers
// 413 too.
func limitBody(w http.ResponseWriter, r *http.Request) bool {
	if r.ContentLength > MaxBodyBytes {
		writeEnvelope(w, r, http.StatusRequestEntityTooLarge, orch.CodeInvalidRequest, tooLarge)
		return false
	}
	if r.Body != nil && r.Body != http.NoBody {
		r.Body = http.MaxBytesReader(w, r.Body, MaxBodyBytes)
	}
	return true
}

var tooLarge = fmt.Sprintf("the request body exceeds %d bytes", MaxBodyBytes)
