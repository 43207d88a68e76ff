package schema

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	orch "github.com/enginefleet/orchestrator"
)

const opCols = `id::text, product_id::text, engine_id::text, user_id, kind, status, actor, coalesce(error_code, ''),
	coalesce(error_message, ''), coalesce(deadline, 'epoch'), created_at, updated_at`

// scanOp scans opCols, and the payload column after them when p is given.
func scanOp(row pgx.Row, p ...*OpPayload) (orch.Operation, error) {
	var o orch.Operation
	var kind, status, code string
	var raw []byte
	dest := []any{&o.ID, &o.ProductID, &o.EngineID, &o.UserID, &kind, &status, &o.Actor, &code, &o.ErrorMessage, &o.Deadline, &o.CreatedAt, &o.UpdatedAt}
	if len(p) > 0 {
		dest = append(dest, &raw)
	}
	err := row.Scan(dest...)
	if errors.Is(err, pgx.ErrNoRows) {
		return o, orch.Errorf(orch.CodeOperationNotFound, "operation not found")
	}
	if err != nil {
		return o, fmt.Errorf("scan operation: %w", err)
	}
	o.Kind, o.Status, o.ErrorCode = orch.OpKind(kind), orch.OpStatus(status), orch.Code(code)
	if o.Deadline.Unix() == 0 {
		o.Deadline = time.Time{} // recorded before operations had deadlines
	}
	if len(p) > 0 {
		if err := json.Unmarshal(raw, p[0]); err != nil {
			return o, fmt.Errorf("decode operation payload: %w", err)
		}
	}
	return o, nil
}

// OpPayload carries an operation's inputs that must not travel in job args.
type OpPayload struct {
	KeyHash  string `json:"key_hash,omitempty"`
	KeyEnc   string `json:"key_enc,omitempty"` // Fernet token, never plaintext
	Image    string `json:"image,omitempty"`
	BackupID string `json:"backup_id,omitempty"`
}

// InsertOperation records a new pending operation worked by River job
// jobID, ending by o.Deadline at the latest.
func (q *Queries) InsertOperation(ctx context.Context, o orch.Operation, payload OpPayload, jobID int64) error {
	b, err := json.Marshal(payload)
	if err != nil {
		return fmt.Errorf("encode operation payload: %w", err)
	}
	var deadline *time.Time
	if !o.Deadline.IsZero() {
		deadline = &o.Deadline
	}
	_, err = q.db.Exec(ctx, `INSERT INTO operations (id, product_id, engine_id, user_id, kind, status, actor, payload, job_id, deadline)
		VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7, $8, $9)`, o.ID, o.ProductID, o.EngineID, o.UserID, string(o.Kind), o.Actor, b,
		jobID, deadline)
	if err != nil {
		return fmt.Errorf("insert operation: %w", err)
	}
	return nil
}

// GetOperation returns a product's operation; OPERATION_NOT_FOUND if none.
func (q *Queries) GetOperation(ctx context.Context, productID, id string) (orch.Operation, error) {
	if !isUUID(id) {
		return orch.Operation{}, orch.Errorf(orch.CodeOperationNotFound, "operation not found")
	}
	return scanOp(q.db.QueryRow(ctx, `SELECT `+opCols+` FROM operations WHERE id = $1 AND product_id = $2`, id, productID))
}

// OperationByID returns an operation and its payload (workers).
func (q *Queries) OperationByID(ctx context.Context, id string) (orch.Operation, OpPayload, error) {
	var p OpPayload
	o, err := scanOp(q.db.QueryRow(ctx, `SELECT `+opCols+`, payload FROM operations WHERE id = $1`, id), &p)
	return o, p, err
}

// SetOperation moves an unfinished operation to status (with an error
// when failed) and notifies waiters in the same transaction. A finished
// operation never changes again.
func (q *Queries) SetOperation(ctx context.Context, id string, status orch.OpStatus, code orch.Code, msg string) error {
	_, err := q.db.Exec(ctx, `UPDATE operations SET status = $2, error_code = nullif($3, ''), error_message = nullif($4, ''), updated_at = now()
		WHERE id = $1 AND status IN ('pending', 'running')`, id, string(status), string(code), msg)
	if err != nil {
		return fmt.Errorf("update operation: %w", err)
	}
	return q.Notify(ctx, ChannelOps, id)
}

// AbandonedOperation is an unfinished operation that nothing will finish:
// its job is finalised or gone, or its deadline passed.
type AbandonedOperation struct {
	orch.Operation
	JobID      int64  // 0: none recorded
	JobState   string // River state of the job; "" when the job is gone
	EngineGone bool   // the engine row no longer exists
}

// AbandonedOperations lists up to limit operations on node's engines (or
// on engines that are gone) that are unfinished although their job is
// completed, cancelled, discarded or deleted, or whose deadline passed
// while their job is not running. Operations recorded before jobs and
// deadlines were (no job id, no deadline) count after 15 minutes.
func (q *Queries) AbandonedOperations(ctx context.Context, node string, limit int) ([]AbandonedOperation, error) {
	rows, err := q.db.Query(ctx, `SELECT o.id::text, o.product_id::text, o.engine_id::text, o.user_id, o.kind, o.status, o.actor,
			coalesce(o.error_code, ''), coalesce(o.error_message, ''), coalesce(o.deadline, 'epoch'), o.created_at, o.updated_at,
			coalesce(o.job_id, 0), coalesce(j.state::text, ''), e.id IS NULL
		FROM operations o
		LEFT JOIN river_job j ON j.id = o.job_id
		LEFT JOIN engines e ON e.id = o.engine_id
		WHERE o.status IN ('pending', 'running')
		AND (e.id IS NULL OR e.node = $1)
		AND ((o.job_id IS NOT NULL AND (j.id IS NULL OR j.state IN ('completed', 'cancelled', 'discarded')))
			OR (o.deadline < now() AND (j.id IS NULL OR j.state <> 'running'))
			OR (o.job_id IS NULL AND o.deadline IS NULL AND o.created_at < now() - interval '15 minutes'))
		ORDER BY o.created_at LIMIT $2`, node, limit)
	return collect(rows, err, "abandoned operations", func(r pgx.Row) (AbandonedOperation, error) {
		var a AbandonedOperation
		var kind, status, code string
		err := r.Scan(&a.ID, &a.ProductID, &a.EngineID, &a.UserID, &kind, &status, &a.Actor, &code, &a.ErrorMessage,
			&a.Deadline, &a.CreatedAt, &a.UpdatedAt, &a.JobID, &a.JobState, &a.EngineGone)
		a.Kind, a.Status, a.ErrorCode = orch.OpKind(kind), orch.OpStatus(status), orch.Code(code)
		if a.Deadline.Unix() == 0 {
			a.Deadline = time.Time{}
		}
		return a, err
	})
}
