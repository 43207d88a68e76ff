package api_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"

	"github.com/enginefleet/orchestrator/api"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
)

// fuzzTarget is one API served like production (HTTPServer's limits) on
// its own database, with a product whose key the fuzzer may use (at most
// 3 engines, so it cannot run out of ports) and a victim product whose id
// fills {product_id} (its policy and key may change; nothing depends on it).
type fuzzTarget struct {
	base      string
	client    *http.Client
	key       string
	victimID  string
	templates []string
}

func newFuzzTarget(f *testing.F) *fuzzTarget {
	f.Helper()
	pool := testenv.Pool(f, testenv.DB(f))
	rc, err := river.NewClient(riverpgxv5.New(pool), &river.Config{})
	if err != nil {
		f.Fatal(err)
	}
	kr, err := keys.NewKeyring(keys.GenerateMasterKey(), nil)
	if err != nil {
		f.Fatal(err)
	}
	cc := testCoreConfig()
	cc.BootTimeout = time.Second
	srv := newAPI(testConfig(), pool, rc, kr, testenv.Quiet(), cc)
	ctx, cancel := context.WithCancel(context.Background())
	go srv.Run(ctx)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	hs := srv.HTTPServer("")
	go hs.Serve(l) //nolint:errcheck
	f.Cleanup(func() { hs.Close(); cancel() })

	ft := &fuzzTarget{base: "http://" + l.Addr().String(),
		client: &http.Client{Timeout: 30 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}}
	register := func(slug, policy string) map[string]any {
		status, out := post(f, "POST", ft.base+"/products/register", `{"slug":"`+slug+`","display_name":"`+slug+`","policy":`+policy+`}`)
		if status != http.StatusOK {
			f.Fatalf("register %s: %d %v", slug, status, out)
		}
		return out
	}
	ft.key = register("fuzz", `{"max_engines":3}`)["platform_api_key"].(string)
	ft.victimID = register("victim", `{}`)["product_id"].(string)
	for p := range srv.API().OpenAPI().Paths {
		ft.templates = append(ft.templates, p)
	}
	ft.templates = append(ft.templates, "/", "/openapi.yaml", "/openapi.json", api.AdminUIPath, api.AdminUIPath+"/api/jobs")
	sort.Strings(ft.templates)
	return ft
}

// path builds the request path: a route template with arg in every
// parameter, or (route past the templates) arg itself as the path. Either
// way every byte is escaped as needed, so what the server decodes may hold
// anything: control bytes, invalid UTF-8, "..", "//".
func (ft *fuzzTarget) path(route uint8, arg string) string {
	if int(route) < len(ft.templates) {
		t := ft.templates[route]
		var b strings.Builder
		for {
			i := strings.IndexByte(t, '{')
			j := strings.IndexByte(t, '}')
			if i < 0 || j < i {
				b.WriteString(t)
				break
			}
			b.WriteString(t[:i])
			if t[i+1:j] == "product_id" && arg == "" {
				b.WriteString(ft.victimID)
			} else {
				b.WriteString(url.PathEscape(arg))
			}
			t = t[j+1:]
		}
		return b.String()
	}
	var b strings.Builder
	if !strings.HasPrefix(arg, "/") {
		b.WriteByte('/')
	}
	const hex = "0123456789ABCDEF"
	for i := 0; i < len(arg); i++ {
		c := arg[i]
		if c == '/' || c == '-' || c == '.' || c == '_' || c == '~' || ('0' <= c && c <= '9') || ('a' <= c && c <= 'z') || ('A' <= c && c <= 'Z') {
			b.WriteByte(c)
		} else {
			b.WriteByte('%')
			b.WriteByte(hex[c>>4])
			b.WriteByte(hex[c&15])
		}
	}
	return b.String()
}

// token keeps the bytes of s an HTTP token allows.
func token(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x7f && r > 0x20 && !strings.ContainsRune(`"(),/:;<=>?@[\]{}`, r) {
			return r
		}
		return -1
	}, s)
}

// headerValue keeps the bytes a header value may hold.
func headerValue(s string) string {
	return strings.Map(func(r rune) rune {
		if r == '\t' || (r >= 0x20 && r != 0x7f) {
			return r
		}
		return -1
	}, s)
}

// transportHeaders frame the request itself: net/http answers their
// misuse before the API sees it, so they are net/http's to test, not ours.
var transportHeaders = map[string]bool{"Host": true, "Content-Length": true, "Transfer-Encoding": true, "Connection": true,
	"Expect": true, "Upgrade": true, "Te": true, "Trailer": true, "Keep-Alive": true, "Proxy-Connection": true}

// FuzzAPI sends arbitrary methods, paths, headers, keys and bodies to
// every route of a real server on a real database, and checks what the
// contract promises whatever comes in: never a 5xx; every non-2xx answer
// is the envelope {"error":{"code","message"}} in valid JSON (a 429 with
// Retry-After); every 2xx body is valid JSON (but /openapi.yaml's YAML).
// Synchronous operations are asked with Prefer: respond-async (no worker
// runs: a wait would only spend the fuzzing time). The River UI's own
// handlers, behind basic auth with the admin key, answer in River's
// format; the fuzzer does not send basic auth.
//
// Its seeds run with every `go test`; `make fuzz` (part of `make test`)
// fuzzes it for FUZZTIME.
func FuzzAPI(f *testing.F) {
	type seed struct {
		method string
		route  uint8
		arg    string
		hname  string
		hvalue string
		key    uint8
		body   string
	}
	ft := newFuzzTarget(f)
	idx := func(tmpl string) uint8 {
		for i, t := range ft.templates {
			if t == tmpl {
				return uint8(i)
			}
		}
		f.Fatalf("no route %s", tmpl)
		return 0
	}
	raw := uint8(255)
	for _, s := range []seed{
		{"GET", idx("/health"), "", "", "", 0, ""},
		{"POST", idx("/engines/{user_id}/admit"), "alice", "Content-Type", "application/json", 1, `{"auto_provision":true,"auto_wake":true}`},
		{"POST", idx("/engines/{user_id}/admit"), "bob", "", "", 1, ``},
		{"POST", idx("/engines/provision"), "", "Content-Type", "application/json", 1, `{"user_id":"carol"}`},
		{"POST", idx("/engines/provision"), "", "Content-Type", "application/json", 1, `{"user_id":"dave","engine_version":"evil/image:1"}`},
		{"GET", idx("/engines/{user_id}"), "alice", "", "", 1, ""},
		{"DELETE", idx("/engines/{user_id}"), "alice", "", "", 1, ""},
		{"POST", idx("/engines/{user_id}/upgrade"), "alice", "", "", 1, `{"engine_version":"enginefleet/engine:2"}`},
		{"POST", idx("/engines/{user_id}/restore"), "alice", "", "", 1, `{"backup_id":"00000000-0000-0000-0000-000000000000"}`},
		{"GET", idx("/engines"), "", "", "", 1, ""},
		{"GET", idx("/audit"), "", "", "", 1, ""},
		{"GET", idx("/operations/{operation_id}"), "not-a-uuid", "", "", 1, ""},
		{"POST", idx("/products/register"), "", "Content-Type", "application/json", 2, `{"slug":"x1","display_name":"X"}`},
		{"PUT", idx("/products/{product_id}/policy"), "", "", "", 2, `{"policy":{"max_engines":1}}`},
		{"POST", idx("/products/{product_id}/rotate-platform-key"), "", "", "", 2, `{"overlap_seconds":5}`},
		{"POST", idx("/audit/exports"), "", "", "", 2, `{"from":"2020-01-01T00:00:00Z","to":"2020-01-02T00:00:00Z"}`},
		{"GET", idx("/products"), "", "", "", 3, ""},
		{"GET", idx("/engines"), "", "X-Platform-Key", "wrong", 4, ""},
		{"BREW", idx("/engines"), "", "", "", 1, ""},
		{"PATCH", idx("/engines/{user_id}"), "\x00\xff\"\u2028", "", "", 1, ""},
		{"GET", raw, "/nope/\x00/\xff/\"", "", "", 0, ""},
		{"GET", raw, "/engines/../products", "", "", 2, ""},
		{"POST", raw, "//engines//x/admit", "", "", 1, "{"},
		{"OPTIONS", idx("/engines"), "", "Origin", "https://evil.example", 0, ""},
		{"HEAD", idx("/openapi.yaml"), "", "", "", 0, ""},
		{"GET", idx("/openapi.yaml"), "", "Accept", "application/xml", 0, ""},
		{"GET", idx(api.AdminUIPath), "", "Authorization", "Basic YWRtaW46d3Jvbmc=", 0, ""},
		{"POST", idx("/engines/{user_id}/admit"), "a", "Content-Type", "text/plain", 1, "\xff\xfe"},
		{"GET", idx("/engines"), "", "X-Request-ID", "\"><script>", 1, ""},
		{"POST", idx("/products/register"), "", "Content-Type", "application/json", 2, `{"slug":"` + strings.Repeat("s", 300) + `"}`},
	} {
		f.Add(s.method, s.route, s.arg, s.hname, s.hvalue, s.key, []byte(s.body))
	}
	f.Fuzz(func(t *testing.T, method string, route uint8, arg, hname, hvalue string, key uint8, body []byte) {
		if method = token(method); method == "" {
			method = http.MethodGet
		}
		if method == http.MethodConnect {
			method = "CONNECTX" // CONNECT's request target is an authority, not a path
		}
		p := ft.path(route, arg)
		u, err := url.Parse(ft.base + p)
		if err != nil {
			t.Skip() // cannot be sent as a request target
		}
		req, err := http.NewRequest(method, u.String(), bytes.NewReader(body))
		if err != nil {
			t.Skip()
		}
		if name := http.CanonicalHeaderKey(token(hname)); name != "" && !transportHeaders[name] && !strings.HasPrefix(name, "Proxy-") {
			req.Header.Set(name, headerValue(hvalue))
		}
		switch key % 5 {
		case 1:
			req.Header.Set("X-Platform-Key", ft.key)
		case 2:
			req.Header.Set("X-Admin-Key", testAdminKey)
		case 3:
			req.Header.Set("X-Platform-Key", keys.Generate())
			req.Header.Set("X-Admin-Key", keys.Generate())
		case 4:
			req.Header.Set("X-Platform-Key", headerValue(hvalue))
		}
		req.Header.Set("Prefer", "respond-async")
		resp, err := ft.client.Do(req)
		if err != nil {
			t.Fatalf("%s %q: %v", method, p, err)
		}
		rawBody, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatalf("%s %q: reading the answer: %v", method, p, err)
		}
		what := method + " " + p
		switch {
		case resp.StatusCode >= 500:
			t.Fatalf("%s: %d %s", what, resp.StatusCode, rawBody)
		case method == http.MethodHead:
		case resp.StatusCode < 200 || resp.StatusCode >= 300:
			var env struct {
				Error *struct {
					Code    *string `json:"code"`
					Message *string `json:"message"`
				} `json:"error"`
			}
			if !json.Valid(rawBody) || json.Unmarshal(rawBody, &env) != nil || env.Error == nil || env.Error.Code == nil ||
				*env.Error.Code == "" || env.Error.Message == nil {
				t.Fatalf("%s: %d without the envelope: %q", what, resp.StatusCode, rawBody)
			}
			if resp.StatusCode == http.StatusTooManyRequests && resp.Header.Get("Retry-After") == "" {
				t.Fatalf("%s: 429 without Retry-After", what)
			}
		case strings.HasSuffix(u.Path, "/openapi.yaml") && route < uint8(len(ft.templates)) && ft.templates[route] == "/openapi.yaml":
		default:
			if !json.Valid(rawBody) {
				t.Fatalf("%s: %d with a body that is not JSON: %q", what, resp.StatusCode, rawBody)
			}
		}
	})
}
