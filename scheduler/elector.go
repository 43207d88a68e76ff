package scheduler

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/enginefleet/orchestrator/schema"
)

// ErrNotLeader is what IsLeader answers on a replica that must not fire.
var ErrNotLeader = errors.New("scheduler: not the leader")

// Elector is gocron's distributed elector backed by a Postgres session
// advisory lock held on a dedicated connection (not from the pool: a
// pooled connection would be shared, recycled, and its session lock lost
// or leaked). The replica whose session holds the lock leads. A follower
// tries to take the lock every Poll; a leader checks its connection every
// Poll and steps down as soon as it fails. When a leader dies its session
// ends and Postgres releases the lock, so another replica leads within
// about one Poll (TCP keepalives bound how long a vanished client's
// session lingers). During the short overlap where an old leader has not
// yet noticed, both may fire: the scheduler's per-period unique jobs make
// that harmless.
type Elector struct {
	connCfg  *pgx.ConnConfig
	key      int64
	poll     time.Duration
	instance string
	log      *slog.Logger

	leader    atomic.Bool
	mu        sync.Mutex
	conn      *pgx.Conn
	onElected func(context.Context)
}

// NewElector builds an elector competing for lock key on connections made
// from connCfg (copied; its application_name names the instance).
func NewElector(connCfg *pgx.ConnConfig, key int64, instance string, poll time.Duration, log *slog.Logger) *Elector {
	c := connCfg.Copy()
	if c.RuntimeParams == nil {
		c.RuntimeParams = map[string]string{}
	}
	c.RuntimeParams["application_name"] = "orchestrator-scheduler:" + instance
	if c.ConnectTimeout == 0 || c.ConnectTimeout > 5*poll {
		c.ConnectTimeout = max(5*poll, time.Second)
	}
	return &Elector{connCfg: c, key: key, poll: poll, instance: instance, log: log}
}

// IsLeader implements gocron.Elector: nil when this replica leads.
func (e *Elector) IsLeader(context.Context) error {
	if e.leader.Load() {
		return nil
	}
	return ErrNotLeader
}

// Leader reports whether this replica leads now.
func (e *Elector) Leader() bool { return e.leader.Load() }

// Run competes for leadership until ctx ends, then releases the lock (so
// a graceful shutdown hands over at once) and closes the connection.
func (e *Elector) Run(ctx context.Context) {
	t := time.NewTicker(e.poll)
	defer t.Stop()
	for {
		e.step(ctx)
		select {
		case <-ctx.Done():
			e.resign()
			return
		case <-t.C:
		}
	}
}

func (e *Elector) step(ctx context.Context) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if ctx.Err() != nil {
		return
	}
	if e.conn == nil || e.conn.IsClosed() {
		cctx, cancel := context.WithTimeout(ctx, e.connCfg.ConnectTimeout)
		conn, err := pgx.ConnectConfig(cctx, e.connCfg)
		cancel()
		if err != nil {
			e.demote("connect", err)
			return
		}
		e.conn = conn
		// Let the server notice a vanished leader within ~10 s even when
		// no packet says goodbye, so its lock does not linger.
		kctx, cancel := context.WithTimeout(ctx, e.poll)
		if err := schema.New(conn).SessionKeepalives(kctx, 5, 2, 2); err != nil {
			e.log.Debug("scheduler keepalives", "error", err)
		}
		cancel()
	}
	qctx, cancel := context.WithTimeout(ctx, e.poll)
	defer cancel()
	q := schema.New(e.conn)
	if e.leader.Load() {
		if err := q.Ping(qctx); err != nil {
			e.demote("leader connection lost", err)
		}
		return
	}
	got, err := q.TryLeaderLock(qctx, e.key)
	if err != nil {
		e.demote("try lock", err)
		return
	}
	if got {
		e.leader.Store(true)
		e.log.Info("scheduler leader elected", "instance", e.instance)
		if e.onElected != nil {
			e.onElected(ctx)
		}
	}
}

// demote steps down (if leading) and drops the connection: the session,
// and with it any lock it held, ends.
func (e *Elector) demote(why string, err error) {
	if e.leader.Swap(false) {
		e.log.Warn("scheduler leadership lost", "instance", e.instance, "why", why, "error", err)
	} else {
		e.log.Debug("scheduler election", "instance", e.instance, "why", why, "error", err)
	}
	if e.conn != nil {
		cctx, cancel := context.WithTimeout(context.Background(), time.Second)
		e.conn.Close(cctx) //nolint:errcheck
		cancel()
		e.conn = nil
	}
}

// resign releases the lock and closes the connection.
func (e *Elector) resign() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.conn == nil {
		e.leader.Store(false)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if e.leader.Swap(false) {
		schema.New(e.conn).ReleaseLeaderLock(ctx, e.key) //nolint:errcheck
		e.log.Info("scheduler leadership released", "instance", e.instance)
	}
	e.conn.Close(ctx) //nolint:errcheck
	e.conn = nil
}
