package schema

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	orch "github.com/enginefleet/orchestrator"
)

// LockPorts takes the node's port lock until the transaction ends: port
// allocation (FreePort) and moves (MoveEnginePort) of one node happen one
// at a time, on any replica.
func (q *Queries) LockPorts(ctx context.Context, node string) error {
	if _, err := q.db.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtext('orch_ports:' || $1))`, node); err != nil {
		return fmt.Errorf("lock port range: %w", err)
	}
	return nil
}

// PortBlock is a host port a node refused, skipped by FreePort until Until.
type PortBlock struct {
	Node   string
	Port   int
	Reason string
	Until  time.Time
}

// BlockPort records (or renews) that node refuses port, until until.
func (q *Queries) BlockPort(ctx context.Context, b PortBlock) error {
	_, err := q.db.Exec(ctx, `INSERT INTO port_blocks (node, port, reason, blocked_until) VALUES ($1, $2, $3, $4)
		ON CONFLICT (node, port) DO UPDATE SET reason = excluded.reason, blocked_until = excluded.blocked_until, created_at = now()`,
		b.Node, b.Port, b.Reason, b.Until)
	if err != nil {
		return fmt.Errorf("block port: %w", err)
	}
	return nil
}

// PortBlocks returns node's blocks in force, by port.
func (q *Queries) PortBlocks(ctx context.Context, node string) ([]PortBlock, error) {
	rows, err := q.db.Query(ctx, `SELECT node, port, reason, blocked_until FROM port_blocks
		WHERE node = $1 AND blocked_until > now() ORDER BY port`, node)
	if err != nil {
		return nil, fmt.Errorf("list port blocks: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (PortBlock, error) {
		var b PortBlock
		err := r.Scan(&b.Node, &b.Port, &b.Reason, &b.Until)
		return b, err
	})
	if err != nil {
		return nil, fmt.Errorf("list port blocks: %w", err)
	}
	return out, nil
}

// MoveEnginePort gives an engine another port: the caller holds the node's
// port lock (LockPorts) and picked to with FreePort in the same
// transaction. ENGINE_NOT_FOUND when the row is gone.
func (q *Queries) MoveEnginePort(ctx context.Context, engineID string, to int) error {
	var id string
	err := q.db.QueryRow(ctx, `UPDATE engines SET port = $2, updated_at = now() WHERE id = $1 RETURNING id::text`, engineID, to).Scan(&id)
	if errors.Is(err, pgx.ErrNoRows) {
		return orch.Errorf(orch.CodeEngineNotFound, "engine not found")
	}
	if isUniqueViolation(err, "engines_node_port_key") {
		return orch.Errorf(orch.CodePortExhaustion, "port %d was taken concurrently", to)
	}
	if err != nil {
		return fmt.Errorf("move engine port: %w", err)
	}
	return nil
}
