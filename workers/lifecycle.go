package workers

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/riverqueue/river"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/schema"
)

// lifecycleJobs are the engine lifecycle jobs a request waits for:
// provision, start (and wake), stop (and sleep in stop mode), restart,
// rotate-key, upgrade and destroy, each a step on the run/commit skeleton.
type lifecycleJobs struct {
	*runner
	// autoRestart works an auto-restart attempt (Health's): an
	// engine_restart job with Auto set.
	autoRestart func(ctx context.Context, j *river.Job[jobs.Restart]) error
}

func (l *lifecycleJobs) register(ws *river.Workers) {
	river.AddWorker(ws, &provisionWorker{lifecycleWorker[jobs.Provision]{l: l}})
	river.AddWorker(ws, &startWorker{lifecycleWorker[jobs.Start]{l: l}})
	river.AddWorker(ws, &stopWorker{lifecycleWorker[jobs.Stop]{l: l}})
	river.AddWorker(ws, &restartWorker{lifecycleWorker[jobs.Restart]{l: l}})
	river.AddWorker(ws, &rotateKeyWorker{lifecycleWorker[jobs.RotateKey]{l: l}})
	river.AddWorker(ws, &upgradeWorker{lifecycleWorker[jobs.Upgrade]{l: l}})
	river.AddWorker(ws, &destroyWorker{lifecycleWorker[jobs.Destroy]{l: l}})
}

// lifecycleWorker is what every lifecycle worker shares: a timeout above
// the boot timeout (River's default minute is not) and quick retries, as
// a waiting request is on the other end.
type lifecycleWorker[T river.JobArgs] struct {
	river.WorkerDefaults[T]
	l *lifecycleJobs
}

func (w *lifecycleWorker[T]) Timeout(*river.Job[T]) time.Duration { return w.l.jobTimeout() }
func (w *lifecycleWorker[T]) NextRetry(j *river.Job[T]) time.Time {
	return time.Now().Add(time.Duration(j.Attempt) * time.Second)
}

type provisionWorker struct {
	lifecycleWorker[jobs.Provision]
}

func (p *provisionWorker) Work(ctx context.Context, j *river.Job[jobs.Provision]) error {
	return p.l.run(ctx, j.JobRow, j.Args.Lifecycle, runOpts{}, func(ctx context.Context, e orch.Engine, op orch.Operation, _ schema.OpPayload, attempt int, last bool) outcome {
		d, err := p.l.bootAndWait(ctx, e, p.l.currentSpec(e))
		action := orch.ActionProvision
		if err != nil {
			action = orch.ActionProvisionFailed
		}
		return bootOutcome(action, d, err, map[string]any{"engine_version": e.EngineVersion, "port": e.Port})
	})
}

type startWorker struct{ lifecycleWorker[jobs.Start] }

func (s *startWorker) Work(ctx context.Context, j *river.Job[jobs.Start]) error {
	return s.l.run(ctx, j.JobRow, j.Args.Lifecycle, runOpts{}, func(ctx context.Context, e orch.Engine, op orch.Operation, _ schema.OpPayload, attempt int, last bool) outcome {
		action := orch.ActionStart
		if j.Args.Wake {
			action = orch.ActionWake
		}
		meta := map[string]any{"from": string(e.Status)}
		if e.SleepReason != "" {
			meta["sleep_reason"] = e.SleepReason
		}
		wakeMeta(e, meta) // idle.go
		w, pending, err := schema.New(s.l.pool).PendingWakeImage(ctx, e.ID)
		if err != nil {
			return outcome{err: &orch.Error{Code: orch.CodeBackendFailed, Message: "read the engine's rollout", Err: err}, action: action}
		}
		if pending {
			return s.l.startOnImage(ctx, e, action, meta, w)
		}
		d, err := s.l.bootAndWait(ctx, e, s.l.currentSpec(e))
		return bootOutcome(action, d, err, meta)
	})
}

// startOnImage starts an engine that a fleet rollout left for its wake
// (it was asleep when its wave came) on the rollout's image, or on its
// previous image when that rollout rolled back meanwhile. An image that
// does not boot is a failure of the rollout's, not of the user's: the
// engine is started on the image it had, as an upgrade rolls back.
func (l *lifecycleJobs) startOnImage(ctx context.Context, e orch.Engine, action orch.Action, meta map[string]any, w schema.WakeImage) outcome {
	meta["rollout_id"], meta["from_version"], meta["to_version"] = w.RolloutID, e.EngineVersion, w.Image
	if w.Image == e.EngineVersion {
		d, err := l.bootAndWait(ctx, e, l.currentSpec(e))
		out := bootOutcome(action, d, err, meta)
		out.after = func(ctx context.Context, q *schema.Queries, _ pgx.Tx) error {
			return q.WokeOnImage(ctx, w, e.ID, err == nil, "")
		}
		return out
	}
	d, err := l.bootAndWait(ctx, e, l.spec(e, w.Image, e.KeyHash, e.PrevKeyHash, e.PrevKeyExpiresAt))
	if err == nil {
		out := bootOutcome(action, d, nil, meta)
		out.change.EngineVersion = &w.Image
		out.after = func(ctx context.Context, q *schema.Queries, _ pgx.Tx) error {
			return q.WokeOnImage(ctx, w, e.ID, true, "")
		}
		return out
	}
	if ctx.Err() != nil {
		return outcome{err: ctx.Err(), action: action}
	}
	why := fmt.Sprintf("%s: %s (at its wake)", orch.ErrorCode(err), errMessage(err))
	meta["rolled_back"] = true
	d2, rbErr := l.bootAndWait(ctx, e, l.currentSpec(e))
	out := bootOutcome(action, d+d2, rbErr, meta)
	out.after = func(ctx context.Context, q *schema.Queries, _ pgx.Tx) error {
		return q.WokeOnImage(ctx, w, e.ID, false, why)
	}
	return out
}

type stopWorker struct{ lifecycleWorker[jobs.Stop] }

func (s *stopWorker) Work(ctx context.Context, j *river.Job[jobs.Stop]) error {
	return s.l.run(ctx, j.JobRow, j.Args.Lifecycle, runOpts{}, func(ctx context.Context, e orch.Engine, op orch.Operation, _ schema.OpPayload, attempt int, last bool) outcome {
		start := time.Now()
		if err := s.l.backend.Stop(ctx, e.ID, s.l.eng.StopGrace); err != nil {
			return outcome{err: backendErr("stop engine", err), action: orch.ActionStop}
		}
		if j.Args.Sleep {
			return outcome{action: orch.ActionSleep, duration: time.Since(start), meta: sleepMeta(e, SleepStop),
				change: &schema.EngineChange{Status: orch.StateSleeping, SleepReason: ptr("idle")}}
		}
		return outcome{action: orch.ActionStop, duration: time.Since(start), meta: map[string]any{"from": string(e.Status)},
			change: &schema.EngineChange{Status: orch.StateStopped, SleepReason: ptr("")}}
	})
}

type restartWorker struct{ lifecycleWorker[jobs.Restart] }

func (r *restartWorker) Work(ctx context.Context, j *river.Job[jobs.Restart]) error {
	if j.Args.Auto {
		return r.l.autoRestart(ctx, j) // restart.go
	}
	return r.l.run(ctx, j.JobRow, j.Args.Lifecycle, runOpts{}, func(ctx context.Context, e orch.Engine, op orch.Operation, _ schema.OpPayload, attempt int, last bool) outcome {
		start := time.Now()
		if err := r.l.backend.Stop(ctx, e.ID, r.l.eng.StopGrace); err != nil {
			return outcome{err: backendErr("stop engine", err), action: orch.ActionRestart}
		}
		d, err := r.l.bootAndWait(ctx, e, r.l.currentSpec(e))
		out := bootOutcome(orch.ActionRestart, d, err, map[string]any{"from": string(e.Status)})
		out.duration = time.Since(start)
		return out
	})
}

type rotateKeyWorker struct {
	lifecycleWorker[jobs.RotateKey]
}

// Work recreates the container with the new key hash, and the old one as
// ENGINE_KEY_HASH_PREVIOUS until the overlap ends. The
// row takes the new key only once the engine is healthy with it.
func (r *rotateKeyWorker) Work(ctx context.Context, j *river.Job[jobs.RotateKey]) error {
	return r.l.run(ctx, j.JobRow, j.Args.Lifecycle, runOpts{}, func(ctx context.Context, e orch.Engine, op orch.Operation, p schema.OpPayload, attempt int, last bool) outcome {
		expires := time.Now().Add(r.l.eng.KeyOverlap).Truncate(time.Second)
		prev := e.KeyHash
		if r.l.eng.KeyOverlap <= 0 {
			prev = ""
		}
		spec := r.l.spec(e, e.EngineVersion, p.KeyHash, prev, &expires)
		d, err := r.l.bootAndWait(ctx, e, spec)
		if err != nil {
			// Put the old key back in force, so a failed rotation changes nothing.
			r.l.bootAndWait(ctx, e, r.l.currentSpec(e)) //nolint:errcheck
			return outcome{action: orch.ActionRotateKey, duration: d, err: err}
		}
		return outcome{action: orch.ActionRotateKey, duration: d, meta: map[string]any{"overlap_until": expires.UTC().Format(time.RFC3339)},
			change: &schema.EngineChange{Status: orch.StateRunning, KeyHash: &p.KeyHash, KeyEnc: &p.KeyEnc,
				PrevKeyHash: ptr(prev), PrevKeyExpires: &expires, ResetHealth: true}}
	})
}

type upgradeWorker struct{ lifecycleWorker[jobs.Upgrade] }

// Work recreates the container on the new image with the same volume; if
// the new version does not become healthy it rolls back to the old image.
func (u *upgradeWorker) Work(ctx context.Context, j *river.Job[jobs.Upgrade]) error {
	return u.l.run(ctx, j.JobRow, j.Args.Lifecycle, runOpts{}, func(ctx context.Context, e orch.Engine, op orch.Operation, p schema.OpPayload, attempt int, last bool) outcome {
		meta := map[string]any{"from_version": e.EngineVersion, "to_version": p.Image}
		spec := u.l.spec(e, p.Image, e.KeyHash, e.PrevKeyHash, e.PrevKeyExpiresAt)
		d, err := u.l.bootAndWait(ctx, e, spec)
		if err != nil {
			_, rbErr := u.l.bootAndWait(ctx, e, u.l.currentSpec(e))
			meta["rolled_back"] = rbErr == nil
			out := outcome{action: orch.ActionUpgrade, duration: d, meta: meta, err: err}
			if rbErr != nil {
				out.change = &schema.EngineChange{Status: orch.StateFailed, LastError: ptr(errMessage(err))}
			}
			return out
		}
		ms := d.Milliseconds()
		return outcome{action: orch.ActionUpgrade, duration: d, meta: meta, change: &schema.EngineChange{
			Status: orch.StateRunning, EngineVersion: &p.Image, BootDurationMS: &ms, ResetHealth: true, RestartAttempts: ptr(0), SleepReason: ptr("")}}
	})
}

type destroyWorker struct{ lifecycleWorker[jobs.Destroy] }

// Work removes container and volume, then the row (which frees the port).
func (d *destroyWorker) Work(ctx context.Context, j *river.Job[jobs.Destroy]) error {
	return d.l.run(ctx, j.JobRow, j.Args.Lifecycle, runOpts{}, func(ctx context.Context, e orch.Engine, op orch.Operation, _ schema.OpPayload, attempt int, last bool) outcome {
		start := time.Now()
		if err := d.l.backend.RemoveContainer(ctx, e.ID); err != nil {
			return outcome{err: backendErr("remove container", err), action: orch.ActionDestroy}
		}
		if err := d.l.backend.RemoveVolume(ctx, e.ID); err != nil {
			return outcome{err: backendErr("remove volume", err), action: orch.ActionDestroy}
		}
		return outcome{action: orch.ActionDestroy, duration: time.Since(start), delete: true,
			meta: map[string]any{"engine_version": e.EngineVersion, "port": e.Port}}
	})
}
