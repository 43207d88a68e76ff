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

// AuditFilter selects a product's audit rows (GET /audit).
type AuditFilter struct {
	ProductID string
	UserID    string // "" = every user
	Action    string // "" = every action
	Since     *time.Time
	Until     *time.Time // exclusive
	Limit     int
}

// ListAudit returns a product's audit rows matching f, newest first. The
// (product, timestamp), (product, action, timestamp) and (product, user,
// timestamp) indexes serve it.
func (q *Queries) ListAudit(ctx context.Context, f AuditFilter) ([]orch.AuditEntry, error) {
	rows, err := q.db.Query(ctx, `SELECT id, "timestamp", coalesce(product_id::text, ''), coalesce(user_id, ''),
			coalesce(engine_id::text, ''), action, actor, metadata, duration_ms
		FROM audit_log
		WHERE product_id = $1
		  AND ($2 = '' OR user_id = $2)
		  AND ($3 = '' OR action = $3)
		  AND ($4::timestamptz IS NULL OR "timestamp" >= $4)
		  AND ($5::timestamptz IS NULL OR "timestamp" < $5)
		ORDER BY "timestamp" DESC, id DESC
		LIMIT $6`, f.ProductID, f.UserID, f.Action, f.Since, f.Until, f.Limit)
	if err != nil {
		return nil, fmt.Errorf("list audit: %w", err)
	}
	defer rows.Close()
	var out []orch.AuditEntry
	for rows.Next() {
		var e orch.AuditEntry
		var action string
		var meta []byte
		if err := rows.Scan(&e.ID, &e.Timestamp, &e.ProductID, &e.UserID, &e.EngineID, &action, &e.Actor, &meta, &e.DurationMS); err != nil {
			return nil, fmt.Errorf("list audit: %w", err)
		}
		e.Action = orch.Action(action)
		if err := json.Unmarshal(meta, &e.Metadata); err != nil {
			return nil, fmt.Errorf("list audit: metadata of row %d: %w", e.ID, err)
		}
		out = append(out, e)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list audit: %w", err)
	}
	return out, nil
}

// AuditRow is an audit row as an export reads it: metadata stays raw JSON.
type AuditRow struct {
	ID         int64
	Timestamp  time.Time
	ProductID  string
	UserID     string
	EngineID   string
	Action     string
	Actor      string
	Metadata   []byte
	DurationMS *int64
}

// ExportAuditRows calls fn with every audit row in [from, to) (of one
// product when productID is set), in id order, streaming. Run it in a
// REPEATABLE READ transaction for a consistent snapshot.
func (q *Queries) ExportAuditRows(ctx context.Context, from, to time.Time, productID string, fn func(AuditRow) error) error {
	rows, err := q.db.Query(ctx, `SELECT id, "timestamp", coalesce(product_id::text, ''), coalesce(user_id, ''),
			coalesce(engine_id::text, ''), action, actor, metadata::text, duration_ms
		FROM audit_log
		WHERE "timestamp" >= $1 AND "timestamp" < $2 AND ($3 = '' OR product_id = $3::uuid)
		ORDER BY id`, from, to, productID)
	if err != nil {
		return fmt.Errorf("read audit rows: %w", err)
	}
	defer rows.Close()
	var r AuditRow
	var meta string
	for rows.Next() {
		if err := rows.Scan(&r.ID, &r.Timestamp, &r.ProductID, &r.UserID, &r.EngineID, &r.Action, &r.Actor, &meta, &r.DurationMS); err != nil {
			return fmt.Errorf("read audit rows: %w", err)
		}
		r.Metadata = []byte(meta)
		if err := fn(r); err != nil {
			return err
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("read audit rows: %w", err)
	}
	return nil
}

// OldestAuditTime is the timestamp of the oldest audit row (nil if none).
func (q *Queries) OldestAuditTime(ctx context.Context) (*time.Time, error) {
	var t *time.Time
	if err := q.db.QueryRow(ctx, `SELECT min("timestamp") FROM audit_log`).Scan(&t); err != nil {
		return nil, fmt.Errorf("oldest audit row: %w", err)
	}
	return t, nil
}

// PurgeAudit deletes the audit rows with the given ids that are older than
// cutoff: the retention purge, the only DELETE the append-only trigger
// lets through (it sets orchestrator.audit_purge for this transaction
// only). Run it in a transaction. Returns how many rows went.
func (q *Queries) PurgeAudit(ctx context.Context, ids []int64, cutoff time.Time) (int64, error) {
	if _, err := q.db.Exec(ctx, `SELECT set_config('orchestrator.audit_purge', 'on', true)`); err != nil {
		return 0, fmt.Errorf("purge audit: %w", err)
	}
	tag, err := q.db.Exec(ctx, `DELETE FROM audit_log WHERE id = ANY($1) AND "timestamp" < $2`, ids, cutoff)
	if err != nil {
		return 0, fmt.Errorf("purge audit: %w", err)
	}
	if _, err := q.db.Exec(ctx, `SELECT set_config('orchestrator.audit_purge', 'off', true)`); err != nil {
		return 0, fmt.Errorf("purge audit: %w", err)
	}
	return tag.RowsAffected(), nil
}

// Audit export triggers and statuses.
const (
	ExportScheduled = "scheduled"
	ExportManual    = "manual"
)

// AuditExport is one audit export (a file of the chain once succeeded).
type AuditExport struct {
	ID          string
	Seq         *int64
	ProductID   string
	From, To    time.Time
	Trigger     string
	Tick        *time.Time
	Status      orch.OpStatus
	File        string
	SHA256      string
	PrevSHA256  string
	SizeBytes   *int64
	RowCount    *int64
	FirstID     *int64
	LastID      *int64
	Error       string
	RequestedBy string
	PurgedRows  int64
	PurgedAt    *time.Time
	CreatedAt   time.Time
	FinishedAt  *time.Time
}

const exportCols = `id::text, seq, coalesce(product_id::text, ''), from_ts, to_ts, trigger, tick, status,
	coalesce(file, ''), coalesce(sha256, ''), coalesce(prev_sha256, ''), size_bytes, row_count, first_id, last_id,
	coalesce(error, ''), requested_by, purged_rows, purged_at, created_at, finished_at`

func scanExport(row pgx.Row) (AuditExport, error) {
	var x AuditExport
	var status string
	err := row.Scan(&x.ID, &x.Seq, &x.ProductID, &x.From, &x.To, &x.Trigger, &x.Tick, &status,
		&x.File, &x.SHA256, &x.PrevSHA256, &x.SizeBytes, &x.RowCount, &x.FirstID, &x.LastID,
		&x.Error, &x.RequestedBy, &x.PurgedRows, &x.PurgedAt, &x.CreatedAt, &x.FinishedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return x, orch.Errorf(orch.CodeExportNotFound, "audit export not found")
	}
	if err != nil {
		return x, fmt.Errorf("scan audit export: %w", err)
	}
	x.Status = orch.OpStatus(status)
	return x, nil
}

// InsertAuditExport records a requested export (status pending). For a
// scheduled one whose tick is already recorded, it returns that export.
func (q *Queries) InsertAuditExport(ctx context.Context, x AuditExport) (AuditExport, error) {
	return scanExport(q.db.QueryRow(ctx, `INSERT INTO audit_exports (id, product_id, from_ts, to_ts, trigger, tick, status, requested_by)
		VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7)
		ON CONFLICT (tick) DO UPDATE SET tick = EXCLUDED.tick
		RETURNING `+exportCols, x.ID, nullUUID(x.ProductID), x.From, x.To, x.Trigger, x.Tick, x.RequestedBy))
}

// AuditExportByID returns an export; EXPORT_NOT_FOUND if none.
func (q *Queries) AuditExportByID(ctx context.Context, id string) (AuditExport, error) {
	if !isUUID(id) {
		return AuditExport{}, orch.Errorf(orch.CodeExportNotFound, "audit export not found")
	}
	return scanExport(q.db.QueryRow(ctx, `SELECT `+exportCols+` FROM audit_exports WHERE id = $1`, id))
}

// ListAuditExports returns up to limit exports, newest request first.
func (q *Queries) ListAuditExports(ctx context.Context, limit int) ([]AuditExport, error) {
	return q.exports(ctx, "list audit exports", `ORDER BY created_at DESC, id LIMIT $1`, limit)
}

// exports runs SELECT exportCols FROM audit_exports with the rest of a query.
func (q *Queries) exports(ctx context.Context, what, rest string, args ...any) ([]AuditExport, error) {
	rows, err := q.db.Query(ctx, `SELECT `+exportCols+` FROM audit_exports `+rest, args...)
	return collect(rows, err, what, scanExport)
}

// AuditExportByTick returns the scheduled export of a tick; EXPORT_NOT_FOUND if none.
func (q *Queries) AuditExportByTick(ctx context.Context, tick time.Time) (AuditExport, error) {
	return scanExport(q.db.QueryRow(ctx, `SELECT `+exportCols+` FROM audit_exports WHERE tick = $1`, tick))
}

// LockExportChain serializes export writers (and the purge) until the
// transaction ends: seq and prev_sha256 are decided under it.
func (q *Queries) LockExportChain(ctx context.Context) error {
	if _, err := q.db.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtext('orch_audit_export_chain'))`); err != nil {
		return fmt.Errorf("lock export chain: %w", err)
	}
	return nil
}

// ChainHead returns the last written export (nil when the chain is empty).
func (q *Queries) ChainHead(ctx context.Context) (*AuditExport, error) {
	x, err := scanExport(q.db.QueryRow(ctx, `SELECT `+exportCols+` FROM audit_exports
		WHERE status = 'succeeded' ORDER BY seq DESC LIMIT 1`))
	if orch.IsCode(err, orch.CodeExportNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return &x, nil
}

// LastScheduledEnd is where the next scheduled export starts: the end of
// the last successful scheduled one (nil when there is none).
func (q *Queries) LastScheduledEnd(ctx context.Context) (*time.Time, error) {
	var t *time.Time
	if err := q.db.QueryRow(ctx, `SELECT max(to_ts) FROM audit_exports WHERE trigger = 'scheduled' AND status = 'succeeded'`).Scan(&t); err != nil {
		return nil, fmt.Errorf("last scheduled export: %w", err)
	}
	return t, nil
}

// FinishAuditExport records a written export: its place in the chain,
// hash, counts and file.
func (q *Queries) FinishAuditExport(ctx context.Context, x AuditExport) error {
	_, err := q.db.Exec(ctx, `UPDATE audit_exports SET status = 'succeeded', seq = $2, file = $3, sha256 = $4,
			prev_sha256 = $5, size_bytes = $6, row_count = $7, first_id = $8, last_id = $9, error = NULL, finished_at = now()
		WHERE id = $1`, x.ID, x.Seq, x.File, x.SHA256, nullText(x.PrevSHA256), x.SizeBytes, x.RowCount, x.FirstID, x.LastID)
	if err != nil {
		return fmt.Errorf("finish audit export: %w", err)
	}
	return nil
}

// SetExportStatus moves an export to running, or to failed with msg.
func (q *Queries) SetExportStatus(ctx context.Context, id string, status orch.OpStatus, msg string) error {
	_, err := q.db.Exec(ctx, `UPDATE audit_exports SET status = $2, error = nullif($3, ''),
			finished_at = CASE WHEN $2 IN ('succeeded', 'failed') THEN now() ELSE finished_at END
		WHERE id = $1`, id, string(status), msg)
	if err != nil {
		return fmt.Errorf("update audit export: %w", err)
	}
	return nil
}

// PurgeCandidates lists the written exports, in chain order, holding rows
// older than cutoff that are not all purged yet.
func (q *Queries) PurgeCandidates(ctx context.Context, cutoff time.Time) ([]AuditExport, error) {
	return q.exports(ctx, "purge candidates", `WHERE status = 'succeeded' AND purged_at IS NULL AND from_ts < $1 ORDER BY seq`, cutoff)
}

// RecordPurge adds n purged rows to an export; done marks it fully purged
// (its whole range is past retention).
func (q *Queries) RecordPurge(ctx context.Context, id string, n int64, done bool) error {
	_, err := q.db.Exec(ctx, `UPDATE audit_exports SET purged_rows = purged_rows + $2,
			purged_at = CASE WHEN $3 THEN now() ELSE purged_at END WHERE id = $1`, id, n, done)
	if err != nil {
		return fmt.Errorf("record purge: %w", err)
	}
	return nil
}
