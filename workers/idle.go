package workers

import (
	"context"
	"errors"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/lifecycle"
	"github.com/enginefleet/orchestrator/schema"
)

// Idle sleep. "Activity" is the last admit (api touch(), at most
// one write per engine per minute) or the last state change, so an engine
// just woken, started or restarted gets a whole idle period. The idle sweep, every minute, puts
// running engines idle for IdleConfig.After to sleep, recording why and when
// (sleep_reason, slept_at) and auditing sleep with the idle time:
//
//   - mark mode: one UPDATE per batch flips the rows to sleeping; the
//     containers keep running, so a wake is only a health check;
//   - stop mode: each engine gets a "system" stop operation whose
//     engine_stop job (Sleep) stops the container to free its memory and
//     ends in sleeping; a wake starts it again and waits for health.
//
// Wake is admit with auto_wake or start (the engine_start job, audited
// wake with the time it slept). Sleeping engines are not health-probed.

// IdleConfig configures idle sleep.
type IdleConfig struct {
	After time.Duration // idle time before sleep (0 = never)
	Mode  string        // SleepMark (default) or SleepStop
}

func (c IdleConfig) withDefaults() IdleConfig {
	if c.Mode == "" {
		c.Mode = SleepMark
	}
	return c
}

// sleepingRuns reports whether a sleeping engine keeps running (mark
// mode): restore and converge bring such an engine back running.
func (c IdleConfig) sleepingRuns() bool { return c.Mode != SleepStop }

// Sleep modes (ORCH_SLEEP_MODE).
const (
	SleepMark = "mark" // the container keeps running; only the row says sleeping
	SleepStop = "stop" // the container is stopped to free memory; wake starts it
)

// Idle puts idle engines to sleep; waking is the start job's.
type Idle struct {
	*runner
	cfg IdleConfig
}

func (d *Idle) register(ws *river.Workers) { river.AddWorker(ws, &idleSweepWorker{d: d}) }

// idleReason is the sleep_reason of engines put to sleep by the sweep.
const idleReason = "idle"

// idleBatch is how many idle engines one sweep step handles.
const idleBatch = 500

type idleSweepWorker struct {
	river.WorkerDefaults[jobs.IdleSweep]
	d *Idle
}

func (s *idleSweepWorker) Timeout(*river.Job[jobs.IdleSweep]) time.Duration { return 5 * time.Minute }

func (s *idleSweepWorker) Work(ctx context.Context, j *river.Job[jobs.IdleSweep]) error {
	start := time.Now()
	n, err := s.d.Sweep(ctx, river.ClientFromContext[pgx.Tx](ctx))
	attrs := []any{"job_kind", j.Kind, "slept", n, "mode", s.d.cfg.Mode, "duration_ms", time.Since(start).Milliseconds()}
	if err != nil {
		s.d.log.Warn("job", append(attrs, "error", err.Error())...)
		return err
	}
	s.d.log.Debug("job", attrs...)
	return nil
}

// Sweep puts every engine idle for IdleConfig.After to sleep (stop mode:
// enqueues its sleep) and returns how many it handled. rc enqueues the
// stop-mode jobs.
func (d *Idle) Sweep(ctx context.Context, rc *river.Client[pgx.Tx]) (int, error) {
	if d.cfg.After <= 0 {
		return 0, nil
	}
	before := time.Now().Add(-d.cfg.After)
	total := 0
	for round := 0; round < 1000; round++ {
		es, err := schema.New(d.pool).IdleEngines(ctx, before, idleBatch)
		if err != nil || len(es) == 0 {
			return total, err
		}
		var n int
		if d.cfg.Mode == SleepStop {
			n, err = d.sleepStop(ctx, rc, es, before)
		} else {
			n, err = d.sleepMark(ctx, es, before)
		}
		total += n
		if err != nil || len(es) < idleBatch || n == 0 {
			return total, err
		}
	}
	return total, nil
}

// sleepMark flips a batch of idle engines to sleeping with one UPDATE and
// one audit INSERT.
func (d *Idle) sleepMark(ctx context.Context, es []orch.Engine, before time.Time) (int, error) {
	ids := make([]string, len(es))
	for i, e := range es {
		ids[i] = e.ID
	}
	var n int
	err := inTx(ctx, d.pool, func(tx pgx.Tx) error {
		q := schema.New(tx)
		slept, err := q.MarkSleeping(ctx, ids, idleReason, before)
		if err != nil {
			return err
		}
		audits := make([]orch.AuditEntry, len(slept))
		for i, e := range slept {
			audits[i] = orch.AuditEntry{ProductID: e.ProductID, UserID: e.UserID, EngineID: e.ID, Action: orch.ActionSleep,
				Actor: orch.ActorSystem, Metadata: sleepMeta(e, SleepMark), DurationMS: ptr(int64(0))}
		}
		n = len(slept)
		return q.InsertAudits(ctx, audits)
	})
	return n, err
}

// sleepStop gives each idle engine a system stop operation (Sleep) in its
// own transaction; the engine_stop job does the rest and audits sleep.
func (d *Idle) sleepStop(ctx context.Context, rc *river.Client[pgx.Tx], es []orch.Engine, before time.Time) (int, error) {
	n := 0
	for _, e := range es {
		var queued bool
		err := inTx(ctx, d.pool, func(tx pgx.Tx) error {
			q := schema.New(tx)
			cur, err := q.EngineByIDForUpdate(ctx, e.ID)
			if orch.IsCode(err, orch.CodeEngineNotFound) {
				return nil
			}
			if err != nil {
				return err
			}
			if cur.Status != orch.StateRunning || !lastActivity(cur).Before(before) {
				return nil
			}
			if quiet, err := q.EngineQuiet(ctx, e.ID); err != nil || !quiet {
				return err
			}
			op := orch.Operation{ID: uuid.NewString(), ProductID: cur.ProductID, EngineID: cur.ID, UserID: cur.UserID,
				Kind: orch.OpStop, Actor: orch.ActorSystem, Status: orch.OpPending, Deadline: lifecycle.Deadline(nil, d.eng.BootTimeout)}
			err = lifecycle.Enqueue(ctx, tx, rc, op, schema.OpPayload{},
				jobs.Stop{Lifecycle: jobs.Lifecycle{EngineID: cur.ID, OperationID: op.ID, Node: cur.Node}, Sleep: true}, nil)
			if orch.IsCode(err, orch.CodeOperationInProgress) {
				return errSkip
			}
			if err != nil {
				return err
			}
			if _, err := q.SetEngineState(ctx, cur, schema.EngineChange{Status: cur.Status, OperationID: &op.ID}); err != nil {
				return err
			}
			queued = true
			return nil
		})
		if errors.Is(err, errSkip) {
			continue
		}
		if err != nil {
			return n, err
		}
		if queued {
			n++
		}
	}
	return n, nil
}

// errSkip rolls back a transaction whose work turned out to be needless.
var errSkip = errorString("skip")

type errorString string

func (e errorString) Error() string { return string(e) }

// sleepMeta is the metadata of a sleep audit row: why, how, and how long
// since the engine's last admit (idle_s).
func sleepMeta(e orch.Engine, mode string) map[string]any {
	last := e.CreatedAt
	if e.LastActiveAt != nil {
		last = *e.LastActiveAt
	}
	return map[string]any{"reason": idleReason, "mode": mode, "idle_s": int64(time.Since(last).Seconds()),
		"last_active_at": last.UTC().Format(time.RFC3339)}
}

// lastActivity is the engine's last admit or state change, whichever is
// later (schema's idle criterion).
func lastActivity(e orch.Engine) time.Time {
	last := e.CreatedAt
	if e.LastActiveAt != nil {
		last = *e.LastActiveAt
	}
	if e.UpdatedAt.After(last) {
		last = e.UpdatedAt
	}
	return last
}

// wakeMeta adds to a start/wake audit row how long the engine slept.
func wakeMeta(e orch.Engine, meta map[string]any) {
	if e.Status == orch.StateSleeping && e.SleptAt != nil {
		meta["slept_s"] = int64(time.Since(*e.SleptAt).Seconds())
		meta["slept_at"] = e.SleptAt.UTC().Format(time.RFC3339)
	}
}
