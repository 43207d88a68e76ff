package schema

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	orch "github.com/enginefleet/orchestrator"
)

// Backup triggers.
const (
	BackupScheduled = "scheduled"
	BackupManual    = "manual"
)

// Backup is one recorded brain backup. Rows outlive engines.
type Backup struct {
	ID            string
	EngineID      string
	ProductID     string
	UserID        string
	Node          string
	Path          string // relative to ORCH_BACKUP_DIR
	SizeBytes     int64
	SHA256        string
	EngineVersion string
	Trigger       string     // BackupScheduled or BackupManual
	Day           *time.Time // scheduled: the UTC day it belongs to
	PausedMS      int64
	DurationMS    int64
	OperationID   string
	CreatedAt     time.Time
}

const backupCols = `id::text, engine_id::text, product_id::text, user_id, node, path, size_bytes, sha256,
	engine_version, trigger, day::timestamp, paused_ms, duration_ms, coalesce(operation_id::text, ''), created_at`

func scanBackup(row pgx.Row) (Backup, error) {
	var b Backup
	err := row.Scan(&b.ID, &b.EngineID, &b.ProductID, &b.UserID, &b.Node, &b.Path, &b.SizeBytes, &b.SHA256,
		&b.EngineVersion, &b.Trigger, &b.Day, &b.PausedMS, &b.DurationMS, &b.OperationID, &b.CreatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return b, orch.Errorf(orch.CodeBackupNotFound, "backup not found")
	}
	if err != nil {
		return b, fmt.Errorf("scan backup: %w", err)
	}
	return b, nil
}

func collectBackups(rows pgx.Rows, err error) ([]Backup, error) {
	return collect(rows, err, "query backups", scanBackup)
}

// ErrBackupExists is returned by InsertBackup when the engine already has
// its scheduled backup for that day.
var ErrBackupExists = errors.New("the engine already has a backup for this day")

// InsertBackup records a backup whose file is in place. ErrBackupExists
// when a scheduled backup of the same engine and day is already recorded.
func (q *Queries) InsertBackup(ctx context.Context, b Backup) error {
	_, err := q.db.Exec(ctx, `INSERT INTO backups (id, engine_id, product_id, user_id, node, path, size_bytes, sha256,
			engine_version, trigger, day, paused_ms, duration_ms, operation_id)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::timestamp::date, $12, $13, $14)`,
		b.ID, b.EngineID, b.ProductID, b.UserID, b.Node, b.Path, b.SizeBytes, b.SHA256,
		b.EngineVersion, b.Trigger, b.Day, b.PausedMS, b.DurationMS, nullUUID(b.OperationID))
	if isUniqueViolation(err, "backups_engine_day_key") || isUniqueViolation(err, "backups_pkey") {
		return ErrBackupExists
	}
	if err != nil {
		return fmt.Errorf("insert backup: %w", err)
	}
	return nil
}

// BackupByID returns a backup; BACKUP_NOT_FOUND if none.
func (q *Queries) BackupByID(ctx context.Context, id string) (Backup, error) {
	if !isUUID(id) {
		return Backup{}, orch.Errorf(orch.CodeBackupNotFound, "backup not found")
	}
	return scanBackup(q.db.QueryRow(ctx, `SELECT `+backupCols+` FROM backups WHERE id = $1`, id))
}

// UserBackup returns a backup of one product's user, whichever engine of
// that user took it (a destroyed one included); BACKUP_NOT_FOUND if the
// id is unknown or belongs to someone else.
func (q *Queries) UserBackup(ctx context.Context, productID, userID, id string) (Backup, error) {
	if !isUUID(id) {
		return Backup{}, orch.Errorf(orch.CodeBackupNotFound, "backup not found")
	}
	return scanBackup(q.db.QueryRow(ctx, `SELECT `+backupCols+` FROM backups
		WHERE id = $1 AND product_id = $2 AND user_id = $3`, id, productID, userID))
}

// ListUserBackups returns a product's user's backups, newest first, and
// how many there are.
func (q *Queries) ListUserBackups(ctx context.Context, productID, userID string, limit, offset int) ([]Backup, int, error) {
	bs, err := collectBackups(q.db.Query(ctx, `SELECT `+backupCols+` FROM backups
		WHERE product_id = $1 AND user_id = $2 ORDER BY created_at DESC, id LIMIT $3 OFFSET $4`, productID, userID, limit, offset))
	if err != nil {
		return nil, 0, err
	}
	var total int
	if err := q.db.QueryRow(ctx, `SELECT count(*) FROM backups WHERE product_id = $1 AND user_id = $2`,
		productID, userID).Scan(&total); err != nil {
		return nil, 0, fmt.Errorf("count backups: %w", err)
	}
	return bs, total, nil
}

// HasBackupForDay reports whether an engine has its scheduled backup of day.
func (q *Queries) HasBackupForDay(ctx context.Context, engineID string, day time.Time) (bool, error) {
	var ok bool
	err := q.db.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM backups WHERE engine_id = $1 AND day = $2::timestamp::date)`,
		engineID, day).Scan(&ok)
	if err != nil {
		return false, fmt.Errorf("find backup of the day: %w", err)
	}
	return ok, nil
}

// ExpiredBackups lists backups created before cutoff that retention may
// delete: never the newest backup of a user who has an engine now (their
// only copy stays, however old). Backups of users without an engine
// expire like any other.
func (q *Queries) ExpiredBackups(ctx context.Context, cutoff time.Time, limit int) ([]Backup, error) {
	return collectBackups(q.db.Query(ctx, `SELECT `+backupCols+` FROM backups b
		WHERE b.created_at < $1
		  AND NOT (
		    EXISTS (SELECT 1 FROM engines e WHERE e.product_id = b.product_id AND e.user_id = b.user_id)
		    AND b.id = (SELECT b2.id FROM backups b2 WHERE b2.product_id = b.product_id AND b2.user_id = b.user_id
		                ORDER BY b2.created_at DESC, b2.id LIMIT 1))
		ORDER BY b.created_at LIMIT $2`, cutoff, limit))
}

// DeleteBackup removes a backup's row (retention; the caller removes the file).
func (q *Queries) DeleteBackup(ctx context.Context, id string) error {
	if _, err := q.db.Exec(ctx, `DELETE FROM backups WHERE id = $1`, id); err != nil {
		return fmt.Errorf("delete backup: %w", err)
	}
	return nil
}

// BackupPathsUnder reports which of paths (relative to ORCH_BACKUP_DIR)
// are recorded, so the retention sweep can remove unrecorded files.
func (q *Queries) BackupPathsUnder(ctx context.Context, paths []string) (map[string]bool, error) {
	rows, err := q.db.Query(ctx, `SELECT path FROM backups WHERE path = ANY($1)`, paths)
	if err != nil {
		return nil, fmt.Errorf("find backup paths: %w", err)
	}
	got, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("find backup paths: %w", err)
	}
	out := make(map[string]bool, len(got))
	for _, p := range got {
		out[p] = true
	}
	return out, nil
}

// InFlightOperation returns the newest unfinished operation of kind on an
// engine (a second backup request joins the first); OPERATION_NOT_FOUND if none.
func (q *Queries) InFlightOperation(ctx context.Context, engineID string, kind orch.OpKind) (orch.Operation, error) {
	return scanOp(q.db.QueryRow(ctx, `SELECT `+opCols+` FROM operations
		WHERE engine_id = $1 AND kind = $2 AND status IN ('pending', 'running') ORDER BY created_at DESC LIMIT 1`,
		engineID, string(kind)))
}

// ProductByRef finds a product by slug or id (the CLI); PRODUCT_NOT_FOUND if none.
func (q *Queries) ProductByRef(ctx context.Context, ref string) (orch.Product, error) {
	if isUUID(ref) {
		return q.GetProduct(ctx, ref)
	}
	var id string
	err := q.db.QueryRow(ctx, `SELECT id::text FROM products WHERE slug = $1`, ref).Scan(&id)
	if errors.Is(err, pgx.ErrNoRows) {
		return orch.Product{}, orch.Errorf(orch.CodeProductNotFound, "no product %q", ref)
	}
	if err != nil {
		return orch.Product{}, fmt.Errorf("find product: %w", err)
	}
	return q.GetProduct(ctx, id)
}
