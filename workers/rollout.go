package workers

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/lifecycle"
	"github.com/enginefleet/orchestrator/schema"
)

// Rollouts drives fleet rollouts (jobs.RolloutDrive). One tick:
//
//  1. settle: engines whose upgrade (or rollback) operation ended move to
//     upgraded / failed / skipped (or rolled_back / rollback_failed);
//  2. gate: an upgraded engine that went failed, failed a probe or was
//     restarted since counts as failed; a wave whose failures exceed the
//     budget stops the rollout and starts its rollback;
//  3. work: running, it starts upgrades of the current wave's engines up to
//     max_concurrent in flight (sleeping and stopped ones are left to their
//     next wake, engines in use wait); once the wave is settled and has
//     baked, the next wave starts. Rolling back, it puts every engine it
//     upgraded back on its previous image the same way.
//
// Then the job snoozes for the next tick. Every decision is read from and
// written to the rollout's rows, so a tick cut off anywhere is simply done
// again by the next attempt, on any worker.
type Rollouts struct {
	*runner
	cfg RolloutConfig

	coreOnce sync.Once
	core     *lifecycle.Core
}

// RolloutConfig configures the rollouts' driver.
type RolloutConfig struct {
	Tick time.Duration // between two ticks of a rollout (jobs.RolloutTick, 1 s)
}

func (ro *Rollouts) register(ws *river.Workers) {
	river.AddWorker(ws, &rolloutWorker{ro: ro})
	river.AddWorker(ws, &rolloutWatchWorker{ro: ro})
}

type rolloutWatchWorker struct {
	river.WorkerDefaults[jobs.RolloutWatch]
	ro *Rollouts
}

// Work enqueues the driver of every active rollout (a no-op for those
// whose driver is in flight).
func (w *rolloutWatchWorker) Work(ctx context.Context, j *river.Job[jobs.RolloutWatch]) error {
	ids, err := schema.New(w.ro.pool).ActiveRollouts(ctx)
	if err != nil {
		return err
	}
	rc := river.ClientFromContext[pgx.Tx](ctx)
	for _, id := range ids {
		res, err := rc.Insert(ctx, jobs.RolloutDrive{RolloutID: id}, nil)
		if err != nil {
			return err
		}
		if !res.UniqueSkippedAsDuplicate {
			w.ro.log.Warn("rollout had no driver job: enqueued one", "rollout_id", id)
		}
	}
	return nil
}

type rolloutWorker struct {
	river.WorkerDefaults[jobs.RolloutDrive]
	ro *Rollouts
}

func (w *rolloutWorker) Timeout(*river.Job[jobs.RolloutDrive]) time.Duration { return time.Minute }

// NextRetry: a failed tick (database trouble) is tried again soon.
func (w *rolloutWorker) NextRetry(j *river.Job[jobs.RolloutDrive]) time.Time {
	return time.Now().Add(min(time.Duration(j.Attempt)*time.Second, 30*time.Second))
}

func (w *rolloutWorker) Work(ctx context.Context, j *river.Job[jobs.RolloutDrive]) error {
	rc := river.ClientFromContext[pgx.Tx](ctx)
	done, err := w.ro.tick(ctx, rc, j.Args.RolloutID)
	if err != nil {
		w.ro.log.Warn("rollout tick", "rollout_id", j.Args.RolloutID, "attempt", j.Attempt, "error", err)
		return err
	}
	if done {
		return nil
	}
	tick := w.ro.cfg.Tick
	if tick <= 0 {
		tick = jobs.RolloutTick
	}
	return river.JobSnooze(tick)
}

// lifecycleCore is the request side the driver records its upgrades
// through (the same Operate the API uses: row lock, in-flight checks,
// operation, job).
func (ro *Rollouts) lifecycleCore(rc *river.Client[pgx.Tx]) *lifecycle.Core {
	ro.coreOnce.Do(func() {
		ro.core = lifecycle.New(lifecycle.Config{BootTimeout: ro.eng.BootTimeout, Node: ro.node}, ro.pool, rc, nil, ro.log)
	})
	return ro.core
}

// tick works rollout id once; done when there is nothing left to do.
func (ro *Rollouts) tick(ctx context.Context, rc *river.Client[pgx.Tx], id string) (bool, error) {
	q := schema.New(ro.pool)
	r, err := q.Rollout(ctx, id, "")
	if orch.IsCode(err, orch.CodeRolloutNotFound) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	settled, err := q.SettleRolloutOps(ctx, id)
	if err != nil {
		return false, err
	}
	var gated []schema.SettledEngine
	if r.Status == orch.RolloutRunning || r.Status == orch.RolloutPaused {
		if gated, err = q.RolloutHealthGate(ctx, r); err != nil {
			return false, err
		}
	}
	if err := ro.recordSettled(ctx, r, append(settled, gated...)); err != nil {
		return false, err
	}
	counts, err := q.RolloutCounts(ctx, id)
	if err != nil {
		return false, err
	}
	c := tally(counts)
	if !r.Status.Active() {
		// Aborted or finished: only the operations still in flight are
		// followed to their end.
		return c.any(orch.REUpgrading, orch.RERollingBack) == 0, nil
	}
	if r.Status != orch.RolloutRollingBack {
		if wave, n := c.overBudget(r.FailureBudget); wave >= 0 {
			return false, ro.tripGate(ctx, r, wave, n)
		}
	}
	switch r.Status {
	case orch.RolloutPaused:
		return false, nil
	case orch.RolloutRollingBack:
		return false, ro.rollBack(ctx, rc, r, c)
	}
	return false, ro.advance(ctx, rc, r, c)
}

// counts is a rollout's engines by wave and status.
type counts struct {
	byWave map[int]map[orch.RolloutEngineStatus]int
	total  map[orch.RolloutEngineStatus]int
}

func tally(cs []schema.RolloutCount) counts {
	c := counts{byWave: map[int]map[orch.RolloutEngineStatus]int{}, total: map[orch.RolloutEngineStatus]int{}}
	for _, x := range cs {
		if c.byWave[x.Wave] == nil {
			c.byWave[x.Wave] = map[orch.RolloutEngineStatus]int{}
		}
		c.byWave[x.Wave][x.Status] += x.N
		c.total[x.Status] += x.N
	}
	return c
}

func (c counts) any(sts ...orch.RolloutEngineStatus) int {
	n := 0
	for _, s := range sts {
		n += c.total[s]
	}
	return n
}

func (c counts) wave(w int, sts ...orch.RolloutEngineStatus) int {
	n := 0
	for _, s := range sts {
		n += c.byWave[w][s]
	}
	return n
}

// overBudget returns the first wave whose failures exceed budget, and
// their number (-1 when none does).
func (c counts) overBudget(budget int) (int, int) {
	first := -1
	for w, m := range c.byWave {
		if m[orch.REFailed] > budget && (first < 0 || w < first) {
			first = w
		}
	}
	if first < 0 {
		return -1, 0
	}
	return first, c.byWave[first][orch.REFailed]
}

// recordSettled audits the engines that failed and counts what settled.
func (ro *Rollouts) recordSettled(ctx context.Context, r orch.Rollout, ss []schema.SettledEngine) error {
	if len(ss) == 0 {
		return nil
	}
	q := schema.New(ro.pool)
	for _, s := range ss {
		ro.metrics.RolloutEngine(string(s.Status))
		if s.Status != orch.REFailed && s.Status != orch.RERollbackFailed {
			continue
		}
		if err := q.InsertAudit(ctx, orch.AuditEntry{ProductID: s.ProductID, UserID: s.UserID, EngineID: s.EngineID,
			Action: orch.ActionRolloutEngineFail, Actor: orch.ActorSystem,
			Metadata: map[string]any{"rollout_id": r.ID, "wave": s.Wave + 1, "status": string(s.Status), "error": s.Error}}); err != nil {
			return err
		}
	}
	return q.SetRollout(ctx, r.ID, schema.RolloutChange{Progress: true})
}

// tripGate stops a rollout whose wave exceeded its failure budget and
// starts its rollback.
func (ro *Rollouts) tripGate(ctx context.Context, r orch.Rollout, wave, failures int) error {
	q := schema.New(ro.pool)
	first := ""
	if fs, err := q.RolloutFailures(ctx, r.ID, 1); err == nil && len(fs) > 0 {
		first = fmt.Sprintf(" (first: engine %s: %s)", fs[0].EngineID, fs[0].Error)
	}
	reason := fmt.Sprintf("%s: %d engines failed, over its failure budget of %d; rolling back every engine it upgraded%s",
		orch.RolloutWaveName(wave, len(r.Waves)), failures, r.FailureBudget, first)
	err := inTx(ctx, ro.pool, func(tx pgx.Tx) error {
		q := schema.New(tx)
		cur, err := q.RolloutForUpdate(ctx, r.ID)
		if err != nil {
			return err
		}
		if cur.Status != orch.RolloutRunning && cur.Status != orch.RolloutPaused {
			return nil // a human got there first
		}
		if err := q.SetRollout(ctx, r.ID, schema.RolloutChange{Status: orch.RolloutRollingBack, StopReason: &reason, Progress: true}); err != nil {
			return err
		}
		return q.InsertAudit(ctx, orch.AuditEntry{ProductID: r.ProductID, Action: orch.ActionRolloutGate, Actor: orch.ActorSystem,
			Metadata: map[string]any{"rollout_id": r.ID, "wave": wave + 1, "failures": failures, "failure_budget": r.FailureBudget, "reason": reason}})
	})
	if err == nil {
		ro.metrics.RolloutGateTripped()
		ro.log.Warn("rollout gate tripped: rolling back", "rollout_id", r.ID, "wave", wave+1, "failures", failures)
	}
	return err
}

// advance starts the current wave's next upgrades, or, once the wave is
// settled and baked, the next wave (or completes the rollout).
func (ro *Rollouts) advance(ctx context.Context, rc *river.Client[pgx.Tx], r orch.Rollout, c counts) error {
	q := schema.New(ro.pool)
	w := r.CurrentWave
	if w >= len(r.Waves) {
		return ro.finish(ctx, r, orch.RolloutCompleted, "")
	}
	inFlight := c.any(orch.REUpgrading)
	if room := r.MaxConcurrent - inFlight; room > 0 && c.wave(w, orch.REPending) > 0 {
		cands, err := q.RolloutCandidates(ctx, r, w, []orch.RolloutEngineStatus{orch.REPending}, room)
		if err != nil {
			return err
		}
		core := ro.lifecycleCore(rc)
		moved := false
		for _, cd := range cands {
			st, opID, why, err := ro.startUpgrade(ctx, core, r, cd)
			if err != nil {
				return err
			}
			if st == "" {
				continue // waits: in use, busy, not settled
			}
			if err := q.SetRolloutEngine(ctx, r.ID, cd.EngineID, st, opID, why); err != nil {
				return err
			}
			moved = true
		}
		if moved {
			return q.SetRollout(ctx, r.ID, schema.RolloutChange{Progress: true})
		}
		return nil
	}
	if c.wave(w, orch.REPending, orch.REUpgrading) > 0 {
		return nil
	}
	// The wave is settled: it bakes, then the gate (checked every tick)
	// lets the next one start.
	if r.WaveDoneAt == nil {
		return q.SetRollout(ctx, r.ID, schema.RolloutChange{WaveDone: true})
	}
	if time.Since(*r.WaveDoneAt) < r.Bake {
		return nil
	}
	meta := map[string]any{"rollout_id": r.ID, "wave": w + 1, "upgraded": c.wave(w, orch.REUpgraded),
		"failed": c.wave(w, orch.REFailed), "lazy": c.wave(w, orch.RELazy), "skipped": c.wave(w, orch.RESkipped)}
	if w+1 >= len(r.Waves) {
		if err := q.InsertAudit(ctx, orch.AuditEntry{ProductID: r.ProductID, Action: orch.ActionRolloutWaveBaked, Actor: orch.ActorSystem, Metadata: meta}); err != nil {
			return err
		}
		return ro.finish(ctx, r, orch.RolloutCompleted, "")
	}
	return inTx(ctx, ro.pool, func(tx pgx.Tx) error {
		q := schema.New(tx)
		cur, err := q.RolloutForUpdate(ctx, r.ID)
		if err != nil {
			return err
		}
		if cur.Status != orch.RolloutRunning || cur.CurrentWave != w {
			return nil
		}
		if err := q.InsertAudit(ctx, orch.AuditEntry{ProductID: r.ProductID, Action: orch.ActionRolloutWaveBaked, Actor: orch.ActorSystem, Metadata: meta}); err != nil {
			return err
		}
		if err := q.SetRollout(ctx, r.ID, schema.RolloutChange{NextWave: true}); err != nil {
			return err
		}
		return q.InsertAudit(ctx, orch.AuditEntry{ProductID: r.ProductID, Action: orch.ActionRolloutWave, Actor: orch.ActorSystem,
			Metadata: map[string]any{"rollout_id": r.ID, "wave": w + 2, "engines": r.Waves[w+1]}})
	})
}

// startUpgrade decides what to do with one pending engine now: its new
// status ("" = leave it pending), the operation started and why.
func (ro *Rollouts) startUpgrade(ctx context.Context, core *lifecycle.Core, r orch.Rollout, cd schema.RolloutCandidate) (orch.RolloutEngineStatus, string, string, error) {
	switch {
	case !cd.Exists:
		return orch.RESkipped, "", "engine destroyed before its upgrade", nil
	case cd.State == orch.StateSleeping || cd.State == orch.StateStopped:
		return orch.RELazy, "", "", nil // takes the image at its next wake or start (workers/lifecycle.go)
	case cd.State == orch.StateFailed:
		return orch.RESkipped, "", "engine was failed before its upgrade", nil
	case cd.State != orch.StateRunning || cd.Busy || cd.InUse:
		return "", "", "", nil
	}
	_, opID, err := core.Operate(ctx, orch.Product{ID: cd.ProductID}, cd.UserID, lifecycle.RolloutUpgrade(r.Image, r.InUse))
	switch {
	case err == nil:
		return orch.REUpgrading, opID, "", nil
	case orch.IsCode(err, orch.CodeEngineNotFound):
		return orch.RESkipped, "", "engine destroyed before its upgrade", nil
	case orch.IsCode(err, orch.CodeOperationInProgress), orch.IsCode(err, orch.CodeEngineNotRunning):
		return "", "", "", nil // in use, or changed since the read: next tick
	}
	return "", "", "", err
}

// rollBack puts the engines the rollout upgraded back on their previous
// image, max_concurrent at a time, and ends the rollout when none is left.
func (ro *Rollouts) rollBack(ctx context.Context, rc *river.Client[pgx.Tx], r orch.Rollout, c counts) error {
	q := schema.New(ro.pool)
	todo := []orch.RolloutEngineStatus{orch.REPending, orch.RELazy, orch.REUpgraded, orch.REFailed}
	if c.any(todo...) == 0 && c.any(orch.REUpgrading, orch.RERollingBack) == 0 {
		return ro.finish(ctx, r, orch.RolloutRolledBack, "")
	}
	room := r.MaxConcurrent - c.any(orch.RERollingBack)
	if room <= 0 {
		return nil
	}
	// Pending and lazy engines were never upgraded: they are only
	// cancelled, so they never count against the room.
	cands, err := q.RolloutCandidates(ctx, r, -1, todo, room+c.any(orch.REPending, orch.RELazy))
	if err != nil {
		return err
	}
	core := ro.lifecycleCore(rc)
	started := 0
	for _, cd := range cands {
		st, opID, why := orch.RolloutEngineStatus(""), "", ""
		switch {
		case cd.Status == orch.REPending || cd.Status == orch.RELazy:
			st = orch.RECancelled
		case !cd.Exists:
			st, why = orch.RESkipped, "engine destroyed before its rollback"
		default:
			v, ok, err := q.EngineVersion(ctx, cd.EngineID)
			if err != nil {
				return err
			}
			switch {
			case !ok:
				st, why = orch.RESkipped, "engine destroyed before its rollback"
			case v != r.Image:
				st = orch.RERolledBack // its own failed upgrade already put it back
			case cd.State == orch.StateSleeping || cd.State == orch.StateStopped:
				st = orch.RERollbackLazy // goes back at its next wake or start
			case started >= room || cd.Busy || (cd.State != orch.StateRunning && cd.State != orch.StateFailed):
			default:
				_, id, err := core.Operate(ctx, orch.Product{ID: cd.ProductID}, cd.UserID, lifecycle.RolloutRollback(cd.FromImage))
				switch {
				case err == nil:
					st, opID = orch.RERollingBack, id
					started++
				case orch.IsCode(err, orch.CodeEngineNotFound):
					st, why = orch.RESkipped, "engine destroyed before its rollback"
				case orch.IsCode(err, orch.CodeOperationInProgress), orch.IsCode(err, orch.CodeEngineNotRunning):
				default:
					return err
				}
			}
		}
		if st == "" {
			continue
		}
		if err := q.SetRolloutEngine(ctx, r.ID, cd.EngineID, st, opID, why); err != nil {
			return err
		}
	}
	return q.SetRollout(ctx, r.ID, schema.RolloutChange{Progress: true})
}

// finish ends a rollout as status.
func (ro *Rollouts) finish(ctx context.Context, r orch.Rollout, status orch.RolloutStatus, reason string) error {
	err := inTx(ctx, ro.pool, func(tx pgx.Tx) error {
		q := schema.New(tx)
		cur, err := q.RolloutForUpdate(ctx, r.ID)
		if err != nil {
			return err
		}
		if cur.Status != r.Status {
			return nil // a human acted meanwhile: next tick
		}
		ch := schema.RolloutChange{Status: status, Finished: true, Progress: true}
		if reason != "" {
			ch.StopReason = &reason
		}
		if err := q.SetRollout(ctx, r.ID, ch); err != nil {
			return err
		}
		counts, err := q.RolloutCounts(ctx, r.ID)
		if err != nil {
			return err
		}
		byStatus := map[string]int{}
		for _, c := range counts {
			byStatus[string(c.Status)] += c.N
		}
		return q.InsertAudit(ctx, orch.AuditEntry{ProductID: r.ProductID, Action: orch.ActionRolloutDone, Actor: orch.ActorSystem,
			Metadata: map[string]any{"rollout_id": r.ID, "status": string(status), "image": r.Image, "engines": byStatus,
				"duration_ms": time.Since(r.CreatedAt).Milliseconds()}})
	})
	if err == nil {
		ro.log.Info("rollout finished", "rollout_id", r.ID, "status", string(status))
	}
	return err
}
