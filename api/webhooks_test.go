package api_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/schema"
)

func TestWebhookRoutes(t *testing.T) {
	h := newHarness(t, "", testConfig())
	pid, key := h.register("hooks", nil)
	_, otherKey := h.register("other", nil)

	// Refused destinations: private, link-local, loopback (not allowed
	// by this operator), plain http to a public host, credentials.
	for _, u := range []string{"https://10.1.2.3/x", "https://169.254.169.254/latest", "http://127.0.0.1:9/x",
		"https://[::1]/x", "http://hooks.example.com/x", "https://user:pw@hooks.example.com/x", "ftp://hooks.example.com", "hooks"} {
		status, out, _ := h.do("POST", "/webhooks", map[string]any{"url": u}, platform(key))
		require.Equal(t, http.StatusBadRequest, status, "%s: %v", u, out)
		require.Equal(t, "INVALID_REQUEST", errCode(out), u)
	}
	status, out, _ := h.do("POST", "/webhooks", map[string]any{"url": "https://hooks.example.com/x", "event_types": []string{"engine.exploded"}}, platform(key))
	require.Equal(t, http.StatusBadRequest, status, "%v", out)

	status, out, _ = h.do("POST", "/webhooks", map[string]any{"url": "https://hooks.example.com/x",
		"description": "prod", "event_types": []string{"engine.crashed", "backup.failed"}}, platform(key))
	require.Equal(t, http.StatusCreated, status, "%v", out)
	id := out["webhook_id"].(string)
	secret := out["secret"].(string)
	require.Regexp(t, `^whsec_[A-Za-z0-9_-]{43}$`, secret)
	require.Equal(t, "active", out["status"])
	require.Equal(t, []any{"engine.crashed", "backup.failed"}, out["event_types"])

	// The secret is stored encrypted, never in clear, and never shown again.
	var enc string
	require.NoError(t, h.Pool.QueryRow(context.Background(), `SELECT secret_enc FROM webhook_endpoints WHERE id = $1`, id).Scan(&enc))
	require.NotContains(t, enc, secret[6:])
	got, err := h.Keyring.Decrypt(enc)
	require.NoError(t, err)
	require.Equal(t, secret, got)
	status, out, _ = h.do("GET", "/webhooks/"+id, nil, platform(key))
	require.Equal(t, http.StatusOK, status)
	require.NotContains(t, out, "secret")
	status, out, _ = h.do("GET", "/webhooks", nil, platform(key))
	require.Equal(t, http.StatusOK, status)
	require.Len(t, out["webhooks"], 1)

	// Another product sees none of it.
	status, out, _ = h.do("GET", "/webhooks/"+id, nil, platform(otherKey))
	require.Equal(t, http.StatusNotFound, status)
	require.Equal(t, "WEBHOOK_NOT_FOUND", errCode(out))
	status, out, _ = h.do("GET", "/webhooks", nil, platform(otherKey))
	require.Equal(t, http.StatusOK, status)
	require.Empty(t, out["webhooks"])
	status, _, _ = h.do("DELETE", "/webhooks/"+id, nil, platform(otherKey))
	require.Equal(t, http.StatusNotFound, status)

	// Rotation: a new secret, the previous one signs alongside until the overlap ends.
	status, out, _ = h.do("POST", "/webhooks/"+id+"/rotate-secret", map[string]any{"overlap_seconds": 3600}, platform(key))
	require.Equal(t, http.StatusOK, status, "%v", out)
	require.NotEqual(t, secret, out["secret"])
	exp, err := time.Parse(time.RFC3339, out["previous_secret_expires_at"].(string))
	require.NoError(t, err)
	require.WithinDuration(t, time.Now().Add(time.Hour), exp, time.Minute)

	// The delivery log: an audit row makes a delivery (no worker runs
	// here, so it stays pending); redeliver makes another of the same event.
	engine := uuid.NewString()
	require.NoError(t, schema.New(h.Pool).InsertAudit(context.Background(), orch.AuditEntry{ProductID: pid, UserID: "u1",
		EngineID: engine, Action: orch.ActionHealthFailed, Actor: orch.ActorSystem, Metadata: map[string]any{"reason": "crash"}}))
	status, out, _ = h.do("GET", "/webhooks/"+id+"/deliveries", nil, platform(key))
	require.Equal(t, http.StatusOK, status, "%v", out)
	ds := out["deliveries"].([]any)
	require.Len(t, ds, 1)
	d := ds[0].(map[string]any)
	require.Equal(t, "engine.crashed", d["event_type"])
	require.Equal(t, "pending", d["state"])
	status, out, _ = h.do("POST", "/webhooks/"+id+"/deliveries/"+d["delivery_id"].(string)+"/redeliver", nil, platform(key))
	require.Equal(t, http.StatusAccepted, status, "%v", out)
	require.Equal(t, d["event_id"], out["event_id"])
	require.Equal(t, d["delivery_id"], out["redelivery_of"])
	status, out, _ = h.do("GET", "/webhooks/"+id+"/deliveries?state=pending", nil, platform(key))
	require.Equal(t, http.StatusOK, status)
	require.Len(t, out["deliveries"], 2)
	status, out, _ = h.do("POST", "/webhooks/"+id+"/deliveries/"+uuid.NewString()+"/redeliver", nil, platform(key))
	require.Equal(t, http.StatusNotFound, status)
	require.Equal(t, "DELIVERY_NOT_FOUND", errCode(out))

	status, _, _ = h.do("DELETE", "/webhooks/"+id, nil, platform(key))
	require.Equal(t, http.StatusNoContent, status)
	status, _, _ = h.do("GET", "/webhooks/"+id, nil, platform(key))
	require.Equal(t, http.StatusNotFound, status)

	// At most ten endpoints.
	for i := 0; i < 10; i++ {
		status, out, _ = h.do("POST", "/webhooks", map[string]any{"url": "https://hooks.example.com/x"}, platform(key))
		require.Equal(t, http.StatusCreated, status, "%v", out)
	}
	status, out, _ = h.do("POST", "/webhooks", map[string]any{"url": "https://hooks.example.com/x"}, platform(key))
	require.Equal(t, http.StatusTooManyRequests, status)
	require.Equal(t, "QUOTA_EXCEEDED", errCode(out))
}
