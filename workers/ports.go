package workers

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/schema"
)

// A host port the engine host refuses (another program listens there, a
// container this database does not know publishes it) would fail every
// start of the engine holding it. The worker moves such an engine: in one
// transaction under the node's port lock it records the port in
// port_blocks (the allocator skips it for PortBlockTTL, after which a freed
// port comes back), gives the engine the lowest free port and writes a
// reconcile audit row (repair port_moved); then it recreates the container
// on the new port and starts it. Products get the new URL from the
// operation's answer or their next admit.

// DefaultPortBlockTTL is how long a refused port is skipped.
const DefaultPortBlockTTL = time.Hour

// maxPortMoves bounds the moves of one start (each to a fresh port).
const maxPortMoves = 5

// startMovingPort starts the engine; when its host port is refused it
// moves the engine to a free port (see above) and tries again. It returns
// the engine and spec as they are afterwards (port changed or not).
func (r *runner) startMovingPort(ctx context.Context, e orch.Engine, spec orch.EngineSpec) (orch.Engine, orch.EngineSpec, error) {
	for moves := 0; ; moves++ {
		err := r.backend.Start(ctx, e.ID)
		if err == nil {
			return e, spec, nil
		}
		if !errors.Is(err, orch.ErrPortUnavailable) || moves == maxPortMoves || r.eng.PortMax == 0 {
			return e, spec, backendErr("start engine", err)
		}
		to, merr := r.movePort(ctx, e, spec.HostPort, err)
		if merr != nil {
			// No other port free (nothing was blocked): the start fails as
			// it did, and its retry finds the port free once its holder
			// is gone, or a free port by then.
			r.log.Warn("engine's port refused and it cannot move", "engine_id", e.ID, "port", spec.HostPort,
				"error", err, "move_error", merr)
			return e, spec, backendErr("start engine", err)
		}
		e.Port, spec.HostPort = to, to
		if err := r.backend.Ensure(ctx, spec); err != nil {
			return e, spec, backendErr("create engine", err)
		}
	}
}

// movePort blocks port (refused with cause) on the engine's node and moves
// the engine to the lowest free port, in one transaction, audited. When
// the row already holds another port (moved meanwhile), that one is
// returned and nothing is blocked.
func (r *runner) movePort(ctx context.Context, e orch.Engine, port int, cause error) (int, error) {
	to := 0
	err := inTx(ctx, r.pool, func(tx pgx.Tx) error {
		q := schema.New(tx)
		if err := q.LockPorts(ctx, e.Node); err != nil {
			return err
		}
		cur, err := q.EngineByIDForUpdate(ctx, e.ID)
		if err != nil {
			return err
		}
		if cur.Port != port {
			to = cur.Port
			return nil
		}
		if err := q.BlockPort(ctx, schema.PortBlock{Node: e.Node, Port: port, Reason: cause.Error(),
			Until: time.Now().Add(r.eng.PortBlockTTL)}); err != nil {
			return err
		}
		if to, err = q.FreePort(ctx, e.Node, r.eng.PortMin, r.eng.PortMax); err != nil {
			return err
		}
		if err := q.MoveEnginePort(ctx, e.ID, to); err != nil {
			return err
		}
		return q.InsertAudit(ctx, orch.AuditEntry{ProductID: e.ProductID, UserID: e.UserID, EngineID: e.ID,
			Action: orch.ActionReconcile, Actor: orch.ActorSystem, Metadata: map[string]any{
				"repair": "port_moved", "from_port": port, "to_port": to, "reason": "host_port_in_use"}})
	})
	if err != nil {
		return 0, err
	}
	if to != port {
		r.log.Warn("engine moved off a port the host refused", "engine_id", e.ID, "node", e.Node,
			"from_port", port, "to_port", to, "blocked_for_s", int(r.eng.PortBlockTTL.Seconds()), "error", cause)
	}
	return to, nil
}
