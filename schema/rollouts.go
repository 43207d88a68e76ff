package schema

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	orch "github.com/enginefleet/orchestrator"
)

// This file holds the fleet rollout queries: the rollout row, the engines
// it covers with their wave and status, and the few set-based statements
// its driver job runs per tick (settle finished operations, apply the
// health gate, pick the next engines). Every statement is per rollout and
// indexed, so a tick over thousands of engines is a handful of queries.

const rolloutCols = `id::text, coalesce(product_id::text, ''), image, status, waves, bake_seconds, failure_budget,
	max_concurrent, in_use_seconds, current_wave, wave_started_at, wave_done_at, coalesce(stop_reason, ''), actor,
	created_at, updated_at, finished_at`

func scanRollout(row pgx.Row) (orch.Rollout, error) {
	var r orch.Rollout
	var status string
	var waves []int32
	var bake, inUse int32
	var budget, maxc, cur int32
	err := row.Scan(&r.ID, &r.ProductID, &r.Image, &status, &waves, &bake, &budget, &maxc, &inUse, &cur,
		&r.WaveStartedAt, &r.WaveDoneAt, &r.StopReason, &r.Actor, &r.CreatedAt, &r.UpdatedAt, &r.FinishedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return r, orch.Errorf(orch.CodeRolloutNotFound, "rollout not found")
	}
	if err != nil {
		return r, fmt.Errorf("read rollout: %w", err)
	}
	r.Status = orch.RolloutStatus(status)
	for _, w := range waves {
		r.Waves = append(r.Waves, int(w))
	}
	r.Bake, r.InUse = time.Duration(bake)*time.Second, time.Duration(inUse)*time.Second
	r.FailureBudget, r.MaxConcurrent, r.CurrentWave = int(budget), int(maxc), int(cur)
	return r, nil
}

// InsertRollout records a new rollout (its engines come with
// InsertRolloutEngines, in the same transaction).
func (q *Queries) InsertRollout(ctx context.Context, r orch.Rollout) error {
	_, err := q.db.Exec(ctx, `INSERT INTO rollouts (id, product_id, image, status, waves, bake_seconds, failure_budget,
		max_concurrent, in_use_seconds, current_wave, wave_started_at, actor)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, now(), $10)`,
		r.ID, nullUUID(r.ProductID), r.Image, string(r.Status), r.Waves, int(r.Bake/time.Second), r.FailureBudget,
		r.MaxConcurrent, int(r.InUse/time.Second), r.Actor)
	if err != nil {
		return fmt.Errorf("insert rollout: %w", err)
	}
	return nil
}

// RolloutOwners lists the active rollouts that own one of the engines a
// new rollout over productID ("" = all) would cover, after releasing the
// engines of finished rollouts (a completed rollout keeps its sleeping
// engines until they wake; a new rollout takes them over).
func (q *Queries) RolloutOwners(ctx context.Context, productID string) ([]string, error) {
	if _, err := q.db.Exec(ctx, `UPDATE rollout_engines re
		SET active = false, status = CASE WHEN re.status = 'lazy' THEN 'cancelled' ELSE re.status END, updated_at = now()
		FROM rollouts r
		WHERE r.id = re.rollout_id AND re.active AND r.status NOT IN ('running', 'paused', 'rolling_back')
		  AND ($1::uuid IS NULL OR re.product_id = $1)`, nullUUID(productID)); err != nil {
		return nil, fmt.Errorf("release finished rollouts' engines: %w", err)
	}
	rows, err := q.db.Query(ctx, `SELECT DISTINCT rollout_id::text FROM rollout_engines
		WHERE active AND ($1::uuid IS NULL OR product_id = $1) ORDER BY 1`, nullUUID(productID))
	return collect(rows, err, "rollout owners", func(r pgx.Row) (string, error) {
		var s string
		return s, r.Scan(&s)
	})
}

// InsertRolloutEngines records every engine of productID ("" = all) not
// already on the rollout's image (and not being destroyed), then spreads
// them over waves (engines per wave, as resolve makes them from the count)
// in an order fixed by the rollout id: a canary is a stable random sample.
// Returns the waves. OPERATION_IN_PROGRESS when another active rollout
// owns one of the engines (the unique index is the last word on a race).
func (q *Queries) InsertRolloutEngines(ctx context.Context, r orch.Rollout, resolve func(n int) ([]int, error)) ([]int, error) {
	tag, err := q.db.Exec(ctx, `INSERT INTO rollout_engines (rollout_id, engine_id, product_id, user_id, wave, from_image)
		SELECT $1, id, product_id, user_id, 0, engine_version FROM engines
		WHERE ($2::uuid IS NULL OR product_id = $2) AND engine_version <> $3 AND status <> 'destroying'`,
		r.ID, nullUUID(r.ProductID), r.Image)
	if isUniqueViolation(err, "rollout_engines_one_active") {
		return nil, orch.Errorf(orch.CodeOperationInProgress, "another rollout is running over some of these engines")
	}
	if err != nil {
		return nil, fmt.Errorf("insert rollout engines: %w", err)
	}
	waves, err := resolve(int(tag.RowsAffected()))
	if err != nil {
		return nil, err
	}
	bounds := make([]int, len(waves))
	sum := 0
	for i, w := range waves {
		sum += w
		bounds[i] = sum
	}
	if _, err := q.db.Exec(ctx, `UPDATE rollout_engines re SET wave = w.wave
		FROM (SELECT engine_id, (SELECT count(*) FROM unnest($2::int[]) AS b WHERE b < rn) AS wave
		      FROM (SELECT engine_id, row_number() OVER (ORDER BY md5(engine_id::text || $1::text)) AS rn
		            FROM rollout_engines WHERE rollout_id = $1) x) w
		WHERE re.rollout_id = $1 AND re.engine_id = w.engine_id`, r.ID, bounds); err != nil {
		return nil, fmt.Errorf("assign rollout waves: %w", err)
	}
	if _, err := q.db.Exec(ctx, `UPDATE rollouts SET waves = $2 WHERE id = $1`, r.ID, waves); err != nil {
		return nil, fmt.Errorf("record rollout waves: %w", err)
	}
	return waves, nil
}

// Rollout reads a rollout; productID ("" = any) limits it to a product's
// own (NOT_FOUND otherwise, and for a fleet-wide one).
func (q *Queries) Rollout(ctx context.Context, id, productID string) (orch.Rollout, error) {
	return scanRollout(q.db.QueryRow(ctx, `SELECT `+rolloutCols+` FROM rollouts
		WHERE id = $1::uuid AND ($2 = '' OR product_id = nullif($2, '')::uuid)`, id, productID))
}

// RolloutForUpdate reads and locks a rollout (the driver's tick and the
// human actions serialize on it).
func (q *Queries) RolloutForUpdate(ctx context.Context, id string) (orch.Rollout, error) {
	return scanRollout(q.db.QueryRow(ctx, `SELECT `+rolloutCols+` FROM rollouts WHERE id = $1 FOR UPDATE`, id))
}

// Rollouts lists rollouts newest first (productID "" = all of them).
func (q *Queries) Rollouts(ctx context.Context, productID string, limit int) ([]orch.Rollout, error) {
	rows, err := q.db.Query(ctx, `SELECT `+rolloutCols+` FROM rollouts
		WHERE ($1 = '' OR product_id = nullif($1, '')::uuid) ORDER BY created_at DESC LIMIT $2`, productID, limit)
	return collect(rows, err, "list rollouts", scanRollout)
}

// ActiveRollouts lists the ids of the rollouts still being worked.
func (q *Queries) ActiveRollouts(ctx context.Context) ([]string, error) {
	rows, err := q.db.Query(ctx, `SELECT id::text FROM rollouts WHERE status IN ('running', 'paused', 'rolling_back') ORDER BY created_at`)
	return collect(rows, err, "active rollouts", func(r pgx.Row) (string, error) {
		var s string
		return s, r.Scan(&s)
	})
}

// RolloutChange is what a tick or a human changes on a rollout row.
type RolloutChange struct {
	Status      orch.RolloutStatus // "" = unchanged
	StopReason  *string
	NextWave    bool // current_wave + 1, wave_started_at = now, wave_done_at cleared
	WaveDone    bool // wave_done_at = now (when unset)
	Progress    bool // progress_at = now
	Finished    bool // finished_at = now; every engine row released but those going back on wake
	ClearReason bool
}

// SetRollout applies a change to a rollout row.
func (q *Queries) SetRollout(ctx context.Context, id string, c RolloutChange) error {
	_, err := q.db.Exec(ctx, `UPDATE rollouts SET
		status = coalesce(nullif($2, ''), status),
		stop_reason = CASE WHEN $8 THEN NULL ELSE coalesce($3, stop_reason) END,
		current_wave = current_wave + CASE WHEN $4 THEN 1 ELSE 0 END,
		wave_started_at = CASE WHEN $4 THEN now() ELSE wave_started_at END,
		wave_done_at = CASE WHEN $4 THEN NULL WHEN $5 THEN coalesce(wave_done_at, now()) ELSE wave_done_at END,
		progress_at = CASE WHEN $6 OR $4 THEN now() ELSE progress_at END,
		finished_at = CASE WHEN $7 THEN now() ELSE finished_at END,
		updated_at = now()
		WHERE id = $1`, id, string(c.Status), c.StopReason, c.NextWave, c.WaveDone, c.Progress, c.Finished, c.ClearReason)
	if err != nil {
		return fmt.Errorf("update rollout: %w", err)
	}
	if c.Finished {
		// A completed rollout keeps its sleeping engines (they take the new
		// image on wake); one that rolled back keeps those going back on
		// wake. Everything else is released to the next rollout.
		if _, err := q.db.Exec(ctx, `UPDATE rollout_engines SET
			status = CASE WHEN status IN ('pending', 'lazy') AND $2 <> 'completed' THEN 'cancelled' ELSE status END,
			active = (status = 'rollback_lazy' OR (status = 'lazy' AND $2 = 'completed')), updated_at = now()
			WHERE rollout_id = $1 AND active`, id, string(c.Status)); err != nil {
			return fmt.Errorf("release rollout engines: %w", err)
		}
	}
	return nil
}

// RolloutCount is the engines of one wave in one status.
type RolloutCount struct {
	Wave   int
	Status orch.RolloutEngineStatus
	N      int
}

// RolloutCounts counts a rollout's engines by wave and status.
func (q *Queries) RolloutCounts(ctx context.Context, id string) ([]RolloutCount, error) {
	rows, err := q.db.Query(ctx, `SELECT wave, status, count(*) FROM rollout_engines WHERE rollout_id = $1
		GROUP BY 1, 2 ORDER BY 1, 2`, id)
	return collect(rows, err, "count rollout engines", func(r pgx.Row) (RolloutCount, error) {
		var c RolloutCount
		var st string
		err := r.Scan(&c.Wave, &st, &c.N)
		c.Status = orch.RolloutEngineStatus(st)
		return c, err
	})
}

// RolloutEngine is one engine of a rollout.
type RolloutEngine struct {
	EngineID    string
	ProductID   string
	UserID      string
	Wave        int
	FromImage   string
	Status      orch.RolloutEngineStatus
	OperationID string
	Error       string
	UpdatedAt   time.Time
}

const rolloutEngineCols = `engine_id::text, product_id::text, user_id, wave, from_image, status,
	coalesce(operation_id::text, ''), coalesce(error, ''), updated_at`

func scanRolloutEngine(r pgx.Row) (RolloutEngine, error) {
	var e RolloutEngine
	var st string
	err := r.Scan(&e.EngineID, &e.ProductID, &e.UserID, &e.Wave, &e.FromImage, &st, &e.OperationID, &e.Error, &e.UpdatedAt)
	e.Status = orch.RolloutEngineStatus(st)
	return e, err
}

// RolloutFailures lists a rollout's engines that failed (or whose
// rollback failed), most recent first, at most limit.
func (q *Queries) RolloutFailures(ctx context.Context, id string, limit int) ([]RolloutEngine, error) {
	rows, err := q.db.Query(ctx, `SELECT `+rolloutEngineCols+` FROM rollout_engines
		WHERE rollout_id = $1 AND (status IN ('failed', 'rollback_failed') OR error IS NOT NULL)
		ORDER BY updated_at DESC LIMIT $2`, id, limit)
	return collect(rows, err, "rollout failures", scanRolloutEngine)
}

// RolloutEngines lists a rollout's engines (status "" = any), by wave.
func (q *Queries) RolloutEngines(ctx context.Context, id string, status orch.RolloutEngineStatus, limit int) ([]RolloutEngine, error) {
	rows, err := q.db.Query(ctx, `SELECT `+rolloutEngineCols+` FROM rollout_engines
		WHERE rollout_id = $1 AND ($2 = '' OR status = $2) ORDER BY wave, engine_id LIMIT $3`, id, string(status), limit)
	return collect(rows, err, "rollout engines", scanRolloutEngine)
}

// SettledEngine is an engine whose upgrade (or rollback) operation ended.
type SettledEngine struct {
	EngineID  string
	ProductID string
	UserID    string
	Wave      int
	Status    orch.RolloutEngineStatus // the new status
	Error     string
}

// SettleRolloutOps moves the engines whose operation ended: an upgrade
// that succeeded → upgraded, one that failed → failed (the upgrade rolled
// that engine back itself), one superseded or whose engine went → skipped;
// a rollback that succeeded → rolled_back, one that failed →
// rollback_failed. Returns the engines moved.
func (q *Queries) SettleRolloutOps(ctx context.Context, id string) ([]SettledEngine, error) {
	rows, err := q.db.Query(ctx, `UPDATE rollout_engines re SET
		status = CASE
			WHEN re.status = 'upgrading' AND o.status = 'succeeded' THEN 'upgraded'
			WHEN re.status = 'upgrading' AND o.error_code IN ('OPERATION_IN_PROGRESS', 'ENGINE_NOT_FOUND') THEN 'skipped'
			WHEN re.status = 'upgrading' THEN 'failed'
			WHEN o.status = 'succeeded' OR o.error_code = 'ENGINE_NOT_FOUND' THEN 'rolled_back'
			ELSE 'rollback_failed' END,
		error = CASE WHEN o.status = 'failed' THEN coalesce(o.error_code, 'FAILED') || ': ' || coalesce(o.error_message, '') ELSE re.error END,
		upgraded_at = CASE WHEN o.status = 'succeeded' THEN now() ELSE re.upgraded_at END,
		updated_at = now()
		FROM operations o
		WHERE re.rollout_id = $1 AND re.status IN ('upgrading', 'rolling_back') AND o.id = re.operation_id
		  AND o.status IN ('succeeded', 'failed')
		RETURNING re.engine_id::text, re.product_id::text, re.user_id, re.wave, re.status, coalesce(re.error, '')`, id)
	return collect(rows, err, "settle rollout operations", scanSettled)
}

func scanSettled(r pgx.Row) (SettledEngine, error) {
	var s SettledEngine
	var st string
	err := r.Scan(&s.EngineID, &s.ProductID, &s.UserID, &s.Wave, &st, &s.Error)
	s.Status = orch.RolloutEngineStatus(st)
	return s, err
}

// RolloutHealthGate marks failed the upgraded engines of a rollout that
// have not stayed healthy on its image: the engine went failed (health
// sweep, crash), failed a probe since, or was auto-restarted. A failure is
// sticky: the engine counts against its wave's budget from then on.
func (q *Queries) RolloutHealthGate(ctx context.Context, r orch.Rollout) ([]SettledEngine, error) {
	rows, err := q.db.Query(ctx, `UPDATE rollout_engines re SET status = 'failed', updated_at = now(),
		error = CASE WHEN e.status = 'failed' THEN 'engine failed on the new image: ' || coalesce(e.last_error, 'health checks failed')
		             WHEN e.restart_attempts > 0 THEN 'engine was restarted after a crash on the new image'
		             ELSE 'engine failed a health probe on the new image' END
		FROM engines e
		WHERE re.rollout_id = $1 AND re.status = 'upgraded' AND e.id = re.engine_id AND e.engine_version = $2
		  AND (e.status = 'failed' OR e.health_failures > 0 OR e.restart_attempts > 0)
		RETURNING re.engine_id::text, re.product_id::text, re.user_id, re.wave, re.status, re.error`, r.ID, r.Image)
	return collect(rows, err, "rollout health gate", scanSettled)
}

// RolloutCandidate is a pending engine of a rollout as its row stands now.
type RolloutCandidate struct {
	RolloutEngine
	Exists bool // the engine row is still there
	State  orch.State
	InUse  bool // active within the rollout's in-use window
	Busy   bool // an operation is in flight on it
}

// RolloutCandidates lists up to limit engines of wave in one of statuses
// with their engine's state now, those not in use and not busy first (so
// an engine a user holds never blocks the ones behind it).
func (q *Queries) RolloutCandidates(ctx context.Context, r orch.Rollout, wave int, statuses []orch.RolloutEngineStatus, limit int) ([]RolloutCandidate, error) {
	st := make([]string, len(statuses))
	for i, s := range statuses {
		st[i] = string(s)
	}
	rows, err := q.db.Query(ctx, `SELECT re.engine_id::text, re.product_id::text, re.user_id, re.wave, re.from_image, re.status,
			coalesce(re.operation_id::text, ''), coalesce(re.error, ''), re.updated_at,
			e.id IS NOT NULL, coalesce(e.status, ''),
			coalesce($4 > 0 AND e.last_active_at > now() - make_interval(secs => $4), false) AS in_use,
			coalesce(EXISTS (SELECT 1 FROM operations o WHERE o.id = e.operation_id AND o.status IN ('pending', 'running')), false) AS busy
		FROM rollout_engines re LEFT JOIN engines e ON e.id = re.engine_id
		WHERE re.rollout_id = $1 AND re.active AND ($2 < 0 OR re.wave = $2) AND re.status = ANY($3)
		ORDER BY 12, 13, md5(re.engine_id::text || re.rollout_id::text) LIMIT $5`,
		r.ID, wave, st, int(r.InUse/time.Second), limit)
	return collect(rows, err, "rollout candidates", func(row pgx.Row) (RolloutCandidate, error) {
		var c RolloutCandidate
		var es, st string
		err := row.Scan(&c.EngineID, &c.ProductID, &c.UserID, &c.Wave, &c.FromImage, &st, &c.OperationID, &c.Error,
			&c.UpdatedAt, &c.Exists, &es, &c.InUse, &c.Busy)
		c.Status, c.State = orch.RolloutEngineStatus(st), orch.State(es)
		return c, err
	})
}

// SetRolloutEngine moves one engine of a rollout (opID "" keeps it; errMsg
// "" keeps the error).
func (q *Queries) SetRolloutEngine(ctx context.Context, id, engineID string, st orch.RolloutEngineStatus, opID, errMsg string) error {
	_, err := q.db.Exec(ctx, `UPDATE rollout_engines SET status = $3, operation_id = coalesce(nullif($4, '')::uuid, operation_id),
		error = coalesce(nullif($5, ''), error), upgraded_at = CASE WHEN $3 IN ('upgraded', 'rolled_back') THEN now() ELSE upgraded_at END,
		updated_at = now(), active = CASE WHEN $3 IN ('rolled_back', 'rollback_failed') AND
			(SELECT status FROM rollouts WHERE id = $1) NOT IN ('running', 'paused', 'rolling_back') THEN false ELSE active END
		WHERE rollout_id = $1 AND engine_id = $2`, id, engineID, string(st), opID, errMsg)
	if err != nil {
		return fmt.Errorf("update rollout engine: %w", err)
	}
	return nil
}

// EngineVersion reads an engine's image (ok false: the engine is gone).
func (q *Queries) EngineVersion(ctx context.Context, engineID string) (string, bool, error) {
	var v string
	err := q.db.QueryRow(ctx, `SELECT engine_version FROM engines WHERE id = $1`, engineID).Scan(&v)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", false, nil
	}
	if err != nil {
		return "", false, fmt.Errorf("read engine version: %w", err)
	}
	return v, true, nil
}

// WakeImage is the image a rollout wants an engine to take at its next
// wake or start: the new image of a rollout that found it asleep, or its
// previous image when that rollout rolled back meanwhile.
type WakeImage struct {
	RolloutID string
	Image     string
	Rollback  bool
}

// PendingWakeImage returns what a rollout wants engineID to boot on at its
// next start (ok false: nothing). A paused rollout hands out no new image.
func (q *Queries) PendingWakeImage(ctx context.Context, engineID string) (WakeImage, bool, error) {
	var w WakeImage
	err := q.db.QueryRow(ctx, `SELECT re.rollout_id::text, CASE WHEN re.status = 'lazy' THEN r.image ELSE re.from_image END,
			re.status = 'rollback_lazy'
		FROM rollout_engines re JOIN rollouts r ON r.id = re.rollout_id
		WHERE re.engine_id = $1 AND re.active AND (re.status = 'rollback_lazy' OR (re.status = 'lazy' AND r.status <> 'paused'))`,
		engineID).Scan(&w.RolloutID, &w.Image, &w.Rollback)
	if errors.Is(err, pgx.ErrNoRows) {
		return w, false, nil
	}
	if err != nil {
		return w, false, fmt.Errorf("read pending wake image: %w", err)
	}
	return w, true, nil
}

// WokeOnImage records that an engine took a rollout's image at its wake:
// upgraded (or failed, with errMsg) for a lazy one, rolled_back (or
// rollback_failed) for one going back. An engine of a finished rollout is
// released.
func (q *Queries) WokeOnImage(ctx context.Context, w WakeImage, engineID string, ok bool, errMsg string) error {
	st := orch.REUpgraded
	switch {
	case w.Rollback && ok:
		st = orch.RERolledBack
	case w.Rollback:
		st = orch.RERollbackFailed
	case !ok:
		st = orch.REFailed
	}
	_, err := q.db.Exec(ctx, `UPDATE rollout_engines re SET status = $3, error = coalesce(nullif($4, ''), re.error),
		upgraded_at = CASE WHEN $5 THEN now() ELSE re.upgraded_at END, updated_at = now(),
		active = r.status IN ('running', 'paused', 'rolling_back')
		FROM rollouts r WHERE r.id = re.rollout_id AND re.rollout_id = $1 AND re.engine_id = $2 AND re.active`,
		w.RolloutID, engineID, string(st), errMsg, ok)
	if err != nil {
		return fmt.Errorf("record wake image: %w", err)
	}
	_, err = q.db.Exec(ctx, `UPDATE rollouts SET progress_at = now() WHERE id = $1`, w.RolloutID)
	return err
}

// ReclaimRolloutEngines makes a finished rollout own again the engines it
// upgraded (to roll them back), except those a newer rollout owns now.
func (q *Queries) ReclaimRolloutEngines(ctx context.Context, id string) error {
	_, err := q.db.Exec(ctx, `UPDATE rollout_engines re SET active = true, updated_at = now()
		WHERE re.rollout_id = $1 AND NOT re.active AND re.status IN ('upgraded', 'failed')
		  AND NOT EXISTS (SELECT 1 FROM rollout_engines o WHERE o.engine_id = re.engine_id AND o.active)`, id)
	if err != nil {
		return fmt.Errorf("reclaim rollout engines: %w", err)
	}
	return nil
}
