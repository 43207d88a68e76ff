package e2e_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
)

// A host port something else holds (here a plain listener on 127.0.0.1,
// standing for another program or a container this database does not
// know) does not fail the provision: the engine moves to the next free
// port, the refused one is recorded in port_blocks with why, the next
// provision skips it without trying, and once the block expires the port
// is handed out again.
func TestRefusedHostPortIsSkipped(t *testing.T) {
	t.Parallel()
	for _, backend := range []string{"subprocess", "docker"} {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			f := newFleet(t, fleetOpts{backend: backend, ports: 6})
			ctx := context.Background()
			ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", f.PortMin)) // the port the allocator picks first
			require.NoError(t, err)
			_, key := f.product("acme", orch.Policy{})
			portOf := func(user string) (int, string) {
				r := f.call("POST", "/engines/provision", key, map[string]any{"user_id": user})
				require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
				u, err := url.Parse(r.str("url"))
				require.NoError(t, err)
				p, err := strconv.Atoi(u.Port())
				require.NoError(t, err)
				require.Equal(t, http.StatusOK, engineCall(t, "GET", r.str("url")+"/health", "", nil).Status)
				return p, r.str("engine_id")
			}

			port, id := portOf("pat")
			require.Equal(t, f.PortMin+1, port, "moved to the next free port")
			var reason string
			var until time.Time
			require.NoError(t, f.Pool.QueryRow(ctx, `SELECT reason, blocked_until FROM port_blocks WHERE node = $1 AND port = $2`,
				f.Node, f.PortMin).Scan(&reason, &until))
			require.NotEmpty(t, reason)
			require.True(t, until.After(time.Now()), "blocked for a while")
			var from, to int
			require.NoError(t, f.Pool.QueryRow(ctx, `SELECT (metadata->>'from_port')::int, (metadata->>'to_port')::int FROM audit_log
				WHERE engine_id = $1 AND action = 'reconcile' AND metadata->>'repair' = 'port_moved'`, id).Scan(&from, &to))
			require.Equal(t, []int{f.PortMin, f.PortMin + 1}, []int{from, to})

			// The block holds: the next engine gets the next port at once.
			port, id = portOf("quinn")
			require.Equal(t, f.PortMin+2, port)
			require.NotContains(t, f.auditActions(id), "reconcile", "no second move")

			// The other program is gone and the block expires: the port
			// comes back.
			ln.Close()
			_, err = f.Pool.Exec(ctx, `UPDATE port_blocks SET blocked_until = now() - interval '1 second' WHERE node = $1`, f.Node)
			require.NoError(t, err)
			port, _ = portOf("ray")
			require.Equal(t, f.PortMin, port)
		})
	}
}
