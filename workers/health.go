package workers

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/lifecycle"
	"github.com/enginefleet/orchestrator/schema"
)

// Health sweeps. A sweep lists the running engines and enqueues
// them as batches of HealthConfig.BatchSize on their nodes' queues, so several
// workers share a large fleet. A batch probes its engines, at most
// ProbeConcurrency at once per worker process (a probe that times out
// holds one slot, not the batch), then writes in one transaction:
//
//   - one UPDATE … WHERE id = ANY(healthy) for every healthy engine
//     (last_health_at = now, failure count reset);
//   - one UPDATE … RETURNING for the failed ones (count + 1);
//   - one INSERT of the batch's audit rows: each failed probe, and the
//     sampled health_check of healthy engines (one per engine per
//     AuditEvery: each engine has a fixed slot among the sweeps of
//     that window, so no read is needed to decide).
//
// An engine that reaches MaxFailures goes failed in its own
// transaction (audit health_failed) which also schedules auto-restart
// attempt 1 (restart.go). Engines that an operation or a lease is working
// on are skipped: a stop in progress is not a failure.

// HealthConfig configures health sweeps and auto-restart.
type HealthConfig struct {
	Interval           time.Duration // sweep period (30 s); paces the sampled health_check rows
	MaxFailures        int           // consecutive failed probes before failed (3)
	BatchSize          int           // engines per health_sweep_batch job (100)
	ProbeConcurrency   int           // probes at once per worker process (50)
	AuditEvery         time.Duration // one sampled health_check row per engine per this (1 h)
	RestartBackoffBase time.Duration // first auto-restart delay; doubles per attempt (0 = at once)
	RestartBackoffMax  time.Duration // backoff cap (0 = no cap)
	RestartMaxAttempts int           // auto-restart attempts before giving up (0 = no auto-restart)
}

// withDefaults fills the zero health settings with the documented defaults (README).
// Zero restart settings keep their meaning (no delay, no cap, no
// auto-restart), so cmd passes them explicitly.
func (c HealthConfig) withDefaults() HealthConfig {
	if c.Interval <= 0 {
		c.Interval = 30 * time.Second
	}
	if c.MaxFailures <= 0 {
		c.MaxFailures = 3
	}
	if c.BatchSize <= 0 {
		c.BatchSize = 100
	}
	if c.ProbeConcurrency <= 0 {
		c.ProbeConcurrency = 50
	}
	if c.AuditEvery <= 0 {
		c.AuditEvery = time.Hour
	}
	return c
}

// Health keeps the engines healthy: health sweeps, crash checks
// of the runtime events the backend reports (events.go), and auto-restart
// of failed engines (restart.go).
type Health struct {
	*runner
	cfg    HealthConfig
	probes chan struct{} // at most ProbeConcurrency probes at once in this process
}

func newHealth(r *runner, cfg HealthConfig) *Health {
	return &Health{runner: r, cfg: cfg, probes: make(chan struct{}, cfg.ProbeConcurrency)}
}

// register adds the health workers; auto-restart attempts are the
// engine_restart worker's (lifecycle.go), which calls autoRestart.
func (h *Health) register(ws *river.Workers) {
	river.AddWorker(ws, &healthSweepWorker{h: h})
	river.AddWorker(ws, &healthBatchWorker{h: h})
	river.AddWorker(ws, &runtimeEventWorker{h: h})
}

type healthSweepWorker struct {
	river.WorkerDefaults[jobs.HealthSweep]
	h *Health
}

func (s *healthSweepWorker) Timeout(*river.Job[jobs.HealthSweep]) time.Duration { return time.Minute }

func (s *healthSweepWorker) Work(ctx context.Context, j *river.Job[jobs.HealthSweep]) error {
	start := time.Now()
	rc := river.ClientFromContext[pgx.Tx](ctx)
	n, batches, err := s.h.fanOutSweep(ctx, rc, j.Args)
	attrs := []any{"job_kind", j.Kind, "engines", n, "batches", batches, "duration_ms", time.Since(start).Milliseconds()}
	if j.Args.Node != "" {
		attrs = append(attrs, "node", j.Args.Node)
	}
	if j.Args.Reason != "" {
		attrs = append(attrs, "reason", j.Args.Reason)
	}
	if err != nil {
		s.h.log.Warn("job", append(attrs, "error", err.Error())...)
		return err
	}
	s.h.log.Debug("job", attrs...)
	return nil
}

// fanOutSweep enqueues the batches of one sweep; returns the engines and
// batches enqueued.
func (h *Health) fanOutSweep(ctx context.Context, rc *river.Client[pgx.Tx], a jobs.HealthSweep) (int, int, error) {
	tick := a.Tick
	if tick.IsZero() {
		tick = time.Now()
	}
	list, err := schema.New(h.pool).RunningEngines(ctx, a.Node)
	if err != nil {
		return 0, 0, err
	}
	var params []river.InsertManyParams
	for i := 0; i < len(list); {
		node := list[i].Node
		b := jobs.HealthSweepBatch{Tick: tick, Node: node}
		for ; i < len(list) && list[i].Node == node && len(b.EngineIDs) < h.cfg.BatchSize; i++ {
			b.EngineIDs = append(b.EngineIDs, list[i].ID)
		}
		params = append(params, river.InsertManyParams{Args: b})
	}
	if len(params) == 0 {
		return 0, 0, nil
	}
	if _, err := rc.InsertMany(ctx, params); err != nil {
		return 0, 0, err
	}
	return len(list), len(params), nil
}

// SweepNow sweeps the running engines of node ("" = every node this
// worker can reach: its own) at once, in this goroutine, batch after batch
// (tests, operators). rc enqueues the auto-restarts.
func (h *Health) SweepNow(ctx context.Context, rc *river.Client[pgx.Tx], node string) (BatchResult, error) {
	if node == "" {
		node = h.node
	}
	list, err := schema.New(h.pool).RunningEngines(ctx, node)
	if err != nil {
		return BatchResult{}, err
	}
	var total BatchResult
	tick := time.Now()
	for i := 0; i < len(list); i += h.cfg.BatchSize {
		b := jobs.HealthSweepBatch{Tick: tick, Node: node}
		for _, ne := range list[i:min(i+h.cfg.BatchSize, len(list))] {
			b.EngineIDs = append(b.EngineIDs, ne.ID)
		}
		res, err := h.SweepBatch(ctx, rc, b)
		total.Probed += res.Probed
		total.Healthy += res.Healthy
		total.Failed += res.Failed
		total.NowFailed += res.NowFailed
		if err != nil {
			return total, err
		}
	}
	return total, nil
}

type healthBatchWorker struct {
	river.WorkerDefaults[jobs.HealthSweepBatch]
	h *Health
}

// Timeout leaves room for every probe of the batch to time out while
// waiting for a probe slot behind other batches.
func (b *healthBatchWorker) Timeout(j *river.Job[jobs.HealthSweepBatch]) time.Duration {
	rounds := (len(j.Args.EngineIDs) + b.h.cfg.ProbeConcurrency - 1) / b.h.cfg.ProbeConcurrency
	return time.Duration(2*rounds+2)*b.h.eng.ProbeTimeout + time.Minute
}

func (b *healthBatchWorker) Work(ctx context.Context, j *river.Job[jobs.HealthSweepBatch]) error {
	start := time.Now()
	res, err := b.h.SweepBatch(ctx, river.ClientFromContext[pgx.Tx](ctx), j.Args)
	attrs := []any{"job_kind", j.Kind, "node", j.Args.Node, "engines", res.Probed, "healthy", res.Healthy,
		"failed_probes", res.Failed, "now_failed", res.NowFailed, "duration_ms", time.Since(start).Milliseconds()}
	if err != nil {
		b.h.log.Warn("job", append(attrs, "error", err.Error())...)
		return err
	}
	if res.Failed > 0 {
		b.h.log.Info("job", attrs...)
	} else {
		b.h.log.Debug("job", attrs...)
	}
	return nil
}

// BatchResult counts what one sweep batch saw and did.
type BatchResult struct {
	Probed    int // engines probed (running and quiet)
	Healthy   int
	Failed    int // failed probes
	NowFailed int // engines that reached the threshold and went failed
}

type probeResult struct {
	e   orch.Engine
	err error
	dur time.Duration
}

// SweepBatch probes one batch and records the results (see the file
// comment). rc enqueues the auto-restarts of engines that go failed.
func (h *Health) SweepBatch(ctx context.Context, rc *river.Client[pgx.Tx], b jobs.HealthSweepBatch) (BatchResult, error) {
	var res BatchResult
	targets, err := schema.New(h.pool).ProbeTargets(ctx, b.Node, b.EngineIDs)
	if err != nil {
		return res, err
	}
	results := h.probeAll(ctx, targets)
	if ctx.Err() != nil {
		return res, ctx.Err()
	}
	res.Probed = len(results)
	tick := b.Tick
	if tick.IsZero() {
		tick = time.Now()
	}
	var healthy, failed []string
	var audits []orch.AuditEntry
	errs := map[string]error{}
	for _, r := range results {
		if r.err == nil {
			healthy = append(healthy, r.e.ID)
			if h.sampled(r.e.ID, tick) {
				audits = append(audits, orch.AuditEntry{ProductID: r.e.ProductID, UserID: r.e.UserID, EngineID: r.e.ID,
					Action: orch.ActionHealthCheck, Actor: orch.ActorSystem, DurationMS: ptr(r.dur.Milliseconds()),
					Metadata: map[string]any{"ok": true, "sampled": true}})
			}
			continue
		}
		failed = append(failed, r.e.ID)
		errs[r.e.ID] = r.err
	}
	res.Healthy, res.Failed = len(healthy), len(failed)
	h.metrics.HealthProbeFailures(res.Failed) // orchestrator_health_probe_failures_total
	var counts []schema.FailureCount
	err = inTx(ctx, h.pool, func(tx pgx.Tx) error {
		q := schema.New(tx)
		if _, err := q.MarkHealthy(ctx, healthy); err != nil {
			return err
		}
		var err error
		if counts, err = q.CountFailures(ctx, failed); err != nil {
			return err
		}
		byID := map[string]probeResult{}
		for _, r := range results {
			byID[r.e.ID] = r
		}
		for _, c := range counts {
			r := byID[c.ID]
			audits = append(audits, orch.AuditEntry{ProductID: r.e.ProductID, UserID: r.e.UserID, EngineID: r.e.ID,
				Action: orch.ActionHealthCheck, Actor: orch.ActorSystem, DurationMS: ptr(r.dur.Milliseconds()),
				Metadata: map[string]any{"ok": false, "error": publicError(r.err), "failures": c.Failures,
					"max_failures": h.cfg.MaxFailures}})
		}
		return q.InsertAudits(ctx, audits)
	})
	if err != nil {
		return res, err
	}
	for _, c := range counts {
		if c.Failures < h.cfg.MaxFailures {
			continue
		}
		ok, err := h.failEngine(ctx, rc, c.ID, h.cfg.MaxFailures, map[string]any{
			"reason": "health", "failures": c.Failures, "error": publicError(errs[c.ID])}, errs[c.ID])
		if err != nil {
			h.log.Warn("mark engine failed", "engine_id", c.ID, "error", err)
			continue
		}
		if ok {
			res.NowFailed++
		}
	}
	return res, nil
}

// probeAll probes every target, at most ProbeConcurrency at once across
// this process, each within ProbeTimeout.
func (h *Health) probeAll(ctx context.Context, targets []orch.Engine) []probeResult {
	out := make([]probeResult, len(targets))
	var wg sync.WaitGroup
	for i, e := range targets {
		select {
		case h.probes <- struct{}{}:
		case <-ctx.Done():
			wg.Wait()
			return out[:i]
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-h.probes }()
			out[i] = h.probe(ctx, e)
		}()
	}
	wg.Wait()
	return out
}

// probe checks one engine's /health within ProbeTimeout.
func (h *Health) probe(ctx context.Context, e orch.Engine) probeResult {
	start := time.Now()
	pctx, cancel := context.WithTimeout(ctx, h.eng.ProbeTimeout)
	defer cancel()
	err := Probe(pctx, h.http, h.probeURL(e))
	if err != nil && errors.Is(pctx.Err(), context.DeadlineExceeded) && ctx.Err() == nil {
		err = probeErr("timed out after "+h.eng.ProbeTimeout.String(), err)
	}
	return probeResult{e: e, err: err, dur: time.Since(start)}
}

// sampled reports whether a healthy probe of engine id at tick gets its
// health_check audit row: each engine owns one of the N sweeps of every
// AuditEvery window (N = window / interval), picked by a hash of
// its id, so rows are spread evenly over the window and no state is read.
func (h *Health) sampled(id string, tick time.Time) bool {
	n := int64(h.cfg.AuditEvery / h.cfg.Interval)
	if n <= 1 {
		return true
	}
	sum := fnv.New32a()
	sum.Write([]byte(id)) //nolint:errcheck
	slot := int64(sum.Sum32()) % n
	return (tick.UnixNano()/int64(h.cfg.Interval))%n == slot
}

// failEngine makes a running, quiet engine failed (audit health_failed
// with meta) and schedules auto-restart attempt 1, in one transaction.
// minFailures > 0 re-checks the failure count under the row lock. It
// reports whether the engine went failed (false: it changed meanwhile).
// The audit row gets meta (stable words); the log line gets cause whole.
func (h *Health) failEngine(ctx context.Context, rc *river.Client[pgx.Tx], engineID string, minFailures int, meta map[string]any, cause error) (bool, error) {
	var done bool
	err := inTx(ctx, h.pool, func(tx pgx.Tx) error {
		q := schema.New(tx)
		cur, err := q.EngineByIDForUpdate(ctx, engineID)
		if orch.IsCode(err, orch.CodeEngineNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		if cur.Status != orch.StateRunning || cur.HealthFailures < minFailures {
			return nil
		}
		if quiet, err := q.EngineQuiet(ctx, engineID); err != nil || !quiet {
			return err
		}
		reason, _ := meta["reason"].(string)
		lastErr, _ := meta["error"].(string)
		if lastErr == "" {
			lastErr = reason
		}
		cur, err = q.SetEngineState(ctx, cur, schema.EngineChange{Status: orch.StateFailed, RestartAttempts: ptr(0),
			LastError: ptr(lastErr)})
		if err != nil {
			return err
		}
		meta["restart_max_attempts"] = h.cfg.RestartMaxAttempts
		if err := q.InsertAudit(ctx, orch.AuditEntry{ProductID: cur.ProductID, UserID: cur.UserID, EngineID: cur.ID,
			Action: orch.ActionHealthFailed, Actor: orch.ActorSystem, Metadata: meta}); err != nil {
			return err
		}
		if h.cfg.RestartMaxAttempts > 0 {
			if err := h.scheduleAutoRestart(ctx, q, tx, rc, cur, 1); err != nil {
				return err
			}
		}
		done = true
		return nil
	})
	if done {
		reason, _ := meta["reason"].(string)
		h.metrics.EngineCrashed(reason) // orchestrator_engine_crashes_total{reason}
		h.log.Warn("engine failed", "engine_id", engineID, "reason", meta["reason"], "error", cause)
	}
	return done, err
}

// scheduleAutoRestart records auto-restart attempt n of a failed engine as
// a pending "system" restart operation, points the row at it and enqueues
// its engine_restart job to run after the backoff, all within tx.
func (h *Health) scheduleAutoRestart(ctx context.Context, q *schema.Queries, tx pgx.Tx, rc *river.Client[pgx.Tx], e orch.Engine, attempt int) error {
	if rc == nil {
		return errors.New("schedule auto-restart: no river client")
	}
	var opts *river.InsertOpts
	delay := Backoff(h.cfg.RestartBackoffBase, h.cfg.RestartBackoffMax, attempt)
	if delay > 0 {
		opts = &river.InsertOpts{ScheduledAt: time.Now().Add(delay)}
	}
	op := orch.Operation{ID: uuid.NewString(), ProductID: e.ProductID, EngineID: e.ID, UserID: e.UserID,
		Kind: orch.OpRestart, Actor: orch.ActorSystem, Status: orch.OpPending, Deadline: lifecycle.Deadline(opts, h.eng.BootTimeout)}
	err := lifecycle.Enqueue(ctx, tx, rc, op, schema.OpPayload{},
		jobs.Restart{Lifecycle: jobs.Lifecycle{EngineID: e.ID, OperationID: op.ID, Node: e.Node}, Auto: true, Attempt: attempt}, opts)
	if err != nil {
		return fmt.Errorf("schedule auto-restart: %w", err)
	}
	_, err = q.SetEngineState(ctx, e, schema.EngineChange{Status: orch.StateFailed, OperationID: &op.ID})
	return err
}
