package api_test

import (
	"encoding/json"
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// adminReq sends a request to the River UI, with basic auth when pass is set.
func adminReq(t *testing.T, method, url, pass string, headers map[string]string, body string) (*http.Response, string) {
	t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, r)
	require.NoError(t, err)
	if pass != "" {
		req.SetBasicAuth("admin", pass)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	res, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	return res, string(b)
}

// The River UI at /admin/jobs: 401 (with a basic-auth challenge) without
// the admin key as password, its page and API with it, job args hidden by
// default, and the UI's mutating calls refused cross-origin.
func TestAdminJobsUI(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "", testConfig())
	base := h.URL + "/admin/jobs"

	for name, pass := range map[string]string{"no credentials": "", "wrong password": "nope"} {
		res, body := adminReq(t, "GET", base+"/", pass, nil, "")
		require.Equal(t, http.StatusUnauthorized, res.StatusCode, name)
		require.Contains(t, res.Header.Get("WWW-Authenticate"), "Basic ", name)
		require.Contains(t, body, `"INVALID_ADMIN_KEY"`, name)
		require.NotContains(t, body, "<html", name)
	}
	res, _ := adminReq(t, "GET", base+"/api/jobs?state=available", "", map[string]string{"X-Admin-Key": testAdminKey}, "")
	require.Equal(t, http.StatusUnauthorized, res.StatusCode, "the UI takes basic auth, not the API header")

	res, body := adminReq(t, "GET", base, testAdminKey, nil, "") // redirected to base + "/"
	require.Equal(t, http.StatusOK, res.StatusCode)
	require.True(t, strings.HasPrefix(res.Header.Get("Content-Type"), "text/html"), res.Header.Get("Content-Type"))
	require.Contains(t, body, "<title>River</title>")
	require.Contains(t, body, `id="root"`)
	// Its assets are served under the prefix too.
	asset := regexp.MustCompile(`src="(/admin/jobs/assets/[^"]+\.js)"`).FindStringSubmatch(body)
	require.NotNil(t, asset, "script asset in %s", body)
	res, _ = adminReq(t, "GET", h.URL+asset[1], testAdminKey, nil, "")
	require.Equal(t, http.StatusOK, res.StatusCode)

	res, body = adminReq(t, "GET", base+"/api/features", testAdminKey, nil, "")
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	var features map[string]any
	require.NoError(t, json.Unmarshal([]byte(body), &features))
	require.Equal(t, true, features["job_list_hide_args_by_default"], "job args hidden by default: %s", body)

	// The UI's queries run against this River version's schema.
	for _, path := range []string{"/api/jobs?state=available&limit=20", "/api/queues", "/api/states"} {
		res, body = adminReq(t, "GET", base+path, testAdminKey, nil, "")
		require.Equal(t, http.StatusOK, res.StatusCode, "%s: %s", path, body)
	}

	// Remembered basic credentials ride along on cross-site requests:
	// mutating calls must come from this origin.
	cancel := `{"job_ids":["1"]}`
	res, body = adminReq(t, "POST", base+"/api/jobs/cancel", testAdminKey,
		map[string]string{"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}, cancel)
	require.Equal(t, http.StatusForbidden, res.StatusCode, body)
	res, body = adminReq(t, "POST", base+"/api/jobs/cancel", testAdminKey, map[string]string{"Sec-Fetch-Site": "same-origin"}, cancel)
	require.NotContains(t, []int{http.StatusUnauthorized, http.StatusForbidden}, res.StatusCode, body)
}
