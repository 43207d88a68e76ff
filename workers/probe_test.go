package workers

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A probe's error text is what products see in audit rows: stable words,
// never the probe URL or an address of the orchestrator's network.
func TestProbeErrorsArePublic(t *testing.T) {
	t.Parallel()
	answer := func(status int, body string) string {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(status)
			w.Write([]byte(body)) //nolint:errcheck
		}))
		t.Cleanup(srv.Close)
		return srv.URL + "/health"
	}
	hang := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }))
	t.Cleanup(hang.Close)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	closed := "http://" + ln.Addr().String() + "/health"
	ln.Close()

	c := &http.Client{Timeout: 300 * time.Millisecond}
	require.NoError(t, Probe(context.Background(), c, answer(200, `{"status":"ok"}`)))
	for url, want := range map[string]string{
		answer(503, `{"status":"starting"}`): "probe: HTTP 503",
		answer(200, `nope`):                  "probe: answer is not JSON",
		answer(200, `{"status":"degraded"}`): `probe: status "degraded"`,
		hang.URL + "/health":                 "probe: timed out",
		closed:                               "probe: connection refused",
	} {
		err := Probe(context.Background(), c, url)
		require.Error(t, err, url)
		assert.Equal(t, want, err.Error())
		assert.NotContains(t, err.Error(), "127.0.0.1")
	}
}
