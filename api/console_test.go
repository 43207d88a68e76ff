package api_test

import (
	"context"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

// The console is mounted on the API and its actions are the API's own
// operations (api/console.go): same checks, an operation by admin, a job.
func TestConsoleActionsAreOperations(t *testing.T) {
	h := newHarness(t, "", testConfig())
	ctx := context.Background()
	p, err := schema.New(h.Pool).InsertProduct(ctx, "acme", "Acme", orch.Policy{}, keys.Hash(keys.Generate()))
	require.NoError(t, err)
	_, err = h.Pool.Exec(ctx, `INSERT INTO engines (id, product_id, user_id, status, node, port, engine_version, engine_key_hash, engine_key_enc)
		VALUES (gen_random_uuid(), $1, 'u1', 'running', 'local', 20001, 'img', 'h', 't'),
		       (gen_random_uuid(), $1, 'u2', 'running', 'local', 20002, 'img', 'h', 't')`, p.ID)
	require.NoError(t, err)
	id := func(user string) string {
		e, err := schema.New(h.Pool).EngineByUser(ctx, p.ID, user)
		require.NoError(t, err)
		return e.ID
	}

	jar, err := cookiejar.New(nil)
	require.NoError(t, err)
	c := &http.Client{Jar: jar, Timeout: 30 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	send := func(method, path string, form url.Values) (int, string, string) {
		t.Helper()
		req, err := http.NewRequest(method, h.URL+path, strings.NewReader(form.Encode()))
		require.NoError(t, err)
		if method == http.MethodPost {
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		}
		res, err := c.Do(req)
		require.NoError(t, err)
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, string(b), res.Header.Get("Location")
	}
	status, _, _ := send(http.MethodPost, "/console/login", url.Values{"key": {testAdminKey}, "name": {"ops"}})
	require.Equal(t, http.StatusSeeOther, status)
	status, body, _ := send(http.MethodGet, "/console/engines/"+id("u1")+"/confirm?action=restart", nil)
	require.Equal(t, http.StatusOK, status, body)
	token := regexp.MustCompile(`name="csrf" value="([^"]+)"`).FindStringSubmatch(body)[1]
	act := func(user, action string) (int, string, string) {
		t.Helper()
		return send(http.MethodPost, "/console/engines/"+id(user)+"/actions", url.Values{"csrf": {token}, "action": {action}, "confirm": {user}})
	}
	lastOp := func(user string) (orch.Operation, schema.OpPayload) {
		t.Helper()
		e, err := schema.New(h.Pool).EngineByUser(ctx, p.ID, user)
		require.NoError(t, err)
		op, payload, err := schema.New(h.Pool).OperationByID(ctx, e.OperationID)
		require.NoError(t, err)
		return op, payload
	}

	status, body, loc := act("u1", "restart")
	require.Equal(t, http.StatusSeeOther, status, body)
	op, _ := lastOp("u1")
	require.Equal(t, orch.OpRestart, op.Kind)
	require.Equal(t, "admin", op.Actor)
	require.Equal(t, orch.OpPending, op.Status)
	require.Contains(t, loc, "?op="+op.ID)
	var jobs int
	require.NoError(t, h.Pool.QueryRow(ctx, `SELECT count(*) FROM river_job WHERE kind = 'engine_restart'`).Scan(&jobs))
	require.Equal(t, 1, jobs)

	// The same refusals as the HTTP API, shown with their codes.
	status, body, _ = act("u2", "start")
	require.Equal(t, http.StatusConflict, status)
	require.Contains(t, body, "ENGINE_ALREADY_RUNNING")
	status, body, _ = act("u1", "stop")
	require.Equal(t, http.StatusConflict, status)
	require.Contains(t, body, "OPERATION_IN_PROGRESS")

	status, body, _ = act("u2", "rotate_key")
	require.Equal(t, http.StatusSeeOther, status, body)
	op, payload := lastOp("u2")
	require.Equal(t, orch.OpRotateKey, op.Kind)
	require.NotEmpty(t, payload.KeyHash)
	require.NotEmpty(t, payload.KeyEnc)

	status, body, loc = act("u1", "destroy") // supersedes the restart
	require.Equal(t, http.StatusSeeOther, status, body)
	require.True(t, strings.HasPrefix(loc, "/console/operations/"), loc)
	e, err := schema.New(h.Pool).EngineByUser(ctx, p.ID, "u1")
	require.NoError(t, err)
	require.Equal(t, orch.StateDestroying, e.Status)

	status, body, _ = send(http.MethodPost, "/console/products/"+p.ID+"/policy", url.Values{"csrf": {token}, "max_engines": {"0"}, "rate_limit_rpm": {"60"}})
	require.Equal(t, http.StatusSeeOther, status, body)
	got, err := schema.New(h.Pool).GetProduct(ctx, p.ID)
	require.NoError(t, err)
	require.Equal(t, 0, *got.Policy.MaxEngines)
	require.Equal(t, 60, *got.Policy.RateLimitRPM)

	var actions []string
	rows, err := h.Pool.Query(ctx, `SELECT action || ':' || actor || ':' || coalesce(metadata->>'outcome', '') FROM audit_log ORDER BY id`)
	require.NoError(t, err)
	for rows.Next() {
		var s string
		require.NoError(t, rows.Scan(&s))
		actions = append(actions, s)
	}
	require.Equal(t, []string{"admin_request:admin:accepted", "admin_request:admin:refused", "admin_request:admin:refused",
		"admin_request:admin:accepted", "admin_request:admin:accepted", "policy_update:admin:", "admin_request:admin:accepted"}, actions)
}
