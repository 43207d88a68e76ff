package schema

import (
	"context"
	"fmt"
)

// What the restore drill (package drill) asks of a database.

// UserTableCount counts the tables outside the system schemas: 0 for a
// database fit to restore into.
func UserTableCount(ctx context.Context, db DBTX) (int, error) {
	var n int
	err := db.QueryRow(ctx, `SELECT count(*) FROM pg_catalog.pg_tables
		WHERE schemaname NOT IN ('pg_catalog', 'information_schema')`).Scan(&n)
	if err != nil {
		return 0, fmt.Errorf("count tables: %w", err)
	}
	return n, nil
}

// ExportSnapshot exports the snapshot of db, a REPEATABLE READ
// transaction, for pg_dump --snapshot: the dump then sees what the
// transaction sees, for as long as it stays open.
func ExportSnapshot(ctx context.Context, db DBTX) (string, error) {
	var id string
	if err := db.QueryRow(ctx, `SELECT pg_export_snapshot()`).Scan(&id); err != nil {
		return "", fmt.Errorf("export snapshot: %w", err)
	}
	return id, nil
}
