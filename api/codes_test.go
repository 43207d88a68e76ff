package api_test

import (
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/danielgtaylor/huma/v2"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
)

type undocumented struct {
	mu  sync.Mutex
	got []string
}

func (u *undocumented) report(op string, status int, code string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.got = append(u.got, op+" "+http.StatusText(status)+" "+code)
}

func (u *undocumented) list() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]string(nil), u.got...)
}

// The run-time check catches a handler answering a code its operation
// does not document: with ENGINE_NOT_FOUND taken out of get-engine's
// documented answers, a GET of a missing engine is reported (and fails the
// test that provoked it, as newHarness wires it everywhere else).
func TestUndocumentedErrorIsCaught(t *testing.T) {
	t.Parallel()
	var u undocumented
	cfg := testConfig()
	cfg.UndocumentedError = u.report
	h := newHarness(t, "", cfg)
	_, key := h.register("drift", nil)

	status, body, _ := h.do("GET", "/engines/ghost", nil, platform(key))
	require.Equal(t, http.StatusNotFound, status)
	require.Equal(t, "ENGINE_NOT_FOUND", errCode(body))
	require.Empty(t, u.list(), "a documented code is not reported")

	h.Server.Undocument("get-engine", http.StatusNotFound, orch.CodeEngineNotFound)
	h.do("GET", "/engines/ghost", nil, platform(key))
	require.Equal(t, []string{"get-engine Not Found ENGINE_NOT_FOUND"}, u.list())

	// A status the operation does not list at all is caught too.
	h.Server.Undocument("list-engines", http.StatusBadRequest, orch.CodeInvalidRequest)
	status, _, _ = h.do("GET", "/engines?limit=0", nil, platform(key))
	require.Equal(t, http.StatusBadRequest, status)
	require.Contains(t, u.list(), "list-engines Bad Request INVALID_REQUEST")
}

// Every operation's error paths that need no engine: no key, a wrong key,
// an invalid user_id, a malformed body, a body too large, and the ones
// about a missing engine, product, operation, backup or export. Each
// answer must be one openapi.yaml documents for the operation (newHarness
// fails the test otherwise) and every operation is driven.
func TestEveryOperationsErrorPathsAreDocumented(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.AuthFailuresPerSecond = -1 // the throttle's 429 has its own tests
	h := newHarness(t, "", cfg)
	_, key := h.register("paths", nil)
	doc := h.Server.API().OpenAPI()
	driven := map[string]bool{}
	fill := func(path string) string {
		r := strings.NewReplacer("{user_id}", "ghost", "{product_id}", "00000000-0000-0000-0000-000000000000",
			"{operation_id}", "00000000-0000-0000-0000-000000000000", "{export_id}", "00000000-0000-0000-0000-000000000000")
		return r.Replace(path)
	}
	for path, item := range doc.Paths {
		for method, op := range map[string]*huma.Operation{"GET": item.Get, "POST": item.Post, "PUT": item.Put, "DELETE": item.Delete} {
			if op == nil {
				continue
			}
			driven[op.OperationID] = true
			p := fill(path)
			async := map[string]string{"Prefer": "respond-async"}
			var good map[string]string
			switch {
			case len(op.Security) == 0:
			case hasKey(op.Security[0], "platformKey"):
				good = platform(key)
			default:
				good = admin()
			}
			if good != nil {
				status, body, _ := h.do(method, p, nil, nil)
				require.Equal(t, http.StatusUnauthorized, status, "%s %s without a key", method, path)
				require.Contains(t, []string{"INVALID_ADMIN_KEY", "INVALID_PLATFORM_KEY"}, errCode(body))
				h.do(method, p, nil, map[string]string{"X-Platform-Key": "wrong", "X-Admin-Key": "wrong"})
			}
			withGood := func(extra map[string]string) map[string]string {
				m := map[string]string{}
				for k, v := range good {
					m[k] = v
				}
				for k, v := range extra {
					m[k] = v
				}
				return m
			}
			if strings.Contains(path, "{user_id}") {
				status, body, _ := h.do(method, strings.Replace(path, "{user_id}", "a%20b", 1), nil, withGood(nil))
				require.Equal(t, http.StatusBadRequest, status, "%s %s", method, path)
				require.Equal(t, "INVALID_REQUEST", errCode(body))
			}
			if op.RequestBody != nil {
				status, _, _ := h.do(method, p, `{"broken`, withGood(nil))
				require.Equal(t, http.StatusBadRequest, status, "%s %s with broken JSON", method, path)
				status, _, _ = h.do(method, p, `{"x":"`+strings.Repeat("a", 1<<20+10)+`"}`, withGood(nil))
				require.Equal(t, http.StatusRequestEntityTooLarge, status, "%s %s with a body too large", method, path)
			}
			// The missing thing: a user without an engine, an unknown id.
			var body any
			switch op.OperationID {
			case "restore-backup":
				body = map[string]any{"backup_id": "00000000-0000-0000-0000-000000000000"}
			case "upgrade-engine":
				body = map[string]any{"engine_version": "enginefleet/engine:test"}
			case "update-product-policy":
				body = map[string]any{"policy": map[string]any{}}
			case "rotate-platform-key", "create-audit-export", "register-product", "provision-engine", "admit-engine":
				continue // they create things: driven by their own tests
			}
			h.do(method, p, body, withGood(async))
		}
	}
	for _, op := range []string{"get-engine", "start-engine", "stop-engine", "restart-engine", "destroy-engine", "rotate-engine-key",
		"upgrade-engine", "get-operation", "list-backups", "take-backup", "restore-backup", "list-audit", "create-audit-export",
		"list-audit-exports", "get-audit-export", "register-product", "list-products", "get-product", "update-product-policy",
		"rotate-platform-key", "provision-engine", "admit-engine", "list-engines", "fleet-status", "fleet-metrics", "health"} {
		require.True(t, driven[op], "%s is in the document", op)
	}
}

func hasKey(m map[string][]string, k string) bool { _, ok := m[k]; return ok }
