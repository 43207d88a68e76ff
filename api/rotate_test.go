package api_test

import (
	"net/http"
	"net/url"
	"testing"

	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

// Two asynchronous rotations of one engine join into one operation, and
// both callers get the key that operation puts in force (not a key of
// their own that is never stored).
func TestAsyncRotateKeyJoinAnswersTheKeyInForce(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", testConfig())
	pid, key := h.register("acme", nil)
	h.insertEngine(pid, "ann", 20001, orch.StateRunning)
	hdr := platform(key)
	hdr["Prefer"] = "respond-async"

	var ops, got []string
	for range 3 {
		status, body, _ := h.do("POST", "/engines/ann/rotate-key", nil, hdr)
		require.Equal(t, http.StatusAccepted, status, "%v", body)
		ops = append(ops, body["operation_id"].(string))
		got = append(got, body["api_key"].(string))
	}
	require.Equal(t, ops[0], ops[1], "joined")
	require.Equal(t, ops[0], ops[2], "joined")
	require.Equal(t, got[0], got[1])
	require.Equal(t, got[0], got[2])

	_, p, err := schema.New(h.Pool).OperationByID(t.Context(), ops[0])
	require.NoError(t, err)
	require.Equal(t, keys.Hash(got[0]), p.KeyHash, "the key answered is the one the operation puts in force")
}

// A product may only ask for images ORCH_ENGINE_IMAGE_ALLOWLIST allows
// (default: pinned tags of the default image's repository): engines run
// with the operator's passthrough secrets.
func TestEngineVersionAllowlist(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", testConfig())
	pid, key := h.register("acme", nil)
	h.insertEngine(pid, "ann", 20001, orch.StateRunning)
	async := platform(key)
	async["Prefer"] = "respond-async"
	for _, img := range []string{"evil/engine:1", "enginefleet/engine", "/bin/sh", "enginefleet/engine-x:1"} {
		status, body, _ := h.do("POST", "/engines/provision", map[string]any{"user_id": "bob", "engine_version": img}, async)
		require.Equal(t, http.StatusBadRequest, status, "%s: %v", img, body)
		require.Equal(t, "INVALID_REQUEST", body["error"].(map[string]any)["code"])
		status, body, _ = h.do("POST", "/engines/ann/upgrade", map[string]any{"engine_version": img}, async)
		require.Equal(t, http.StatusBadRequest, status, "%s: %v", img, body)
	}
	var n int
	require.NoError(t, h.Pool.QueryRow(t.Context(), `SELECT count(*) FROM engines WHERE user_id = 'bob'`).Scan(&n))
	require.Zero(t, n, "nothing written for a refused image")

	status, body, _ := h.do("POST", "/engines/provision", map[string]any{"user_id": "bob", "engine_version": "enginefleet/engine:2.0"}, async)
	require.Equal(t, http.StatusAccepted, status, "%v", body)
	status, body, _ = h.do("POST", "/engines/ann/upgrade", map[string]any{"engine_version": "enginefleet/engine@sha256:0123"}, async)
	require.Equal(t, http.StatusAccepted, status, "%v", body)
}

// Real-world user ids (an Auth0 subject, a tagged e-mail address) work on
// every route, escaped or not.
func TestUserIDsWithPunctuation(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", testConfig())
	pid, key := h.register("acme", nil)
	for i, id := range []string{"auth0|5f7c8ec7c33c6c004bbafe82", "ann+work@example.com"} {
		h.insertEngine(pid, id, 20001+i, orch.StateRunning)
		for _, path := range []string{"/engines/" + id, "/engines/" + url.PathEscape(id)} {
			status, body, _ := h.do("GET", path, nil, platform(key))
			require.Equal(t, http.StatusOK, status, "%s: %v", path, body)
			require.Equal(t, id, body["user_id"])
		}
	}
}
