package e2e_test

import (
	"bytes"
	"io"
	"net/http"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/pb33f/libopenapi"
	validator "github.com/pb33f/libopenapi-validator"
	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/internal/testenv"
)

// validating checks every request and response against openapi.yaml.
type validating struct {
	v    validator.Validator
	mu   sync.Mutex
	errs []string
	n    int
}

func (vt *validating) RoundTrip(req *http.Request) (*http.Response, error) {
	var body []byte
	if req.Body != nil {
		body, _ = io.ReadAll(req.Body)
		req.Body = io.NopCloser(bytes.NewReader(body))
	}
	res, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		return res, err
	}
	raw, _ := io.ReadAll(res.Body)
	res.Body = io.NopCloser(bytes.NewReader(raw))
	check := req.Clone(req.Context())
	check.Body = io.NopCloser(bytes.NewReader(body))
	resCopy := *res
	resCopy.Body = io.NopCloser(bytes.NewReader(raw))
	ok, verrs := vt.v.ValidateHttpRequestResponse(check, &resCopy)
	vt.mu.Lock()
	vt.n++
	if !ok {
		for _, e := range verrs {
			vt.errs = append(vt.errs, req.Method+" "+req.URL.Path+" → "+res.Status+": "+e.Message+": "+e.Reason)
		}
	}
	vt.mu.Unlock()
	return res, nil
}

// Every request and response of the contract flow (and of the error
// paths) matches openapi.yaml: the document describes what the server does.
func TestResponsesMatchOpenAPI(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile(testenv.RepoRoot(t) + "/openapi.yaml")
	require.NoError(t, err)
	doc, err := libopenapi.NewDocument(raw)
	require.NoError(t, err)
	v, errs := validator.NewValidator(doc)
	require.Empty(t, errs)
	vt := &validating{v: v}

	f := newFleet(t, fleetOpts{})
	f.client = &http.Client{Transport: vt}
	contractFlow(t, f, "enginefleet/engine:e2e-2")
	_, key := f.product("other", orchPolicy())
	f.call("GET", "/engines/ghost", key, nil)
	f.call("POST", "/engines/provision", key, map[string]any{"user_id": "a b"})
	f.call("GET", "/status", key, nil)
	f.call("GET", "/metrics", key, nil)
	f.call("GET", "/engines", "bad-key", nil)
	// 202s (Prefer: respond-async) are documented too.
	r := f.call("POST", "/engines/provision", key, map[string]any{"user_id": "later"}, "Prefer", "respond-async")
	require.Equal(t, http.StatusAccepted, r.Status, "%v", r.Body)
	require.Eventually(t, func() bool {
		return f.call("GET", "/operations/"+r.str("operation_id"), key, nil).str("status") == "succeeded"
	}, 30*time.Second, 50*time.Millisecond)
	require.Equal(t, http.StatusAccepted, f.call("POST", "/engines/later/stop", key, nil, "Prefer", "respond-async").Status)
	for _, e := range vt.errs {
		t.Error(e)
	}
	require.GreaterOrEqual(t, vt.n, 20)
}
