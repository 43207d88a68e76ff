package schema

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	orch "github.com/enginefleet/orchestrator"
)

const opCols = `id::text, product_id::text, engine_id::text, user_id, kind, status, actor, coalesce(error_code, ''),
	coalesce(error_message, ''), created_at, updated_at`

func scanOp(row pgx.Row) (orch.Operation, error) {
	var o orch.Operation
	var kind, status, code string
	err := row.Scan(&o.ID, &o.ProductID, &o.EngineID, &o.UserID, &kind, &status, &o.Actor, &code, &o.ErrorMessage, &o.CreatedAt, &o.UpdatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return o, orch.Errorf(orch.CodeOperationNotFound, "operation not found")
	}
	if err != nil {
		return o, fmt.Errorf("scan operation: %w", err)
	}
	o.Kind, o.Status, o.ErrorCode = orch.OpKind(kind), orch.OpStatus(status), orch.Code(code)
	return o, nil
}

// OpPayload carries an operation's inputs that must not travel in job args.
type OpPayload struct {
	KeyHash  string `json:"key_hash,omitempty"`
	KeyEnc   string `json:"key_enc,omitempty"` // Fernet token, never plaintext
	Image    string `json:"image,omitempty"`
	BackupID string `json:"backup_id,omitempty"`
}

// InsertOperation records a new pending operation and notifies waiters.
func (q *Queries) InsertOperation(ctx context.Context, o orch.Operation, payload OpPayload) error {
	b, err := json.Marshal(payload)
	if err != nil {
		return fmt.Errorf("encode operation payload: %w", err)
	}
	_, err = q.db.Exec(ctx, `INSERT INTO operations (id, product_id, engine_id, user_id, kind, status, actor, payload)
		VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7)`, o.ID, o.ProductID, o.EngineID, o.UserID, string(o.Kind), o.Actor, b)
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
	var raw []byte
	o, err := scanOp(q.db.QueryRow(ctx, `SELECT `+opCols+` FROM operations WHERE id = $1`, id))
	if err != nil {
		return o, p, err
	}
	if err := q.db.QueryRow(ctx, `SELECT payload FROM operations WHERE id = $1`, id).Scan(&raw); err != nil {
		return o, p, fmt.Errorf("read operation payload: %w", err)
	}
	if err := json.Unmarshal(raw, &p); err != nil {
		return o, p, fmt.Errorf("decode operation payload: %w", err)
	}
	return o, p, nil
}

// SetOperation moves an operation to status (with an error when failed)
// and notifies waiters in the same transaction.
func (q *Queries) SetOperation(ctx context.Context, id string, status orch.OpStatus, code orch.Code, msg string) error {
	_, err := q.db.Exec(ctx, `UPDATE operations SET status = $2, error_code = nullif($3, ''), error_message = nullif($4, ''), updated_at = now()
		WHERE id = $1`, id, string(status), string(code), msg)
	if err != nil {
		return fmt.Errorf("update operation: %w", err)
	}
	return q.Notify(ctx, ChannelOps, id)
}
