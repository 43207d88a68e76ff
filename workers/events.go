package workers

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/schema"
)

// Crash detection. Every worker process watches its
// backend's event stream. A die or oom of an engine that is running in
// the database and quiet (no operation in flight, no lease: a stop,
// restart, rotation or sleep in progress kills containers on purpose)
// becomes an engine_runtime_event job on the engine's node queue, at most
// one in flight per engine (two replicas watching one daemon, or a die
// and an oom of one crash, make one check). The check runs at once:
//
//   - the runtime is gone or exited and /health fails: the engine goes
//     failed (audit health_failed, reason crash, exit code, oom) and
//     auto-restart attempt 1 is scheduled — no waiting for a sweep or for
//     MaxFailures probes: a dead process is not a flaky probe;
//   - the runtime is running again (Docker's unless-stopped policy
//     restarts a container that died on its own, ~100 ms after the die;
//     `docker kill` counts as a manual stop and is not restarted): we give
//     it up to the boot timeout to answer /health. Healthy: nothing more
//     to do, but the crash is audited as a health_check row with ok=true,
//     the event, the exit code and recovered_by=runtime (so /metrics can
//     count crashes). Not healthy: failed as above.
//
// The check does not wait for Docker's restart policy: detection stays
// fast, and when the policy restarts the container after the check has
// marked it failed, auto-restart attempt 1 probes first, finds it healthy
// and only marks it running (auto_restart_success, already_healthy).
//
// An event older than the row's last state change is stale and ignored.
// When the stream breaks it is re-subscribed (backoff up to 10 s) and, as
// events in between are lost, the worker catches up with a reconcile and
// a health sweep of its node.

// watchEvents runs the crash watcher until ctx ends. rc enqueues the
// checks and the catch-up jobs.
func (h *Health) watchEvents(ctx context.Context, rc *river.Client[pgx.Tx]) {
	backoff := 200 * time.Millisecond
	for ctx.Err() == nil {
		ch, err := h.backend.Events(ctx)
		if err != nil {
			h.log.Warn("subscribe to runtime events", "error", err, "retry_in_ms", backoff.Milliseconds())
			sleepCtx(ctx, backoff)
			backoff = min(2*backoff, 10*time.Second)
			continue
		}
		h.catchUpEvents(ctx, rc)
		subscribed := time.Now()
		for ev := range ch {
			h.onRuntimeEvent(ctx, rc, ev)
		}
		if ctx.Err() != nil {
			return
		}
		if time.Since(subscribed) > time.Minute {
			backoff = 200 * time.Millisecond
		}
		h.log.Warn("runtime event stream ended; re-subscribing", "retry_in_ms", backoff.Milliseconds())
		sleepCtx(ctx, backoff)
		backoff = min(2*backoff, 10*time.Second)
	}
}

// catchUpEvents enqueues what covers the events a (re)subscription may
// have missed: a reconcile and a health sweep of this node.
func (h *Health) catchUpEvents(ctx context.Context, rc *river.Client[pgx.Tx]) {
	if _, err := rc.Insert(ctx, jobs.Reconcile{Node: h.node}, nil); err != nil {
		h.log.Warn("enqueue catch-up reconcile", "error", err)
	}
	if _, err := rc.Insert(ctx, jobs.HealthSweep{Tick: time.Now(), Node: h.node, Reason: "events_subscribed"}, nil); err != nil {
		h.log.Warn("enqueue catch-up sweep", "error", err)
	}
}

// onRuntimeEvent turns a crash of a running, quiet engine into a check job.
func (h *Health) onRuntimeEvent(ctx context.Context, rc *river.Client[pgx.Tx], ev orch.RuntimeEvent) {
	if ev.Kind != "die" && ev.Kind != "oom" {
		return
	}
	status, quiet, err := schema.New(h.pool).EngineRunningQuiet(ctx, ev.EngineID)
	if err != nil {
		h.log.Warn("runtime event", "engine_id", ev.EngineID, "event", ev.Kind, "error", err)
		return
	}
	if status != orch.StateRunning || !quiet {
		h.log.Debug("runtime event ignored", "engine_id", ev.EngineID, "event", ev.Kind, "status", status, "quiet", quiet)
		return
	}
	at := ev.Time
	if at.IsZero() {
		at = time.Now()
	}
	args := jobs.RuntimeEvent{EngineID: ev.EngineID, Node: h.node, Event: ev.Kind, ExitCode: ev.ExitCode, At: at}
	if _, err := rc.Insert(ctx, args, nil); err != nil {
		h.log.Warn("enqueue runtime event check", "engine_id", ev.EngineID, "error", err)
		return
	}
	h.log.Info("engine crash reported", "engine_id", ev.EngineID, "event", ev.Kind, "exit_code", ev.ExitCode)
}

type runtimeEventWorker struct {
	river.WorkerDefaults[jobs.RuntimeEvent]
	h *Health
}

func (r *runtimeEventWorker) Timeout(*river.Job[jobs.RuntimeEvent]) time.Duration {
	return r.h.eng.BootTimeout + 2*r.h.eng.ProbeTimeout + 30*time.Second
}

func (r *runtimeEventWorker) Work(ctx context.Context, j *river.Job[jobs.RuntimeEvent]) error {
	start := time.Now()
	outcome, err := r.h.CheckCrash(ctx, river.ClientFromContext[pgx.Tx](ctx), j.Args)
	attrs := []any{"job_kind", j.Kind, "engine_id", j.Args.EngineID, "event", j.Args.Event, "outcome", outcome,
		"duration_ms", time.Since(start).Milliseconds()}
	if err != nil {
		r.h.log.Warn("job", append(attrs, "error", err.Error())...)
		return err
	}
	r.h.log.Info("job", attrs...)
	return nil
}

// Crash check outcomes.
const (
	CrashIgnored   = "ignored"   // not running, busy, or a stale event
	CrashRecovered = "recovered" // the runtime restarted it and it is healthy
	CrashFailed    = "failed"    // the engine went failed; auto-restart scheduled
)

// CheckCrash handles one reported crash (see the file comment) and says
// what it did.
func (h *Health) CheckCrash(ctx context.Context, rc *river.Client[pgx.Tx], ev jobs.RuntimeEvent) (string, error) {
	picked := time.Since(ev.At)
	q := schema.New(h.pool)
	e, err := q.EngineByID(ctx, ev.EngineID)
	if orch.IsCode(err, orch.CodeEngineNotFound) {
		return CrashIgnored, nil
	}
	if err != nil {
		return "", err
	}
	if quiet, err := q.EngineQuiet(ctx, e.ID); err != nil || !quiet || e.Status != orch.StateRunning {
		return CrashIgnored, err
	}
	if !ev.At.IsZero() && ev.At.Before(e.UpdatedAt) {
		return CrashIgnored, nil // the engine changed state after this event
	}
	info, err := h.backend.Inspect(ctx, e.ID)
	if err != nil {
		return "", backendErr("inspect engine", err)
	}
	meta := map[string]any{"reason": "crash", "event": ev.Event, "exit_code": ev.ExitCode,
		"oom": info.OOMKilled || ev.Event == "oom", "runtime_state": string(info.State),
		"detected_ms": time.Since(ev.At).Milliseconds(), "picked_ms": picked.Milliseconds()}
	perr := h.probeOnce(ctx, e)
	if perr != nil && info.State == orch.RuntimeRunning {
		// Restarted by the runtime's policy: give it its boot time.
		perr = h.waitHealthy(ctx, e, time.Now().Add(h.eng.BootTimeout))
	}
	if perr == nil {
		meta["ok"] = true
		meta["recovered_by"] = "runtime"
		err := q.InsertAudit(ctx, orch.AuditEntry{ProductID: e.ProductID, UserID: e.UserID, EngineID: e.ID,
			Action: orch.ActionHealthCheck, Actor: orch.ActorSystem, Metadata: meta})
		return CrashRecovered, err
	}
	meta["error"] = publicError(perr)
	ok, err := h.failEngine(ctx, rc, e.ID, 0, meta, perr)
	if err != nil || !ok {
		return CrashIgnored, err
	}
	return CrashFailed, nil
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
