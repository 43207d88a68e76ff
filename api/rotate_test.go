package api_test

import (
	"net/http"
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
