package schema

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	orch "github.com/enginefleet/orchestrator"
)

const engineCols = `id::text, product_id::text, user_id, status, node, port, engine_version,
	engine_key_hash, engine_key_enc, coalesce(prev_key_hash, ''), prev_key_expires_at,
	boot_duration_ms, health_failures, restart_attempts, last_health_at, last_active_at,
	coalesce(sleep_reason, ''), slept_at, state_deadline, coalesce(operation_id::text, ''),
	coalesce(last_error, ''), created_at, updated_at`

func scanEngine(row pgx.Row) (orch.Engine, error) {
	var e orch.Engine
	var status string
	err := row.Scan(&e.ID, &e.ProductID, &e.UserID, &status, &e.Node, &e.Port, &e.EngineVersion,
		&e.KeyHash, &e.KeyEnc, &e.PrevKeyHash, &e.PrevKeyExpiresAt,
		&e.BootDurationMS, &e.HealthFailures, &e.RestartAttempts, &e.LastHealthAt, &e.LastActiveAt,
		&e.SleepReason, &e.SleptAt, &e.StateDeadline, &e.OperationID,
		&e.LastError, &e.CreatedAt, &e.UpdatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return e, orch.Errorf(orch.CodeEngineNotFound, "engine not found")
	}
	if err != nil {
		return e, fmt.Errorf("scan engine: %w", err)
	}
	e.Status = orch.State(status)
	return e, nil
}

func collectEngines(rows pgx.Rows, err error) ([]orch.Engine, error) {
	return collect(rows, err, "query engines", scanEngine)
}

// EngineByUser returns a product's engine for user; ENGINE_NOT_FOUND if none.
// This is admit's one indexed read.
func (q *Queries) EngineByUser(ctx context.Context, productID, userID string) (orch.Engine, error) {
	return scanEngine(q.db.QueryRow(ctx, `SELECT `+engineCols+` FROM engines WHERE product_id = $1 AND user_id = $2`, productID, userID))
}

// EngineByUserForUpdate is EngineByUser locking the row for the transaction.
func (q *Queries) EngineByUserForUpdate(ctx context.Context, productID, userID string) (orch.Engine, error) {
	return scanEngine(q.db.QueryRow(ctx, `SELECT `+engineCols+` FROM engines WHERE product_id = $1 AND user_id = $2 FOR UPDATE`, productID, userID))
}

// EngineByID returns an engine by id; ENGINE_NOT_FOUND if none.
func (q *Queries) EngineByID(ctx context.Context, id string) (orch.Engine, error) {
	return scanEngine(q.db.QueryRow(ctx, `SELECT `+engineCols+` FROM engines WHERE id = $1`, id))
}

// EngineByIDForUpdate locks the engine row for the transaction.
func (q *Queries) EngineByIDForUpdate(ctx context.Context, id string) (orch.Engine, error) {
	return scanEngine(q.db.QueryRow(ctx, `SELECT `+engineCols+` FROM engines WHERE id = $1 FOR UPDATE`, id))
}

// LockProduct serializes quota checks and inserts for one product until
// the transaction ends.
func (q *Queries) LockProduct(ctx context.Context, productID string) error {
	var id string
	err := q.db.QueryRow(ctx, `SELECT id::text FROM products WHERE id = $1 FOR UPDATE`, productID).Scan(&id)
	if errors.Is(err, pgx.ErrNoRows) {
		return orch.Errorf(orch.CodeProductNotFound, "product not found")
	}
	if err != nil {
		return fmt.Errorf("lock product: %w", err)
	}
	return nil
}

// CountEngines counts a product's engines in any state (quota).
func (q *Queries) CountEngines(ctx context.Context, productID string) (int, error) {
	var n int
	if err := q.db.QueryRow(ctx, `SELECT count(*) FROM engines WHERE product_id = $1`, productID).Scan(&n); err != nil {
		return 0, fmt.Errorf("count engines: %w", err)
	}
	return n, nil
}

// FreePort returns the lowest port in [min, max] no engine on node holds
// and the node has not refused lately (port_blocks, see ports.go), under a
// transaction-scoped lock per node (LockPorts) so concurrent provisions on
// any replica pick different ports (the unique (node, port) constraint is
// the final guarantee). PORT_EXHAUSTION when none is free.
func (q *Queries) FreePort(ctx context.Context, node string, min, max int) (int, error) {
	if err := q.LockPorts(ctx, node); err != nil {
		return 0, err
	}
	var port *int
	err := q.db.QueryRow(ctx, `SELECT min(p) FROM generate_series($2::int, $3::int) AS p
		WHERE NOT EXISTS (SELECT 1 FROM engines WHERE node = $1 AND port = p)
		  AND NOT EXISTS (SELECT 1 FROM port_blocks b WHERE b.node = $1 AND b.port = p AND b.blocked_until > now())`, node, min, max).Scan(&port)
	if err != nil {
		return 0, fmt.Errorf("find free port: %w", err)
	}
	if port == nil {
		return 0, orch.Errorf(orch.CodePortExhaustion, "no free port in %d-%d: widen ORCH_PORT_MAX", min, max)
	}
	return *port, nil
}

// InsertEngine records a new engine (status provisioning).
func (q *Queries) InsertEngine(ctx context.Context, e orch.Engine) error {
	_, err := q.db.Exec(ctx, `INSERT INTO engines (id, product_id, user_id, status, node, port, engine_version,
			engine_key_hash, engine_key_enc, state_deadline, operation_id, last_active_at)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, now())`,
		e.ID, e.ProductID, e.UserID, string(e.Status), e.Node, e.Port, e.EngineVersion,
		e.KeyHash, e.KeyEnc, e.StateDeadline, nullUUID(e.OperationID))
	if isUniqueViolation(err, "engines_product_id_user_id_key") {
		return orch.Errorf(orch.CodeEngineAlreadyExists, "an engine already exists for this user")
	}
	if isUniqueViolation(err, "engines_node_port_key") {
		return orch.Errorf(orch.CodePortExhaustion, "port %d was taken concurrently", e.Port)
	}
	if err != nil {
		return fmt.Errorf("insert engine: %w", err)
	}
	return nil
}

// ListEngines returns a product's engines (optionally of one status), newest
// first, and the total matching.
func (q *Queries) ListEngines(ctx context.Context, productID string, status orch.State, limit, offset int) ([]orch.Engine, int, error) {
	es, err := collectEngines(q.db.Query(ctx, `SELECT `+engineCols+` FROM engines
		WHERE product_id = $1 AND ($2 = '' OR status = $2) ORDER BY created_at DESC, id LIMIT $3 OFFSET $4`,
		productID, string(status), limit, offset))
	if err != nil {
		return nil, 0, err
	}
	var total int
	if err := q.db.QueryRow(ctx, `SELECT count(*) FROM engines WHERE product_id = $1 AND ($2 = '' OR status = $2)`,
		productID, string(status)).Scan(&total); err != nil {
		return nil, 0, fmt.Errorf("count engines: %w", err)
	}
	return es, total, nil
}

// EngineChange is a state transition and the fields that change with it.
// Nil pointers leave a column alone.
type EngineChange struct {
	Status          orch.State
	BootDurationMS  *int64
	ResetHealth     bool // health_failures = 0, last_health_at = now
	RestartAttempts *int
	EngineVersion   *string
	KeyHash         *string
	KeyEnc          *string
	PrevKeyHash     *string // "" clears
	PrevKeyExpires  *time.Time
	SleepReason     *string // "" clears sleep_reason and slept_at
	ClearDeadline   bool
	Deadline        *time.Time
	LastError       *string
	OperationID     *string // "" clears
}

// SetEngineState applies a transition, refusing any the state machine
// does not allow (INVALID_STATE). The caller holds the row lock.
func (q *Queries) SetEngineState(ctx context.Context, e orch.Engine, c EngineChange) (orch.Engine, error) {
	if !orch.CanTransition(e.Status, c.Status) {
		return e, orch.Errorf(orch.CodeInvalidState, "engine cannot go from %s to %s", e.Status, c.Status)
	}
	var prevClear, sleepClear bool
	if c.PrevKeyHash != nil && *c.PrevKeyHash == "" {
		prevClear = true
	}
	if c.SleepReason != nil && *c.SleepReason == "" {
		sleepClear = true
	}
	var opClear bool
	if c.OperationID != nil && *c.OperationID == "" {
		opClear = true
	}
	return scanEngine(q.db.QueryRow(ctx, `UPDATE engines SET
			status = $2,
			boot_duration_ms = coalesce($3, boot_duration_ms),
			health_failures = CASE WHEN $4 THEN 0 ELSE health_failures END,
			last_health_at = CASE WHEN $4 THEN now() ELSE last_health_at END,
			restart_attempts = coalesce($5, restart_attempts),
			engine_version = coalesce($6, engine_version),
			engine_key_hash = coalesce($7, engine_key_hash),
			engine_key_enc = coalesce($8, engine_key_enc),
			prev_key_hash = CASE WHEN $9 THEN NULL ELSE coalesce($10, prev_key_hash) END,
			prev_key_expires_at = CASE WHEN $9 THEN NULL ELSE coalesce($11, prev_key_expires_at) END,
			sleep_reason = CASE WHEN $12 THEN NULL ELSE coalesce($13, sleep_reason) END,
			slept_at = CASE WHEN $12 THEN NULL WHEN $13::text IS NOT NULL THEN now() ELSE slept_at END,
			state_deadline = CASE WHEN $14 THEN NULL ELSE coalesce($15, state_deadline) END,
			last_error = coalesce($16, last_error),
			operation_id = CASE WHEN $17 THEN NULL ELSE coalesce($18::uuid, operation_id) END,
			updated_at = now()
		WHERE id = $1 RETURNING `+engineCols,
		e.ID, string(c.Status), c.BootDurationMS, c.ResetHealth, c.RestartAttempts, c.EngineVersion,
		c.KeyHash, c.KeyEnc, prevClear, emptyNil(c.PrevKeyHash), c.PrevKeyExpires,
		sleepClear, emptyNil(c.SleepReason), c.ClearDeadline, c.Deadline, c.LastError,
		opClear, emptyNil(c.OperationID)))
}

func emptyNil(s *string) *string {
	if s == nil || *s == "" {
		return nil
	}
	return s
}

// DeleteEngine removes the row (destroy's last step); the port is free again.
func (q *Queries) DeleteEngine(ctx context.Context, id string) error {
	if _, err := q.db.Exec(ctx, `DELETE FROM engines WHERE id = $1`, id); err != nil {
		return fmt.Errorf("delete engine: %w", err)
	}
	return nil
}

// TouchActivity records an admit (idle detection); callers throttle it.
func (q *Queries) TouchActivity(ctx context.Context, id string) error {
	if _, err := q.db.Exec(ctx, `UPDATE engines SET last_active_at = now() WHERE id = $1`, id); err != nil {
		return fmt.Errorf("touch activity: %w", err)
	}
	return nil
}

// StatusCounts returns a product's engine count per status.
func (q *Queries) StatusCounts(ctx context.Context, productID string) (map[orch.State]int, error) {
	rows, err := q.db.Query(ctx, `SELECT status, count(*) FROM engines WHERE product_id = $1 GROUP BY status`, productID)
	if err != nil {
		return nil, fmt.Errorf("status counts: %w", err)
	}
	defer rows.Close()
	out := map[orch.State]int{}
	for rows.Next() {
		var s string
		var n int
		if err := rows.Scan(&s, &n); err != nil {
			return nil, fmt.Errorf("status counts: %w", err)
		}
		out[orch.State(s)] = n
	}
	return out, rows.Err()
}

// EnginesOnNode returns every engine row of a node (reconcile).
func (q *Queries) EnginesOnNode(ctx context.Context, node string) ([]orch.Engine, error) {
	return collectEngines(q.db.Query(ctx, `SELECT `+engineCols+` FROM engines WHERE node = $1`, node))
}
