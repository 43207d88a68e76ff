package api_test

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// The envelope written outside huma (unknown routes, 405s) is valid JSON
// whatever the path holds: control bytes, invalid UTF-8, quotes,
// backslashes, U+2028.
func TestEnvelopeIsValidJSONForAnyPath(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", testConfig())
	for _, tc := range []struct{ path, want string }{
		{"/nope%00here", "/nope\x00here"},
		{"/nope%01%1f%7f", "/nope\x01\x1f\x7f"},
		{"/nope%ff%fe", "/nope\ufffd\ufffd"}, // invalid UTF-8 comes back replaced
		{"/nope%22quoted%22", `/nope"quoted"`},
		{"/nope%5C%5Cback", `/nope\\back`},
		{"/nope%E2%80%A8%E2%80%A9", "/nope\u2028\u2029"},
		{"/nope%3Cscript%3E", "/nope<script>"},
	} {
		for _, method := range []string{"GET", "PUT"} {
			req, err := http.NewRequest(method, h.URL+tc.path, nil)
			require.NoError(t, err)
			resp, err := http.DefaultClient.Do(req)
			require.NoError(t, err)
			raw, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			require.NoError(t, err)
			require.Equal(t, http.StatusNotFound, resp.StatusCode, "%s %s", method, tc.path)
			require.True(t, json.Valid(raw), "%s %s: invalid JSON %q", method, tc.path, raw)
			require.NotContains(t, string(raw), "\u2028", "U+2028 is escaped (it ends a line in JavaScript)")
			var body struct {
				Error struct{ Code, Message string } `json:"error"`
			}
			require.NoError(t, json.Unmarshal(raw, &body))
			require.Equal(t, "NOT_FOUND", body.Error.Code)
			require.True(t, strings.HasSuffix(body.Error.Message, method+" "+tc.want), "%q", body.Error.Message)
		}
	}
}

// A path that is not clean is answered NOT_FOUND in the envelope, not
// redirected (with an HTML body, and a GET the client would send next
// whatever its method).
func TestUncleanPathEnvelope(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", testConfig())
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	for _, p := range []string{"//engines", "/engines/../products", "/engines/./x/admit", "/a//b", "/engines/%2e%2e/products"} {
		req, err := http.NewRequest("POST", h.URL+p, strings.NewReader(`{}`))
		require.NoError(t, err)
		resp, err := client.Do(req)
		require.NoError(t, err)
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		require.Equal(t, http.StatusNotFound, resp.StatusCode, "%s: %s", p, raw)
		require.Empty(t, resp.Header.Get("Location"))
		var body struct {
			Error struct{ Code string } `json:"error"`
		}
		require.NoError(t, json.Unmarshal(raw, &body), "%s: %q", p, raw)
		require.Equal(t, "NOT_FOUND", body.Error.Code)
	}
}
