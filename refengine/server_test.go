package refengine

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const testKey = "engine-key-current"

func hashKey(k string) string {
	s := sha256.Sum256([]byte(k))
	return hex.EncodeToString(s[:])
}

// testLogger writes the engine's logs to the test log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewJSONHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(b []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

// newServer opens a Server on a brain in dir (a fresh temp dir when "").
func newServer(t testing.TB, dir string, mutate func(*Config)) *Server {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	cfg := Config{
		KeyHash:    hashKey(testKey),
		DBPath:     filepath.Join(dir, "data", "brain.sqlite"),
		CatalogDir: filepath.Join(dir, "catalog"),
		Version:    "v-test",
	}
	if mutate != nil {
		mutate(&cfg)
	}
	s, err := New(context.Background(), cfg, testLogger(t))
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	return s
}

// client talks to a test engine over real HTTP.
type client struct {
	t   testing.TB
	url string
	key string
}

func start(t testing.TB, s *Server) *client {
	ts := httptest.NewServer(s)
	t.Cleanup(ts.Close)
	return &client{t: t, url: ts.URL, key: testKey}
}

func (c *client) do(method, path string, body any) (int, []byte) {
	c.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		j, err := json.Marshal(b)
		require.NoError(c.t, err)
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, c.url+path, rd)
	require.NoError(c.t, err)
	if c.key != "" {
		req.Header.Set(HeaderEngineKey, c.key)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(c.t, err)
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	require.NoError(c.t, err)
	return resp.StatusCode, out
}

func (c *client) json(method, path string, body any, wantStatus int, into any) {
	c.t.Helper()
	status, out := c.do(method, path, body)
	require.Equal(c.t, wantStatus, status, "%s %s: %s", method, path, out)
	if into != nil {
		require.NoError(c.t, json.Unmarshal(out, into), "%s", out)
	}
}

func errorCode(t testing.TB, body []byte) string {
	t.Helper()
	var e ErrorBody
	require.NoError(t, json.Unmarshal(body, &e), "%s", body)
	require.NotEmpty(t, e.Error.Message, "%s", body)
	return e.Error.Code
}

func TestAuth(t *testing.T) {
	const prevKey = "engine-key-previous"
	tests := []struct {
		name       string
		key        string
		prevExpiry time.Duration // relative to now; 0 = no previous key configured
		wantStatus int
	}{
		{"no key", "", 0, http.StatusUnauthorized},
		{"wrong key", "nope", 0, http.StatusUnauthorized},
		{"key hash instead of key", hashKey(testKey), 0, http.StatusUnauthorized},
		{"right key", testKey, 0, http.StatusOK},
		{"right key during overlap", testKey, time.Hour, http.StatusOK},
		{"previous key before expiry", prevKey, time.Hour, http.StatusOK},
		{"previous key after expiry", prevKey, -time.Second, http.StatusUnauthorized},
		{"previous key not configured", prevKey, 0, http.StatusUnauthorized},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			s := newServer(t, "", func(c *Config) {
				if tt.prevExpiry != 0 {
					c.PrevKeyHash = hashKey(prevKey)
					c.PrevKeyExpiresAt = time.Now().Add(tt.prevExpiry)
				}
			})
			c := start(t, s)
			c.key = tt.key
			for _, route := range []struct{ method, path string }{
				{"GET", "/memories"}, {"GET", "/memory/export"}, {"GET", "/debug/health"},
			} {
				status, body := c.do(route.method, route.path, nil)
				assert.Equal(t, tt.wantStatus, status, "%s %s: %s", route.method, route.path, body)
				if status == http.StatusUnauthorized {
					assert.Equal(t, CodeInvalidEngineKey, errorCode(t, body))
				}
			}
			// Writes and unknown routes are guarded too.
			status, _ := c.do("POST", "/memories", `{"content":"x"}`)
			if tt.wantStatus == http.StatusOK {
				assert.Equal(t, http.StatusCreated, status)
			} else {
				assert.Equal(t, http.StatusUnauthorized, status)
			}
			status, _ = c.do("GET", "/no/such/route", nil)
			if tt.wantStatus == http.StatusOK {
				assert.Equal(t, http.StatusNotFound, status)
			} else {
				assert.Equal(t, http.StatusUnauthorized, status)
			}
			// /health needs no key whatever is sent.
			status, _ = c.do("GET", "/health", nil)
			assert.Equal(t, http.StatusOK, status)
		})
	}
}

func TestPreviousKeyExpiresWhileRunning(t *testing.T) {
	const prevKey = "engine-key-previous"
	s := newServer(t, "", func(c *Config) {
		c.PrevKeyHash = hashKey(prevKey)
		c.PrevKeyExpiresAt = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	})
	c := start(t, s)
	c.key = prevKey
	s.now = func() time.Time { return time.Date(2029, 12, 31, 23, 59, 59, 0, time.UTC) }
	status, _ := c.do("GET", "/memories", nil)
	assert.Equal(t, http.StatusOK, status)
	s.now = func() time.Time { return time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC) }
	status, _ = c.do("GET", "/memories", nil)
	assert.Equal(t, http.StatusUnauthorized, status)
}

func TestConfigValidation(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		want []string
	}{
		{"missing key hash", Config{}, []string{"ENGINE_KEY_HASH is required"}},
		{"bad key hash", Config{KeyHash: "abc"}, []string{"ENGINE_KEY_HASH: must be 64 hex digits"}},
		{"previous without expiry", Config{KeyHash: hashKey("a"), PrevKeyHash: "zz"}, []string{
			"ENGINE_KEY_HASH_PREVIOUS: must be 64 hex digits", "ENGINE_KEY_PREVIOUS_EXPIRES_AT is required",
		}},
		{"upper-case hash is fine", Config{KeyHash: strings.ToUpper(hashKey("a"))}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.cfg.Validate()
			if tt.want == nil {
				require.NoError(t, err)
				return
			}
			require.Error(t, err)
			for _, w := range tt.want {
				assert.Contains(t, err.Error(), w)
			}
		})
	}
}

func getHealth(t testing.TB, c *client) (int, HealthResponse) {
	t.Helper()
	status, body := c.do("GET", "/health", nil)
	var h HealthResponse
	require.NoError(t, json.Unmarshal(body, &h), "%s", body)
	return status, h
}

func TestHealth(t *testing.T) {
	t.Run("ok without catalog", func(t *testing.T) {
		before := time.Now()
		s := newServer(t, "", nil)
		c := start(t, s)
		c.key = ""
		status, h := getHealth(t, c)
		assert.Equal(t, http.StatusOK, status)
		assert.Equal(t, StatusOK, h.Status)
		assert.Equal(t, "v-test", h.Version)
		// Seconds since this server started: more than nothing, no more
		// than this test has run (a missing field or a wrong unit fails).
		assert.Positive(t, h.UptimeSeconds)
		assert.LessOrEqual(t, h.UptimeSeconds, time.Since(before).Seconds())
		assert.Equal(t, map[string]string{"database": "ok", "catalog": "absent"}, h.Subsystems)
	})
	t.Run("readable catalog", func(t *testing.T) {
		dir := t.TempDir()
		require.NoError(t, os.MkdirAll(filepath.Join(dir, "catalog"), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(dir, "catalog", "items.json"), []byte("[]"), 0o644))
		c := start(t, newServer(t, dir, nil))
		status, h := getHealth(t, c)
		assert.Equal(t, http.StatusOK, status)
		assert.Equal(t, "ok", h.Subsystems["catalog"])
	})
	t.Run("catalog that is not a directory fails", func(t *testing.T) {
		dir := t.TempDir()
		require.NoError(t, os.WriteFile(filepath.Join(dir, "catalog"), []byte("x"), 0o644))
		c := start(t, newServer(t, dir, nil))
		status, h := getHealth(t, c)
		assert.Equal(t, http.StatusServiceUnavailable, status)
		assert.Equal(t, StatusUnhealthy, h.Status)
		assert.True(t, strings.HasPrefix(h.Subsystems["catalog"], "error: "), h.Subsystems["catalog"])
		assert.Equal(t, "ok", h.Subsystems["database"])
	})
	t.Run("database failure is named", func(t *testing.T) {
		s := newServer(t, "", nil)
		c := start(t, s)
		require.NoError(t, s.brain.db.Close())
		status, h := getHealth(t, c)
		assert.Equal(t, http.StatusServiceUnavailable, status)
		assert.Equal(t, StatusUnhealthy, h.Status)
		assert.True(t, strings.HasPrefix(h.Subsystems["database"], "error: "), h.Subsystems["database"])
	})
	t.Run("boot delay", func(t *testing.T) {
		s := newServer(t, "", func(c *Config) { c.BootDelay = 300 * time.Millisecond })
		c := start(t, s)
		status, h := getHealth(t, c)
		assert.Equal(t, http.StatusServiceUnavailable, status)
		assert.Equal(t, StatusStarting, h.Status)
		assert.Equal(t, "ok", h.Subsystems["database"])
		// The other routes already work while starting.
		status, _ = c.do("GET", "/memories", nil)
		assert.Equal(t, http.StatusOK, status)
		require.Eventually(t, func() bool {
			status, h := getHealth(t, c)
			return status == http.StatusOK && h.Status == StatusOK
		}, 5*time.Second, 20*time.Millisecond)
		assert.GreaterOrEqual(t, time.Since(s.started), 300*time.Millisecond)
	})
	t.Run("HEAD and wrong method", func(t *testing.T) {
		c := start(t, newServer(t, "", nil))
		status, _ := c.do("HEAD", "/health", nil)
		assert.Equal(t, http.StatusOK, status)
		status, body := c.do("POST", "/health", nil)
		assert.Equal(t, http.StatusMethodNotAllowed, status)
		assert.Equal(t, CodeMethodNotAllowed, errorCode(t, body))
	})
}

func TestUnhealthySwitchSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	marker := filepath.Join(dir, "data", UnhealthyMarker)

	s1 := newServer(t, dir, nil)
	c1 := start(t, s1)
	status, _ := getHealth(t, c1)
	require.Equal(t, http.StatusOK, status)

	// The switch needs the key and a boolean.
	anon := *c1
	anon.key = ""
	status, _ = anon.do("PUT", "/debug/health", `{"healthy":false}`)
	assert.Equal(t, http.StatusUnauthorized, status)
	for _, bad := range []string{``, `{}`, `{"healthy":"no"}`, `{"healthy":false,"x":1}`, `[`} {
		status, body := c1.do("PUT", "/debug/health", bad)
		assert.Equal(t, http.StatusBadRequest, status, "body %q", bad)
		assert.Equal(t, CodeInvalidRequest, errorCode(t, body))
	}
	require.NoFileExists(t, marker)

	var sw SwitchBody
	c1.json("PUT", "/debug/health", `{"healthy":false}`, http.StatusOK, &sw)
	require.NotNil(t, sw.Healthy)
	assert.False(t, *sw.Healthy)
	require.FileExists(t, marker)
	status, h := getHealth(t, c1)
	assert.Equal(t, http.StatusServiceUnavailable, status)
	assert.Equal(t, StatusUnhealthy, h.Status)
	assert.Contains(t, h.Subsystems["debug"], "error: ")
	c1.json("GET", "/debug/health", nil, http.StatusOK, &sw)
	assert.False(t, *sw.Healthy)
	require.NoError(t, s1.Close())

	// A new process on the same data directory starts unhealthy.
	s2 := newServer(t, dir, nil)
	c2 := start(t, s2)
	status, h = getHealth(t, c2)
	assert.Equal(t, http.StatusServiceUnavailable, status)
	assert.Equal(t, StatusUnhealthy, h.Status)

	c2.json("PUT", "/debug/health", `{"healthy":true}`, http.StatusOK, &sw)
	assert.True(t, *sw.Healthy)
	assert.NoFileExists(t, marker)
	status, _ = getHealth(t, c2)
	assert.Equal(t, http.StatusOK, status)
	require.NoError(t, s2.Close())

	s3 := newServer(t, dir, nil)
	status, _ = getHealth(t, start(t, s3))
	assert.Equal(t, http.StatusOK, status)

	// ENGINE_UNHEALTHY forces it at start.
	s4 := newServer(t, "", func(c *Config) { c.ForceUnhealthy = true })
	status, h = getHealth(t, start(t, s4))
	assert.Equal(t, http.StatusServiceUnavailable, status)
	assert.Equal(t, StatusUnhealthy, h.Status)
}

func TestMemoriesAddAndSearch(t *testing.T) {
	c := start(t, newServer(t, "", nil))

	var m1, m2, m3 Memory
	c.json("POST", "/memories", AddMemoryRequest{Content: "My cats are called Tom and Ginger", Tags: []string{"pets", "family"}}, http.StatusCreated, &m1)
	c.json("POST", "/memories", AddMemoryRequest{Content: "I drink green tea every morning"}, http.StatusCreated, &m2)
	c.json("POST", "/memories", AddMemoryRequest{Content: "Crème brûlée is my favourite dessert — naïve café", Tags: []string{"food"}}, http.StatusCreated, &m3)

	assert.Equal(t, int64(1), m1.ID)
	assert.Equal(t, int64(2), m2.ID)
	assert.Equal(t, []string{"pets", "family"}, m1.Tags)
	assert.Equal(t, []string{}, m2.Tags, "tags are [] not null")
	created, err := time.Parse(time.RFC3339Nano, m1.CreatedAt)
	require.NoError(t, err)
	assert.WithinDuration(t, time.Now(), created, time.Minute)
	assert.Len(t, m1.CreatedAt, len(TimeFormat))

	ids := func(q url.Values) []int64 {
		t.Helper()
		var r MemoriesResponse
		c.json("GET", "/memories?"+q.Encode(), nil, http.StatusOK, &r)
		out := []int64{}
		for _, m := range r.Memories {
			out = append(out, m.ID)
		}
		return out
	}
	tests := []struct {
		name string
		q    url.Values
		want []int64
	}{
		{"empty query is newest first", url.Values{}, []int64{3, 2, 1}},
		{"limit", url.Values{"limit": {"2"}}, []int64{3, 2}},
		{"stemmed word", url.Values{"q": {"cat"}}, []int64{1}},
		{"case and punctuation", url.Values{"q": {"GREEN, Tea?!"}}, []int64{2}},
		{"all words by default", url.Values{"q": {"green cats"}}, []int64{}},
		{"any word", url.Values{"q": {"green cats"}, "match": {"any"}}, []int64{1, 2}},
		{"tags are searchable", url.Values{"q": {"family"}}, []int64{1}},
		{"diacritics folded", url.Values{"q": {"creme brulee cafe"}}, []int64{3}},
		{"fts5 phrase", url.Values{"q": {`"green tea"`}, "match": {"fts5"}}, []int64{2}},
		{"fts5 prefix and OR", url.Values{"q": {`gin* OR morn*`}, "match": {"fts5"}}, []int64{1, 2}},
		{"punctuation only", url.Values{"q": {"?!"}}, []int64{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := ids(tt.q)
			if tt.name == "any word" || tt.name == "fts5 prefix and OR" {
				assert.ElementsMatch(t, tt.want, got)
				return
			}
			assert.Equal(t, tt.want, got)
		})
	}

	t.Run("tricky queries never 500", func(t *testing.T) {
		tricky := []string{`"`, `what's up?`, `a:b`, `foo AND`, `*`, `NEAR(`, `(`, `)`, `x OR`, `-`,
			`hello -world`, `^`, `+`, "\x00", `😀`, `a/b`, `c++`, `AND`, `NOT`, `e.g.`, `'; DROP TABLE memories; --`,
			`content:cats`, `tags:pets`, `{a b}`, `"unterminated`, strings.Repeat("x ", 2000), `\`, `%`, `NEAR(a b, 2)`}
		for _, q := range tricky {
			for _, match := range []string{"", "any", "fts5"} {
				status, body := c.do("GET", "/memories?"+url.Values{"q": {q}, "match": {match}}.Encode(), nil)
				if match == "fts5" {
					if status != http.StatusOK {
						assert.Equal(t, http.StatusBadRequest, status, "q=%q match=%q: %s", q, match, body)
						assert.Equal(t, CodeInvalidQuery, errorCode(t, body))
					}
					continue
				}
				assert.Equal(t, http.StatusOK, status, "q=%q match=%q: %s", q, match, body)
			}
		}
		// The brain is intact.
		assert.Equal(t, []int64{3, 2, 1}, ids(url.Values{}))
	})

	t.Run("bad input", func(t *testing.T) {
		tests := []struct {
			method, path string
			body         any
			status       int
			code         string
		}{
			{"POST", "/memories", `{"content":""}`, 400, CodeInvalidRequest},
			{"POST", "/memories", `{"content":"   "}`, 400, CodeInvalidRequest},
			{"POST", "/memories", `{"content":"x","tags":[""]}`, 400, CodeInvalidRequest},
			{"POST", "/memories", `{"content":"x","extra":1}`, 400, CodeInvalidRequest},
			{"POST", "/memories", `{"content":"x"} {"content":"y"}`, 400, CodeInvalidRequest},
			{"POST", "/memories", `{"content":`, 400, CodeInvalidRequest},
			{"POST", "/memories", ``, 400, CodeInvalidRequest},
			{"POST", "/memories", `{"content":"` + strings.Repeat("a", MaxContentBytes+1) + `"}`, 400, CodeInvalidRequest},
			{"POST", "/memories", `{"content":"` + strings.Repeat("a", MaxBodyBytes) + `"}`, 413, CodePayloadTooLarge},
			{"GET", "/memories?limit=0", nil, 400, CodeInvalidRequest},
			{"GET", "/memories?limit=abc", nil, 400, CodeInvalidRequest},
			{"GET", "/memories?match=regex", nil, 400, CodeInvalidRequest},
			{"DELETE", "/memories", nil, 405, CodeMethodNotAllowed},
		}
		for _, tt := range tests {
			status, body := c.do(tt.method, tt.path, tt.body)
			if assert.Equal(t, tt.status, status, "%s %s %.60v: %s", tt.method, tt.path, tt.body, body) {
				assert.Equal(t, tt.code, errorCode(t, body))
			}
		}
		assert.Equal(t, []int64{3, 2, 1}, ids(url.Values{}), "nothing was stored")
	})
}

func TestExportImportRoundTrip(t *testing.T) {
	a := start(t, newServer(t, "", nil))
	contents := []AddMemoryRequest{
		{Content: "plain"},
		{Content: "unicode: 日本語 😀 \"quotes\" <html> & \\ backslash\ttab\nnewline", Tags: []string{"ü", "<b>"}},
		{Content: "third", Tags: []string{"a", "a", "b"}},
	}
	for _, m := range contents {
		a.json("POST", "/memories", m, http.StatusCreated, nil)
	}
	a.json("POST", "/execute", ExecuteRequest{Input: "tell me about unicode"}, http.StatusOK, nil)

	status, export1 := a.do("GET", "/memory/export", nil)
	require.Equal(t, http.StatusOK, status)
	var bundle Bundle
	require.NoError(t, json.Unmarshal(export1, &bundle))
	assert.Equal(t, BundleFormat, bundle.Format)
	assert.Equal(t, BundleVersion, bundle.Version)
	require.Len(t, bundle.Memories, 4)
	for i, m := range bundle.Memories {
		assert.Equal(t, int64(i+1), m.ID)
	}
	assert.Equal(t, []string{"a", "a", "b"}, bundle.Memories[2].Tags)

	// The second brain has other contents first: import replaces them.
	bsrv := newServer(t, "", nil)
	b := start(t, bsrv)
	for i := 0; i < 7; i++ {
		b.json("POST", "/memories", AddMemoryRequest{Content: "to be replaced"}, http.StatusCreated, nil)
	}
	var ir ImportResponse
	b.json("POST", "/memory/import", export1, http.StatusOK, &ir)
	assert.Equal(t, 4, ir.Imported)

	status, export2 := b.do("GET", "/memory/export", nil)
	require.Equal(t, http.StatusOK, status)
	assert.Equal(t, string(export1), string(export2), "export → import → export is byte-identical")

	// Importing it back into the first brain changes nothing either.
	a.json("POST", "/memory/import", export2, http.StatusOK, nil)
	_, export3 := a.do("GET", "/memory/export", nil)
	assert.Equal(t, export1, export3)

	// The index follows the import, and new ids continue after the highest.
	var r MemoriesResponse
	b.json("GET", "/memories?q=replaced", nil, http.StatusOK, &r)
	assert.Empty(t, r.Memories)
	b.json("GET", "/memories?q=%E6%97%A5%E6%9C%AC%E8%AA%9E", nil, http.StatusOK, &r) // 日本語
	require.Len(t, r.Memories, 2, "the memory and the turn that quoted it")
	assert.Equal(t, int64(2), r.Memories[0].ID)
	var m Memory
	b.json("POST", "/memories", AddMemoryRequest{Content: "after import"}, http.StatusCreated, &m)
	assert.Equal(t, int64(5), m.ID)

	// A brain survives a restart of its engine (the file is the truth).
	_, before := b.do("GET", "/memory/export", nil)
	dbPath := bsrv.cfg.DBPath
	require.NoError(t, bsrv.Close())
	b2 := start(t, newServer(t, filepath.Dir(filepath.Dir(dbPath)), nil))
	_, after := b2.do("GET", "/memory/export", nil)
	assert.Equal(t, string(before), string(after))
}

func TestImportValidation(t *testing.T) {
	c := start(t, newServer(t, "", nil))
	c.json("POST", "/memories", AddMemoryRequest{Content: "keep me"}, http.StatusCreated, nil)
	_, before := c.do("GET", "/memory/export", nil)

	ok := `{"format":"enginefleet.brain","version":1,"memories":[`
	tests := []struct {
		name string
		body string
	}{
		{"malformed", `{"format":`},
		{"wrong format", `{"format":"other","version":1,"memories":[]}`},
		{"wrong version", `{"format":"enginefleet.brain","version":2,"memories":[]}`},
		{"unknown field", `{"format":"enginefleet.brain","version":1,"memories":[],"x":1}`},
		{"zero id", ok + `{"id":0,"content":"a","tags":[],"created_at":"2024-01-01T00:00:00Z"}]}`},
		{"duplicate id", ok + `{"id":1,"content":"a","tags":[],"created_at":"2024-01-01T00:00:00Z"},{"id":1,"content":"b","tags":[],"created_at":"2024-01-01T00:00:00Z"}]}`},
		{"bad time", ok + `{"id":1,"content":"a","tags":[],"created_at":"yesterday"}]}`},
		{"empty content", ok + `{"id":1,"content":"","tags":[],"created_at":"2024-01-01T00:00:00Z"}]}`},
		// The last memory is bad: nothing of the bundle may land.
		{"bad after good", ok + `{"id":1,"content":"a","tags":[],"created_at":"2024-01-01T00:00:00Z"},{"id":2,"content":"b","tags":[""],"created_at":"2024-01-01T00:00:00Z"}]}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, body := c.do("POST", "/memory/import", tt.body)
			assert.Equal(t, http.StatusBadRequest, status, "%s", body)
			assert.Equal(t, CodeInvalidRequest, errorCode(t, body))
			_, after := c.do("GET", "/memory/export", nil)
			assert.Equal(t, string(before), string(after), "a rejected import leaves the brain untouched")
		})
	}

	t.Run("timestamps are normalised to UTC", func(t *testing.T) {
		body := ok + `{"id":9,"content":"a","created_at":"2024-03-01T12:00:00.5+02:00"}]}`
		c.json("POST", "/memory/import", body, http.StatusOK, nil)
		var bn Bundle
		c.json("GET", "/memory/export", nil, http.StatusOK, &bn)
		require.Len(t, bn.Memories, 1)
		assert.Equal(t, "2024-03-01T10:00:00.500000000Z", bn.Memories[0].CreatedAt)
		assert.Equal(t, []string{}, bn.Memories[0].Tags)
	})
	t.Run("empty bundle empties the brain", func(t *testing.T) {
		c.json("POST", "/memory/import", ok+`]}`, http.StatusOK, nil)
		_, out := c.do("GET", "/memory/export", nil)
		assert.Equal(t, `{"format":"enginefleet.brain","version":1,"memories":[]}`+"\n", string(out))
	})
}

// sseEvent is one server-sent event.
type sseEvent struct {
	Event string
	Data  string
}

// readSSE parses events from r until EOF or until stop returns true.
func readSSE(t testing.TB, r io.Reader, stop func(sseEvent) bool) []sseEvent {
	t.Helper()
	var evs []sseEvent
	var cur sseEvent
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if cur.Event != "" || cur.Data != "" {
				evs = append(evs, cur)
				if stop != nil && stop(cur) {
					return evs
				}
			}
			cur = sseEvent{}
		case strings.HasPrefix(line, "event: "):
			cur.Event = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			cur.Data += strings.TrimPrefix(line, "data: ")
		}
	}
	return evs
}

func postExecute(t testing.TB, ctx context.Context, c *client, input string) *http.Response {
	t.Helper()
	body, _ := json.Marshal(ExecuteRequest{Input: input})
	req, err := http.NewRequestWithContext(ctx, "POST", c.url+"/execute", bytes.NewReader(body))
	require.NoError(t, err)
	req.Header.Set(HeaderEngineKey, c.key)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	return resp
}

func TestExecuteStreams(t *testing.T) {
	s := newServer(t, "", nil)
	c := start(t, s)
	c.json("POST", "/memories", AddMemoryRequest{Content: "The launch code is banana", Tags: []string{"secret"}}, http.StatusCreated, nil)
	c.json("POST", "/memories", AddMemoryRequest{Content: "Bananas are yellow"}, http.StatusCreated, nil)
	c.json("POST", "/memories", AddMemoryRequest{Content: "unrelated"}, http.StatusCreated, nil)

	resp := postExecute(t, context.Background(), c, "What is the launch code? banana!")
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"))
	evs := readSSE(t, resp.Body, nil)
	require.NotEmpty(t, evs)

	var recalled []Memory
	var answer strings.Builder
	var done *DoneEvent
	for i, ev := range evs {
		switch ev.Event {
		case "memory":
			require.Empty(t, answer.String(), "memory events come first")
			var m Memory
			require.NoError(t, json.Unmarshal([]byte(ev.Data), &m))
			recalled = append(recalled, m)
		case "token":
			var tok TokenEvent
			require.NoError(t, json.Unmarshal([]byte(ev.Data), &tok))
			answer.WriteString(tok.Text)
		case "done":
			require.Equal(t, len(evs)-1, i, "done is last")
			done = new(DoneEvent)
			require.NoError(t, json.Unmarshal([]byte(ev.Data), done))
		default:
			t.Fatalf("unexpected event %q: %s", ev.Event, ev.Data)
		}
	}
	require.Len(t, recalled, 2)
	assert.Equal(t, int64(1), recalled[0].ID, "best match first")
	assert.Equal(t, int64(2), recalled[1].ID)
	assert.Equal(t, Answer(recalled), answer.String())
	assert.Contains(t, answer.String(), "[memory 1]")
	require.NotNil(t, done)
	assert.Equal(t, []int64{1, 2}, done.MemoriesUsed)
	assert.Equal(t, int64(4), done.MemoryID)

	// The turn is stored, and a second identical turn streams the same
	// tokens apart from what the first turn added to the brain.
	var r MemoriesResponse
	c.json("GET", "/memories?q=turn", nil, http.StatusOK, &r)
	require.Len(t, r.Memories, 1)
	assert.Equal(t, TurnContent("What is the launch code? banana!", answer.String()), r.Memories[0].Content)
	assert.Equal(t, []string{TurnTag}, r.Memories[0].Tags)

	t.Run("no memories", func(t *testing.T) {
		c := start(t, newServer(t, "", nil))
		resp := postExecute(t, context.Background(), c, "hello")
		defer resp.Body.Close()
		evs := readSSE(t, resp.Body, nil)
		require.GreaterOrEqual(t, len(evs), 2)
		assert.Equal(t, "token", evs[0].Event)
		assert.Equal(t, "done", evs[len(evs)-1].Event)
	})
	t.Run("bad input", func(t *testing.T) {
		for _, body := range []string{`{"input":""}`, `{"input":"  "}`, `{}`, `{"prompt":"x"}`, `nope`,
			`{"input":"` + strings.Repeat("x", MaxInputBytes+1) + `"}`} {
			status, out := c.do("POST", "/execute", body)
			assert.Equal(t, http.StatusBadRequest, status, "%.40s: %s", body, out)
			assert.Equal(t, CodeInvalidRequest, errorCode(t, out))
		}
	})
}

func TestExecuteClientDisconnect(t *testing.T) {
	s := newServer(t, "", func(c *Config) { c.TokenDelay = 50 * time.Millisecond })
	// Signalled when the execute handler returns.
	returned := make(chan struct{})
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.ServeHTTP(w, r)
		if r.URL.Path == "/execute" {
			close(returned)
		}
	}))
	t.Cleanup(ts.Close)
	c := &client{t: t, url: ts.URL, key: testKey}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	resp := postExecute(t, ctx, c, "remember this please")
	defer resp.Body.Close()
	evs := readSSE(t, resp.Body, func(ev sseEvent) bool { return ev.Event == "token" })
	require.Equal(t, "token", evs[len(evs)-1].Event)
	cancel()

	// The handler notices and stores nothing.
	select {
	case <-returned:
	case <-time.After(5 * time.Second):
		t.Fatal("the execute handler still runs 5 s after its client went away")
	}
	var r MemoriesResponse
	c.json("GET", "/memories", nil, http.StatusOK, &r)
	assert.Empty(t, r.Memories, "an abandoned turn is not stored")
}

func TestGracefulShutdownFinishesInFlightRequest(t *testing.T) {
	s := newServer(t, "", func(c *Config) {
		c.TokenDelay = 40 * time.Millisecond
		c.ShutdownTimeout = 10 * time.Second
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	served := make(chan error, 1)
	go func() { served <- s.Serve(ctx, ln) }()
	c := &client{t: t, url: "http://" + ln.Addr().String(), key: testKey}

	resp := postExecute(t, context.Background(), c, "a question that takes a while to answer")
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	first := readSSE(t, br, func(ev sseEvent) bool { return ev.Event == "token" })
	require.NotEmpty(t, first)

	stop() // SIGTERM
	// New connections are refused while the turn drains.
	require.Eventually(t, func() bool {
		conn, err := net.DialTimeout("tcp", ln.Addr().String(), 100*time.Millisecond)
		if err == nil {
			conn.Close()
		}
		return err != nil
	}, 2*time.Second, 10*time.Millisecond)

	rest := readSSE(t, br, nil)
	require.NotEmpty(t, rest)
	assert.Equal(t, "done", rest[len(rest)-1].Event, "the in-flight turn finished")
	select {
	case err := <-served:
		assert.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after the in-flight request finished")
	}
	// The turn was stored before the brain closes.
	n := 0
	require.NoError(t, s.brain.Export(context.Background(), func(Memory) error { n++; return nil }))
	assert.Equal(t, 1, n)
}

func TestShutdownTimeoutCutsStuckRequests(t *testing.T) {
	s := newServer(t, "", func(c *Config) {
		c.TokenDelay = time.Second
		c.ShutdownTimeout = 200 * time.Millisecond
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- s.Serve(ctx, ln) }()
	c := &client{t: t, url: "http://" + ln.Addr().String(), key: testKey}
	resp := postExecute(t, context.Background(), c, "slow slow slow slow slow")
	defer resp.Body.Close()
	readSSE(t, resp.Body, func(ev sseEvent) bool { return ev.Event == "token" })
	began := time.Now()
	stop()
	select {
	case err := <-served:
		assert.Error(t, err, "a drain that times out is reported")
		assert.Less(t, time.Since(began), 3*time.Second)
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not give up after the shutdown timeout")
	}
}

func TestRunClosesBrain(t *testing.T) {
	dir := t.TempDir()
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	l.Close()
	cfg := Config{KeyHash: hashKey(testKey), DBPath: filepath.Join(dir, "brain.sqlite"), ListenAddr: addr}
	go func() { done <- Run(ctx, cfg, testLogger(t)) }()
	require.Eventually(t, func() bool { // serving: the brain is open
		r, err := http.Get("http://" + addr + "/health")
		if err != nil {
			return false
		}
		r.Body.Close()
		return r.StatusCode == http.StatusOK
	}, 30*time.Second, 20*time.Millisecond)
	stop()
	require.NoError(t, <-done)
	// After a clean close the WAL is checkpointed away.
	_, err = os.Stat(filepath.Join(dir, "brain.sqlite-wal"))
	assert.True(t, os.IsNotExist(err), "wal file left behind: %v", err)
}
