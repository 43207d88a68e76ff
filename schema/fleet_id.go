package schema

import (
	"context"
	"fmt"
)

// FleetID returns this database's fleet id (migration 0020): the value of
// the orchestrator.fleet label on every container and volume its workers
// create.
func (q *Queries) FleetID(ctx context.Context) (string, error) {
	var id string
	if err := q.db.QueryRow(ctx, `SELECT id::text FROM fleet`).Scan(&id); err != nil {
		return "", fmt.Errorf("read fleet id: %w", err)
	}
	return id, nil
}
