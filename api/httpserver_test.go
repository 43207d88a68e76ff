package api

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/lifecycle"
	"github.com/enginefleet/orchestrator/schema"
)

const limitsAdminKey = "limits-admin-key-0123456789"

// realServer serves the API through HTTPServer (the limits and timeouts
// production uses) on a real listener; adjust may change the server
// before it starts.
func realServer(t *testing.T, cfg Config, cc lifecycle.Config, adjust func(*Server)) (*Server, string) {
	t.Helper()
	pool := testenv.Pool(t, testenv.DB(t))
	rc, err := river.NewClient[pgx.Tx](riverpgxv5.New(pool), &river.Config{})
	require.NoError(t, err)
	kr, err := keys.NewKeyring(keys.GenerateMasterKey(), nil)
	require.NoError(t, err)
	if cfg.AdminKey == "" {
		cfg.AdminKey = limitsAdminKey
	}
	core := lifecycle.New(cc, pool, rc, kr, testenv.Quiet())
	s := New(cfg, core, pool, rc, testenv.Quiet())
	if adjust != nil {
		adjust(s)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go s.Run(ctx)
	go core.Run(ctx)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := s.HTTPServer("")
	go srv.Serve(l) //nolint:errcheck
	t.Cleanup(func() { srv.Close(); cancel() })
	return s, "http://" + l.Addr().String()
}

func TestHTTPServerSettings(t *testing.T) {
	s := New(Config{}, nil, nil, nil, testenv.Quiet())
	srv := s.HTTPServer(":8000")
	require.Equal(t, ":8000", srv.Addr)
	require.Equal(t, 10*time.Second, srv.ReadHeaderTimeout)
	require.Equal(t, 30*time.Second, srv.ReadTimeout)
	require.Equal(t, 150*time.Second, srv.IdleTimeout)
	require.Equal(t, 64<<10, srv.MaxHeaderBytes)
	require.Zero(t, srv.WriteTimeout, "a server-wide WriteTimeout would cut requests waiting minutes for an operation")
}

// envelopeOf reads a response that must be the contract's envelope.
func envelopeOf(t *testing.T, resp *http.Response) ErrorDetail {
	t.Helper()
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	var b ErrorBody
	require.NoError(t, json.Unmarshal(raw, &b), "%d %q", resp.StatusCode, raw)
	require.NotEmpty(t, b.Error.Code, "%q", raw)
	require.NotEmpty(t, b.Error.Message, "%q", raw)
	return b.Error
}

// A client trickling its header is cut off; it is never served.
func TestSlowlorisHeaderCut(t *testing.T) {
	t.Parallel()
	_, base := realServer(t, Config{}, lifecycle.Config{}, nil)
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	require.NoError(t, err)
	defer conn.Close()
	_, err = io.WriteString(conn, "GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
	require.NoError(t, err)
	closed := make(chan error, 1)
	go func() {
		_, err := conn.Read(make([]byte, 1)) // blocks until the server closes
		closed <- err
	}()
	start := time.Now()
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case err := <-closed:
			require.Error(t, err, "the server answered a header it never got whole")
			t.Logf("cut after %s", time.Since(start).Round(time.Millisecond))
			return
		case <-tick.C:
			if time.Since(start) > 40*time.Second {
				t.Fatal("a header trickled for 40 s and the connection is still open")
			}
			conn.Write([]byte("a")) //nolint:errcheck // fails once the server has closed
		}
	}
}

// A header larger than MaxHeaderBytes is answered 431.
func TestOversizedHeader(t *testing.T) {
	t.Parallel()
	_, base := realServer(t, Config{}, lifecycle.Config{}, nil)
	req, err := http.NewRequest("GET", base+"/health", nil)
	require.NoError(t, err)
	req.Header.Set("X-Big", strings.Repeat("a", 100<<10))
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusRequestHeaderFieldsTooLarge, resp.StatusCode)

	req.Header.Set("X-Big", strings.Repeat("a", 32<<10)) // within the limit
	resp, err = http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	require.NotEqual(t, http.StatusRequestHeaderFieldsTooLarge, resp.StatusCode)
}

// A body larger than MaxBodyBytes is answered 413 with the envelope,
// whether announced (Content-Length) or streamed (chunked), on huma's
// routes and the others.
func TestOversizedBody(t *testing.T) {
	t.Parallel()
	_, base := realServer(t, Config{}, lifecycle.Config{}, nil)
	big := `{"slug":"acme","display_name":"` + strings.Repeat("a", 2<<20) + `"}`
	for _, tc := range []struct {
		name, path string
		body       func() io.Reader
	}{
		{"announced", "/products/register", func() io.Reader { return strings.NewReader(big) }},
		{"chunked", "/products/register", func() io.Reader { return io.MultiReader(strings.NewReader(big)) }},
		{"announced, no route", "/nowhere", func() io.Reader { return strings.NewReader(big) }},
		{"announced, admin UI", AdminUIPath + "/api/jobs/cancel", func() io.Reader { return strings.NewReader(big) }},
		{"chunked, admin UI", AdminUIPath + "/api/jobs/cancel", func() io.Reader { return io.MultiReader(strings.NewReader(big)) }},
	} {
		req, err := http.NewRequest("POST", base+tc.path, tc.body())
		require.NoError(t, err)
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("X-Admin-Key", limitsAdminKey)
		req.SetBasicAuth("admin", limitsAdminKey)
		resp, err := http.DefaultClient.Do(req)
		if err != nil && tc.name != "announced" {
			// The server may close before reading a streamed body to its end.
			var ne net.Error
			t.Logf("%s: %v", tc.name, err)
			require.True(t, errors.As(err, &ne) || strings.Contains(err.Error(), "reset") || strings.Contains(err.Error(), "broken pipe"), "%s: %v", tc.name, err)
			continue
		}
		require.NoError(t, err, tc.name)
		require.Equal(t, http.StatusRequestEntityTooLarge, resp.StatusCode, tc.name)
		if strings.HasPrefix(tc.path, AdminUIPath) {
			resp.Body.Close() // River UI's own handler: its own error format
			continue
		}
		e := envelopeOf(t, resp)
		require.Equal(t, string(orch.CodeInvalidRequest), e.Code, tc.name)
		require.Contains(t, e.Message, "exceeds", tc.name)
	}
	// Within the limit: served.
	req, err := http.NewRequest("POST", base+"/products/register", strings.NewReader(`{"slug":"acme","display_name":"Acme"}`))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Admin-Key", limitsAdminKey)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
}

// A body that stops arriving is answered 408 with the envelope once the
// operation's body deadline passes.
func TestSlowBodyCut(t *testing.T) {
	t.Parallel()
	_, base := realServer(t, Config{}, lifecycle.Config{}, nil)
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	require.NoError(t, err)
	defer conn.Close()
	_, err = io.WriteString(conn, "POST /products/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"+
		"X-Admin-Key: "+limitsAdminKey+"\r\nContent-Length: 100\r\n\r\n{\"slug\":")
	require.NoError(t, err)
	conn.SetReadDeadline(time.Now().Add(40 * time.Second)) //nolint:errcheck
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	require.NoError(t, err, "no answer to a stalled body")
	require.Equal(t, http.StatusRequestTimeout, resp.StatusCode)
	require.Equal(t, string(orch.CodeInvalidRequest), envelopeOf(t, resp).Code)
}

// A synchronous request waits for its operation far longer than any read
// or write timeout, and still gets its answer: the write deadline counts
// from the moment the response starts, not from the request.
func TestLongWaitNotCut(t *testing.T) {
	t.Parallel()
	cc := lifecycle.Config{BootTimeout: time.Second, DefaultImage: "enginefleet/engine:test", PortMin: 21000, PortMax: 21099,
		URLTemplate: "http://127.0.0.1:{port}"}
	s, base := realServer(t, Config{}, cc, func(s *Server) { s.writeTimeout = time.Second })
	key := keys.Generate()
	_, err := schema.New(s.pool).InsertProduct(context.Background(), "acme", "Acme", orch.Policy{}, keys.Hash(key))
	require.NoError(t, err)
	// No worker runs: the provision never finishes, the request waits
	// BootTimeout + 10 s (11 s) and is answered BOOT_TIMEOUT.
	req, err := http.NewRequest("POST", base+"/engines/u1/admit", strings.NewReader(`{"auto_provision":true}`))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Platform-Key", key)
	start := time.Now()
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err, "cut after %s", time.Since(start))
	require.Equal(t, http.StatusGatewayTimeout, resp.StatusCode)
	require.Equal(t, string(orch.CodeBootTimeout), envelopeOf(t, resp).Code)
	require.Greater(t, time.Since(start), 10*time.Second, "the request waited its whole budget")
}
