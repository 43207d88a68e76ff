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

// ReconcileConfig configures drift repair.
type ReconcileConfig struct {
	OrphanGrace time.Duration // an unknown labelled container is removed after this (10 min)
}

func (c ReconcileConfig) withDefaults() ReconcileConfig {
	if c.OrphanGrace == 0 {
		c.OrphanGrace = 10 * time.Minute
	}
	return c
}

// Reconciler brings the backend and the rows back in line: the reconcile
// pass (drift, stuck transitions, moves to the isolated network) and the
// operation sweep, which ends the operations nothing else will (abandoned.go).
type Reconciler struct {
	*runner
	cfg          ReconcileConfig
	sleepingRuns bool // a sleeping engine keeps running (IdleConfig): converge starts it
	// nextAutoRestart follows a failed auto-restart attempt (Health's):
	// an abandoned attempt counts as a failed one.
	nextAutoRestart func(ctx context.Context, q *schema.Queries, tx pgx.Tx, rc *river.Client[pgx.Tx], e orch.Engine, n int, cause error) error
}

func (rec *Reconciler) register(ws *river.Workers) { river.AddWorker(ws, &reconcileWorker{rec: rec}) }

// reconcileWorker repairs drift between the rows and the backend:
//   - a labelled container of this fleet with no row, older than the grace
//     period, is removed (a provision killed before its row committed, a
//     row deleted by hand). The backend lists only this fleet's objects
//     and those of no fleet (an older version's): one of the latter is
//     adopted when this database has its row and otherwise only reported,
//     as it may be another deployment's on a shared host. Orphan volumes
//     are only reported, never deleted: a brain is the worst thing to lose
//     and an operator must decide;
//   - an engine that should run (running, sleeping in mark mode) whose
//     container is gone is recreated on its volume and started;
//   - a running engine on a network where engines can reach each other
//     (an older version's) is recreated on the isolated one, a few per
//     pass (isolation.go);
//   - a row stuck in a transitional state past its deadline, with no live
//     job on it, is finished: provisioning → failed, destroying → destroyed.
type reconcileWorker struct {
	river.WorkerDefaults[jobs.Reconcile]
	rec *Reconciler
}

func (r *reconcileWorker) Timeout(*river.Job[jobs.Reconcile]) time.Duration { return 10 * time.Minute }

func (r *reconcileWorker) Work(ctx context.Context, j *river.Job[jobs.Reconcile]) error {
	start := time.Now()
	n, err := r.rec.Reconcile(ctx, schema.Lease{Job: -j.ID, Attempt: j.Attempt, Owner: r.rec.session.id})
	outcome := "succeeded"
	if err != nil {
		outcome = "failed"
	}
	r.rec.log.Info("job", "job_kind", j.Kind, "attempt", j.Attempt, "duration_ms", time.Since(start).Milliseconds(),
		"outcome", outcome, "repairs", n)
	return err
}

// Reconcile runs one reconcile pass on this node and returns how many
// repairs it made. lease identifies the pass in engine leases.
func (rec *Reconciler) Reconcile(ctx context.Context, lease schema.Lease) (int, error) {
	rts, vols, err := rec.backend.List(ctx)
	if err != nil {
		return 0, backendErr("list engines", err)
	}
	q := schema.New(rec.pool)
	rows, err := q.EnginesOnNode(ctx, rec.node)
	if err != nil {
		return 0, err
	}
	byID := make(map[string]orch.Engine, len(rows))
	for _, e := range rows {
		byID[e.ID] = e
	}
	repairs := 0
	audit := func(e orch.Engine, what string, meta map[string]any) {
		if meta == nil {
			meta = map[string]any{}
		}
		meta["repair"] = what
		err := q.InsertAudit(ctx, orch.AuditEntry{ProductID: e.ProductID, UserID: e.UserID, EngineID: e.ID,
			Action: orch.ActionReconcile, Actor: orch.ActorSystem, Metadata: meta})
		if err != nil {
			rec.log.Warn("audit reconcile", "error", err)
		}
		rec.log.Info("reconcile repair", "engine_id", e.ID, "repair", what)
		repairs++
	}

	// Orphan containers: labelled, no row, past the grace period.
	present := map[string]orch.RuntimeInfo{}
	for _, rt := range rts {
		present[rt.EngineID] = rt
		if _, ok := byID[rt.EngineID]; ok {
			continue
		}
		if time.Since(rt.CreatedAt) < rec.cfg.OrphanGrace {
			continue
		}
		if rt.NoFleet {
			// Made by an older version, before fleets were labelled: it
			// may be another deployment's on this host. Never removed.
			rec.log.Warn("container kept: no fleet label and no engine row here; it may be another deployment's, remove it by hand once you are sure",
				"engine_id", rt.EngineID, "container", rt.Name)
			continue
		}
		// Re-check: a provision may have committed its row since we listed.
		if _, err := q.EngineByID(ctx, rt.EngineID); err == nil {
			continue
		}
		if err := rec.backend.RemoveContainer(ctx, rt.EngineID); err != nil {
			rec.log.Warn("remove orphan container", "engine_id", rt.EngineID, "error", err)
			continue
		}
		audit(orch.Engine{ID: rt.EngineID, ProductID: rt.ProductID}, "orphan_container_removed", map[string]any{"name": rt.Name})
	}
	for _, v := range vols {
		if _, ok := byID[v.EngineID]; !ok && time.Since(v.CreatedAt) > rec.cfg.OrphanGrace {
			rec.log.Warn("orphan volume kept: no engine row references it; remove it by hand once you are sure", "volume", v.Name)
		}
	}

	isolateLeft := isolateBatch
	for _, e := range rows {
		if rt, ok := present[e.ID]; ok && rt.Unisolated && isolateLeft > 0 && !e.Status.Transitional() {
			isolateLeft--
			if rec.isolate(ctx, e, rt, lease) { // isolation.go
				audit(e, "moved_to_isolated_network", nil)
			}
			continue
		}
		if e.Status.Transitional() {
			if e.StateDeadline == nil || time.Now().Before(*e.StateDeadline) {
				continue
			}
			if fixed := rec.finishStuck(ctx, e, lease); fixed != "" {
				audit(e, fixed, map[string]any{"status": string(e.Status)})
			}
			continue
		}
		if _, ok := present[e.ID]; ok || e.Status != orch.StateRunning {
			continue
		}
		// Missing container for an engine that should run: recreate it.
		got, err := q.AcquireLease(ctx, e.ID, lease, leaseUntil(ctx, rec.jobTimeout()))
		if err != nil || !got {
			continue
		}
		_, err = rec.bootAndWait(ctx, e, rec.currentSpec(e))
		rec.releaseLease(ctx, e.ID, lease)
		meta := map[string]any{}
		if err != nil {
			meta["error"] = errMessage(err)
		}
		audit(e, "container_recreated", meta)
	}
	return repairs, nil
}

// finishStuck completes a transitional state whose deadline passed and
// whose job is gone (its lease lapsed). Returns the repair made, or "".
func (rec *Reconciler) finishStuck(ctx context.Context, e orch.Engine, lease schema.Lease) string {
	q := schema.New(rec.pool)
	got, err := q.AcquireLease(ctx, e.ID, lease, leaseUntil(ctx, rec.jobTimeout()))
	if err != nil || !got {
		return ""
	}
	defer rec.releaseLease(ctx, e.ID, lease)
	switch e.Status {
	case orch.StateDestroying:
		if rec.backend.RemoveContainer(ctx, e.ID) != nil || rec.backend.RemoveVolume(ctx, e.ID) != nil {
			return ""
		}
		err := inTx(ctx, rec.pool, func(tx pgx.Tx) error {
			q := schema.New(tx)
			if err := q.DeleteEngine(ctx, e.ID); err != nil {
				return err
			}
			if e.OperationID != "" {
				return q.SetOperation(ctx, e.OperationID, orch.OpSucceeded, "", "")
			}
			return nil
		})
		if err != nil {
			return ""
		}
		return "stuck_destroy_finished"
	case orch.StateProvisioning:
		err := inTx(ctx, rec.pool, func(tx pgx.Tx) error {
			q := schema.New(tx)
			cur, err := q.EngineByIDForUpdate(ctx, e.ID)
			if err != nil || cur.Status != orch.StateProvisioning {
				return err
			}
			if _, err := q.SetEngineState(ctx, cur, schema.EngineChange{Status: orch.StateFailed, ClearDeadline: true,
				LastError: ptr("provisioning did not finish before its deadline")}); err != nil {
				return err
			}
			if err := q.InsertAudit(ctx, orch.AuditEntry{ProductID: e.ProductID, UserID: e.UserID, EngineID: e.ID,
				Action: orch.ActionProvisionFailed, Actor: orch.ActorSystem, Metadata: map[string]any{"error_code": string(orch.CodeBootTimeout), "error": "deadline passed"}}); err != nil {
				return err
			}
			if e.OperationID != "" {
				return q.SetOperation(ctx, e.OperationID, orch.OpFailed, orch.CodeBootTimeout, "provisioning did not finish before its deadline")
			}
			return nil
		})
		if err != nil {
			return ""
		}
		return "stuck_provision_failed"
	}
	return ""
}
