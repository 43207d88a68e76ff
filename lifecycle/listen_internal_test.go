package lifecycle

import (
	"context"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/internal/testenv"
)

// A listener whose connection goes half-open (nothing closed, nothing
// delivered) notices by its ping and reconnects, instead of waiting for
// notifications forever.
func TestListenerReconnectsFromHalfOpen(t *testing.T) {
	t.Parallel()
	dbURL := testenv.DB(t)
	cfg, err := pgx.ParseConfig(dbURL)
	require.NoError(t, err)
	px := testenv.NewProxy(t, "tcp", net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port))))
	pool := testenv.Pool(t, px.URL(dbURL))
	connects := make(chan struct{}, 10)
	l := &Listener{pool: pool, log: testenv.Quiet(), handlers: map[string]func(string){"orch_ops": func(string) {}},
		onReconnect: []func(){func() { connects <- struct{}{} }}, pingEvery: 300 * time.Millisecond}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go l.run(ctx)
	select {
	case <-connects:
	case <-time.After(10 * time.Second):
		t.Fatal("listener never connected")
	}
	px.Stall()
	select {
	case <-connects:
	case <-time.After(20 * time.Second):
		t.Fatal("the listener did not notice its half-open connection")
	}
}
