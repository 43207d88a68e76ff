package lifecycle

import (
	"context"
	"log/slog"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/metrics"
	"github.com/enginefleet/orchestrator/schema"
)

// deniedAudit records admit denials (audit action admit_denied, metadata
// reason) at a cost that does not grow with the denials: a client looping
// over made-up user ids, or a product far over its rate limit, must not
// cost a goroutine and an insert per request.
//
// auditDenied only puts the denial on a bounded queue; when the queue is
// full the denial is dropped and counted
// (orchestrator_admit_denied_audit_dropped_total), never waited for. One
// writer per replica drains it and aggregates per product and reason in
// windows of deniedWindow (a minute):
//
//   - the first denial of a window is written at once (within a tick), as
//     the row it always was: its user_id, metadata {reason, count: 1};
//   - the others are counted, and when the window ends one row sums them
//     up: metadata {reason, count, sample_user_ids (up to
//     deniedSampleUsers distinct ids), window_start, window_seconds}, with
//     user_id set when they were all the same user. A window with nothing
//     to sum up writes nothing.
//
// So a product and reason cost at most two rows a minute, whatever the
// traffic; the sum of the counts is the number of denials (less any
// dropped, which the metric counts). Rows are written in one batch per
// tick, and what is pending is written when the replica stops.
type deniedAudit struct {
	pool    *pgxpool.Pool
	log     *slog.Logger
	metrics *metrics.Metrics
	queue   chan denial
	window  time.Duration
	tick    time.Duration
}

type denial struct {
	product orch.Product
	userID  string
	reason  string
	at      time.Time
}

const (
	deniedQueue       = 4096
	deniedWindow      = time.Minute
	deniedTick        = 250 * time.Millisecond
	deniedSampleUsers = 10
)

func newDeniedAudit(pool *pgxpool.Pool, log *slog.Logger, m *metrics.Metrics) *deniedAudit {
	return &deniedAudit{pool: pool, log: log, metrics: m, queue: make(chan denial, deniedQueue),
		window: deniedWindow, tick: deniedTick}
}

// add queues one denial (reason: an admit reason or an error code, written
// lower-case); it never blocks.
func (d *deniedAudit) add(p orch.Product, userID string, reason string) {
	select {
	case d.queue <- denial{product: p, userID: userID, reason: strings.ToLower(reason), at: time.Now()}:
	default:
		d.metrics.AdmitDeniedDropped()
	}
}

type deniedKey struct{ productID, reason string }

// deniedSum is one product and reason's open window.
type deniedSum struct {
	actor   string
	start   time.Time
	count   int // denials since the last row
	users   []string
	oneUser bool // every denial counted was users[0]'s
}

func (w *deniedSum) addUser(u string) {
	if w.count == 0 {
		w.users, w.oneUser = append(w.users[:0], u), true
	} else if u != w.users[0] {
		w.oneUser = false
	}
	w.count++
	for _, x := range w.users {
		if x == u {
			return
		}
	}
	if len(w.users) < deniedSampleUsers {
		w.users = append(w.users, u)
	}
}

// run drains the queue until ctx ends, then writes what is pending.
func (d *deniedAudit) run(ctx context.Context) {
	open := map[deniedKey]*deniedSum{}
	var pending []orch.AuditEntry
	var pendingDenials int
	t := time.NewTicker(d.tick)
	defer t.Stop()
	take := func(x denial) {
		k := deniedKey{x.product.ID, x.reason}
		w := open[k]
		if w == nil {
			open[k] = &deniedSum{actor: x.product.Slug, start: x.at}
			pending = append(pending, orch.AuditEntry{ProductID: x.product.ID, UserID: x.userID, Action: orch.ActionAdmitDenied,
				Actor: x.product.Slug, Metadata: map[string]any{"reason": x.reason, "count": 1}})
			pendingDenials++
			return
		}
		w.addUser(x.userID)
	}
	// sum closes the windows that ended by now (all of them when final).
	sum := func(now time.Time, final bool) {
		for k, w := range open {
			if !final && now.Sub(w.start) < d.window {
				continue
			}
			if w.count == 0 {
				delete(open, k)
				continue
			}
			e := orch.AuditEntry{ProductID: k.productID, Action: orch.ActionAdmitDenied, Actor: w.actor,
				Metadata: map[string]any{"reason": k.reason, "count": w.count, "sample_user_ids": append([]string(nil), w.users...),
					"window_start": w.start.UTC().Format(time.RFC3339Nano), "window_seconds": now.Sub(w.start).Seconds()}}
			if w.oneUser {
				e.UserID = w.users[0]
			}
			pending = append(pending, e)
			pendingDenials += w.count
			// The window goes on: a steady stream of denials costs one
			// row per window, not one per pause in it.
			*w = deniedSum{actor: w.actor, start: now, users: w.users[:0]}
		}
	}
	write := func() {
		if len(pending) == 0 {
			return
		}
		wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if err := schema.New(d.pool).InsertAudits(wctx, pending); err != nil {
			d.log.Warn("audit admit_denied", "rows", len(pending), "denials", pendingDenials, "error", err)
			for range pendingDenials {
				d.metrics.AdmitDeniedDropped()
			}
		}
		pending, pendingDenials = pending[:0], 0
	}
	for {
		select {
		case x := <-d.queue:
			take(x)
		case now := <-t.C:
			sum(now, false)
			write()
		case <-ctx.Done():
		drain:
			for {
				select {
				case x := <-d.queue:
					take(x)
				default:
					break drain
				}
			}
			sum(time.Now(), true)
			write()
			return
		}
	}
}
