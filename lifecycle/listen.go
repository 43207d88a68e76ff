package lifecycle

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Listener holds one connection per process LISTENing on the
// orchestrator's channels and dispatches payloads. Each time LISTEN is
// (re)established it calls every onReconnect, because notifications sent
// while it was not listening are lost.
type Listener struct {
	pool        *pgxpool.Pool
	log         *slog.Logger
	handlers    map[string]func(payload string)
	onReconnect []func()
	ready       chan struct{} // closed once listening the first time (tests)
	pingEvery   time.Duration // 0 = listenerPing
}

func (l *Listener) run(ctx context.Context) {
	backoff := 100 * time.Millisecond
	first := true
	for ctx.Err() == nil {
		err := l.listenOnce(ctx, first)
		if ctx.Err() != nil {
			return
		}
		first = false
		l.log.Warn("notify listener lost its connection; reconnecting", "error", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

func (l *Listener) listenOnce(ctx context.Context, first bool) error {
	conn, err := l.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	// The connection carries LISTEN state: never hand it back to the pool.
	defer func() {
		c := conn.Hijack()
		c.Close(context.Background()) //nolint:errcheck
	}()
	for ch := range l.handlers {
		if _, err := conn.Exec(ctx, `LISTEN "`+ch+`"`); err != nil {
			return err
		}
	}
	// Also on the first connect: whatever was cached before LISTEN took
	// effect (requests are served before it does) may have missed a NOTIFY.
	for _, f := range l.onReconnect {
		f()
	}
	if first && l.ready != nil {
		close(l.ready)
	}
	every := l.pingEvery
	if every == 0 {
		every = listenerPing
	}
	for {
		wctx, cancel := context.WithTimeout(ctx, every)
		n, err := conn.Conn().WaitForNotification(wctx)
		cancel()
		if err != nil && ctx.Err() == nil && wctx.Err() != nil {
			// Quiet for a while: make sure the connection still answers.
			// A half-open one (the server or a middlebox gone without a
			// FIN) would otherwise wait forever while NOTIFYs are lost.
			pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err = conn.Ping(pctx)
			cancel()
			if err != nil {
				return fmt.Errorf("listener ping: %w", err)
			}
			continue
		}
		if err != nil {
			return err
		}
		if h := l.handlers[n.Channel]; h != nil {
			h(n.Payload)
		}
	}
}

// listenerPing is how long the listener waits for a notification before
// it pings its connection.
const listenerPing = 15 * time.Second

// waiters lets requests sleep until an operation changes, woken by NOTIFY.
type waiters struct {
	mu sync.Mutex
	m  map[string]map[chan struct{}]struct{}
}

func newWaiters() *waiters { return &waiters{m: map[string]map[chan struct{}]struct{}{}} }

// subscribe returns a channel signalled on every change of key, and a cancel.
func (w *waiters) subscribe(key string) (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	w.mu.Lock()
	if w.m[key] == nil {
		w.m[key] = map[chan struct{}]struct{}{}
	}
	w.m[key][ch] = struct{}{}
	w.mu.Unlock()
	return ch, func() {
		w.mu.Lock()
		delete(w.m[key], ch)
		if len(w.m[key]) == 0 {
			delete(w.m, key)
		}
		w.mu.Unlock()
	}
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func (w *waiters) wake(key string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for ch := range w.m[key] {
		signal(ch)
	}
}

func (w *waiters) wakeAll() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, set := range w.m {
		for ch := range set {
			signal(ch)
		}
	}
}
