package schema

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	orch "github.com/enginefleet/orchestrator"
)

// This file holds the operator console's reads (package console): the
// fleet at a glance, engines filtered and paged on the server, one
// engine's timeline, operations, backups and audit search. They only read.
// Every one takes a product scope: "" is the whole fleet (an admin), a
// product id limits it to that product (a platform-key session).

// ConsoleEngineFilter selects the engines page: every field is optional.
type ConsoleEngineFilter struct {
	ProductID string
	State     orch.State
	Node      string
	Image     string
	// Search matches a user id by prefix (case-insensitive) or an engine id exactly.
	Search string
	// Problems keeps engines that need a look: failed, failing probes,
	// auto-restarting, or in a transitional state past its deadline.
	Problems bool
	Sort     string // ConsoleSort*; default newest first
	Limit    int
	Offset   int
}

// Engine list orders.
const (
	ConsoleSortNewest   = "new"      // creation, newest first
	ConsoleSortUser     = "user"     // user id
	ConsoleSortHealth   = "health"   // stalest health check first
	ConsoleSortIdle     = "idle"     // longest idle first
	ConsoleSortFailures = "failures" // most failing probes and restart attempts first
)

// ConsoleOp is the short form of an operation the console lists.
type ConsoleOp struct {
	ID        string
	Kind      orch.OpKind
	Status    orch.OpStatus
	Actor     string
	ErrorCode orch.Code
	CreatedAt time.Time
	UpdatedAt time.Time
}

// ConsoleEngine is an engine row of the console with what an operator
// reads next to it.
type ConsoleEngine struct {
	orch.Engine
	ProductSlug string
	LastOp      *ConsoleOp // the newest operation, if any
	Restarts24h int        // manual and automatic restarts in the last 24 h (audit)
	KeySince    time.Time  // when its key was last rotated, else its creation
}

// consoleEngineCols are the engine columns the console reads: never the
// key columns. Its own list (not the lifecycle queries'), so the console
// does not move when those are regenerated.
const consoleEngineCols = `id::text, product_id::text, user_id, status, node, port, engine_version,
	coalesce(prev_key_hash, ''), prev_key_expires_at, boot_duration_ms, health_failures, restart_attempts,
	last_health_at, last_active_at, coalesce(sleep_reason, ''), slept_at, state_deadline,
	coalesce(operation_id::text, ''), coalesce(last_error, ''), created_at, updated_at`

// consoleOpCols are the operation columns the console reads.
const consoleOpCols = `id::text, product_id::text, engine_id::text, user_id, kind, status, actor, coalesce(error_code, ''),
	coalesce(error_message, ''), coalesce(deadline, 'epoch'), created_at, updated_at`

func scanConsoleOp(r pgx.Row) (orch.Operation, error) {
	var o orch.Operation
	var kind, status, code string
	err := r.Scan(&o.ID, &o.ProductID, &o.EngineID, &o.UserID, &kind, &status, &o.Actor, &code, &o.ErrorMessage,
		&o.Deadline, &o.CreatedAt, &o.UpdatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return o, orch.Errorf(orch.CodeOperationNotFound, "operation not found")
	}
	if err != nil {
		return o, fmt.Errorf("scan console operation: %w", err)
	}
	o.Kind, o.Status, o.ErrorCode = orch.OpKind(kind), orch.OpStatus(status), orch.Code(code)
	if o.Deadline.Unix() == 0 {
		o.Deadline = time.Time{}
	}
	return o, nil
}

const consoleEngineWhere = `
	($1::uuid IS NULL OR product_id = $1::uuid)
	AND ($2 = '' OR status = $2)
	AND ($3 = '' OR node = $3)
	AND ($4 = '' OR engine_version = $4)
	AND ($5 = '' OR lower(user_id) LIKE $5 ESCAPE '\' OR id::text = $6)
	AND (NOT $7 OR status = 'failed' OR health_failures > 0 OR restart_attempts > 0
		OR (state_deadline IS NOT NULL AND state_deadline < now()))`

func consoleEngineOrder(sort string) string {
	switch sort {
	case ConsoleSortUser:
		return `user_id, id`
	case ConsoleSortHealth:
		return `last_health_at ASC NULLS FIRST, id`
	case ConsoleSortIdle:
		return `last_active_at ASC NULLS FIRST, id`
	case ConsoleSortFailures:
		return `health_failures DESC, restart_attempts DESC, id`
	}
	return `created_at DESC, id`
}

// likePrefix escapes s for a case-insensitive LIKE prefix match.
func likePrefix(s string) string {
	if s == "" {
		return ""
	}
	r := strings.NewReplacer(`\`, `\\`, `%`, `\%`, `_`, `\_`)
	return r.Replace(strings.ToLower(s)) + "%"
}

// ConsoleEngines returns one page of engines matching f and how many match
// in all. The page's extras (last operation, restarts, key age) are read
// per row of the page only, through the operations and audit indexes.
func (q *Queries) ConsoleEngines(ctx context.Context, f ConsoleEngineFilter) ([]ConsoleEngine, int, error) {
	if f.Limit <= 0 {
		f.Limit = 50
	}
	args := []any{nullUUID(f.ProductID), string(f.State), f.Node, f.Image, likePrefix(f.Search), f.Search, f.Problems}
	var total int
	if err := q.db.QueryRow(ctx, `SELECT count(*) FROM engines WHERE `+consoleEngineWhere, args...).Scan(&total); err != nil {
		return nil, 0, fmt.Errorf("count console engines: %w", err)
	}
	rows, err := q.db.Query(ctx, `
		WITH page AS (
			SELECT * FROM engines WHERE `+consoleEngineWhere+`
			ORDER BY `+consoleEngineOrder(f.Sort)+` LIMIT $8 OFFSET $9)
		SELECT `+consoleEngineCols+`,
			(SELECT slug FROM products WHERE products.id = page.product_id),
			coalesce(lo_id, ''), coalesce(lo_kind, ''), coalesce(lo_status, ''), coalesce(lo_actor, ''), coalesce(lo_code, ''),
			lo_created, lo_updated, rs_n, coalesce(key_at, created_at)
		FROM page
		LEFT JOIN LATERAL (
			SELECT o.id::text, o.kind, o.status, o.actor, coalesce(o.error_code, ''), o.created_at, o.updated_at
			FROM operations o WHERE o.engine_id = page.id ORDER BY o.created_at DESC LIMIT 1
		) lo(lo_id, lo_kind, lo_status, lo_actor, lo_code, lo_created, lo_updated) ON true
		LEFT JOIN LATERAL (
			SELECT count(*) FILTER (WHERE a.action IN ('restart', 'auto_restart_start') AND a."timestamp" > now() - interval '24 hours'),
				max(a."timestamp") FILTER (WHERE a.action = 'rotate_key' AND a.engine_id = page.id AND NOT a.metadata ? 'error_code')
			FROM audit_log a
			WHERE a.product_id = page.product_id AND a.user_id = page.user_id
			  AND a.action IN ('restart', 'auto_restart_start', 'rotate_key')
		) rs(rs_n, key_at) ON true
		ORDER BY `+consoleEngineOrder(f.Sort), append(args, f.Limit, f.Offset)...)
	out, err := collect(rows, err, "console engines", func(r pgx.Row) (ConsoleEngine, error) {
		var c ConsoleEngine
		var status string
		var op ConsoleOp
		var kind, opStatus, code string
		var created, updated *time.Time
		err := r.Scan(&c.ID, &c.ProductID, &c.UserID, &status, &c.Node, &c.Port, &c.EngineVersion,
			&c.PrevKeyHash, &c.PrevKeyExpiresAt,
			&c.BootDurationMS, &c.HealthFailures, &c.RestartAttempts, &c.LastHealthAt, &c.LastActiveAt,
			&c.SleepReason, &c.SleptAt, &c.StateDeadline, &c.OperationID,
			&c.LastError, &c.CreatedAt, &c.UpdatedAt,
			&c.ProductSlug, &op.ID, &kind, &opStatus, &op.Actor, &code, &created, &updated, &c.Restarts24h, &c.KeySince)
		if err != nil {
			return c, fmt.Errorf("scan console engine: %w", err)
		}
		c.Status = orch.State(status)
		if op.ID != "" {
			op.Kind, op.Status, op.ErrorCode = orch.OpKind(kind), orch.OpStatus(opStatus), orch.Code(code)
			op.CreatedAt, op.UpdatedAt = *created, *updated
			c.LastOp = &op
		}
		return c, nil
	})
	return out, total, err
}

// ConsoleFacets are the values the engines page offers as filters.
type ConsoleFacets struct {
	Nodes  []string
	Images []ImageCount
}

// ImageCount is how many engines run an image, by state.
type ImageCount struct {
	Image   string
	Total   int
	Running int
	Failed  int
}

// ConsoleFacets lists the nodes and images engines use (of one product when
// productID is set), images by how many engines run them.
func (q *Queries) ConsoleFacets(ctx context.Context, productID string) (ConsoleFacets, error) {
	var f ConsoleFacets
	rows, err := q.db.Query(ctx, `SELECT DISTINCT node FROM engines WHERE ($1::uuid IS NULL OR product_id = $1::uuid) ORDER BY 1`, nullUUID(productID))
	f.Nodes, err = collect(rows, err, "console nodes", func(r pgx.Row) (string, error) {
		var s string
		return s, r.Scan(&s)
	})
	if err != nil {
		return f, err
	}
	rows, err = q.db.Query(ctx, `SELECT engine_version, count(*), count(*) FILTER (WHERE status = 'running'),
			count(*) FILTER (WHERE status = 'failed')
		FROM engines WHERE ($1::uuid IS NULL OR product_id = $1::uuid) GROUP BY 1 ORDER BY 2 DESC, 1`, nullUUID(productID))
	f.Images, err = collect(rows, err, "console images", func(r pgx.Row) (ImageCount, error) {
		var c ImageCount
		return c, r.Scan(&c.Image, &c.Total, &c.Running, &c.Failed)
	})
	return f, err
}

// ConsoleProduct is a product with its usage.
type ConsoleProduct struct {
	orch.Product
	ByState map[orch.State]int
	Total   int
	// Frozen: max_engines is 0, no new engines.
	Frozen bool
	// FrozenFrom is, for a frozen product, the limit it had before (from
	// its last policy_update audit row); nil when it had none or it is
	// unknown.
	FrozenFrom *int
	Metrics    Metrics // rolling hour and lifetime totals, as GET /metrics
}

// ConsoleProducts lists products (one when productID is set) with their
// engines by state and their last hour's activity.
func (q *Queries) ConsoleProducts(ctx context.Context, productID string) ([]ConsoleProduct, error) {
	rows, err := q.db.Query(ctx, `SELECT `+productCols+` FROM products WHERE ($1::uuid IS NULL OR id = $1::uuid) ORDER BY slug`, nullUUID(productID))
	ps, err := collect(rows, err, "console products", scanProduct)
	if err != nil {
		return nil, err
	}
	out := make([]ConsoleProduct, 0, len(ps))
	for _, p := range ps {
		c := ConsoleProduct{Product: p}
		if c.ByState, err = q.StatusCounts(ctx, p.ID); err != nil {
			return nil, err
		}
		for _, n := range c.ByState {
			c.Total += n
		}
		if c.Metrics, err = q.ProductMetrics(ctx, p.ID); err != nil {
			return nil, err
		}
		if p.Policy.MaxEngines != nil && *p.Policy.MaxEngines == 0 {
			c.Frozen = true
			var prev *int
			err := q.db.QueryRow(ctx, `SELECT (metadata->'previous'->>'max_engines')::int FROM audit_log
				WHERE product_id = $1 AND action = 'policy_update' AND (metadata->'policy'->>'max_engines')::int = 0
				ORDER BY "timestamp" DESC, id DESC LIMIT 1`, p.ID).Scan(&prev)
			if err != nil && err != pgx.ErrNoRows {
				return nil, fmt.Errorf("console product %s: previous policy: %w", p.Slug, err)
			}
			if prev != nil && *prev > 0 {
				c.FrozenFrom = prev
			}
		}
		out = append(out, c)
	}
	return out, nil
}

// ConsoleOpFilter selects operations: in flight (pending or running) or failed.
type ConsoleOpFilter struct {
	ProductID string
	Failed    bool // failed ones, newest first; else in flight, oldest first
	Kind      orch.OpKind
	Since     time.Time // failed: updated since (zero = 7 days)
	Limit     int
	Offset    int
}

// ConsoleOperation is an operation with its product and its engine's state now.
type ConsoleOperation struct {
	orch.Operation
	ProductSlug string
	EngineState orch.State // "" when the engine is gone
	EngineNode  string
}

// ConsoleOperations returns a page of operations matching f and the total.
func (q *Queries) ConsoleOperations(ctx context.Context, f ConsoleOpFilter) ([]ConsoleOperation, int, error) {
	if f.Limit <= 0 {
		f.Limit = 50
	}
	if f.Since.IsZero() {
		f.Since = time.Now().Add(-7 * 24 * time.Hour)
	}
	where := `o.status IN ('pending', 'running')`
	order := `o.created_at, o.id`
	if f.Failed {
		where = `o.status = 'failed' AND o.updated_at >= $3`
		order = `o.updated_at DESC, o.id`
	}
	where += ` AND ($1::uuid IS NULL OR o.product_id = $1::uuid) AND ($2 = '' OR o.kind = $2)`
	args := []any{nullUUID(f.ProductID), string(f.Kind), f.Since}
	var total int
	if err := q.db.QueryRow(ctx, `SELECT count(*) FROM operations o WHERE `+where+` AND $3::timestamptz IS NOT NULL`, args...).Scan(&total); err != nil {
		return nil, 0, fmt.Errorf("count console operations: %w", err)
	}
	rows, err := q.db.Query(ctx, `SELECT o.id::text, o.product_id::text, o.engine_id::text, o.user_id, o.kind, o.status, o.actor,
			coalesce(o.error_code, ''), coalesce(o.error_message, ''), coalesce(o.deadline, 'epoch'), o.created_at, o.updated_at,
			p.slug, coalesce(e.status, ''), coalesce(e.node, '')
		FROM operations o JOIN products p ON p.id = o.product_id LEFT JOIN engines e ON e.id = o.engine_id
		WHERE `+where+` AND $3::timestamptz IS NOT NULL ORDER BY `+order+` LIMIT $4 OFFSET $5`, append(args, f.Limit, f.Offset)...)
	out, err := collect(rows, err, "console operations", func(r pgx.Row) (ConsoleOperation, error) {
		var c ConsoleOperation
		var kind, status, code, state string
		err := r.Scan(&c.ID, &c.ProductID, &c.EngineID, &c.UserID, &kind, &status, &c.Actor, &code, &c.ErrorMessage,
			&c.Deadline, &c.CreatedAt, &c.UpdatedAt, &c.ProductSlug, &state, &c.EngineNode)
		c.Kind, c.Status, c.ErrorCode, c.EngineState = orch.OpKind(kind), orch.OpStatus(status), orch.Code(code), orch.State(state)
		if c.Deadline.Unix() == 0 {
			c.Deadline = time.Time{}
		}
		return c, err
	})
	return out, total, err
}

// ConsoleEngineOperations lists an engine's operations, newest first.
func (q *Queries) ConsoleEngineOperations(ctx context.Context, engineID string, limit int) ([]orch.Operation, error) {
	if !isUUID(engineID) {
		return nil, nil
	}
	rows, err := q.db.Query(ctx, `SELECT `+consoleOpCols+` FROM operations WHERE engine_id = $1 ORDER BY created_at DESC LIMIT $2`, engineID, limit)
	return collect(rows, err, "console engine operations", scanConsoleOp)
}

// ConsoleOperation returns one operation of any product (or of productID
// when set); OPERATION_NOT_FOUND if none.
func (q *Queries) ConsoleOperation(ctx context.Context, productID, id string) (orch.Operation, error) {
	if !isUUID(id) {
		return orch.Operation{}, orch.Errorf(orch.CodeOperationNotFound, "operation not found")
	}
	return scanConsoleOp(q.db.QueryRow(ctx, `SELECT `+consoleOpCols+` FROM operations WHERE id = $1 AND ($2::uuid IS NULL OR product_id = $2::uuid)`,
		id, nullUUID(productID)))
}

// ConsoleEngine returns an engine with its product's slug; ENGINE_NOT_FOUND
// if none (or not of productID when set).
func (q *Queries) ConsoleEngine(ctx context.Context, productID, id string) (orch.Engine, string, error) {
	var e orch.Engine
	if !isUUID(id) {
		return e, "", orch.Errorf(orch.CodeEngineNotFound, "engine not found")
	}
	var status, slug string
	err := q.db.QueryRow(ctx, `SELECT `+consoleEngineCols+`, (SELECT slug FROM products WHERE products.id = engines.product_id)
		FROM engines WHERE id = $1 AND ($2::uuid IS NULL OR product_id = $2::uuid)`, id, nullUUID(productID)).Scan(
		&e.ID, &e.ProductID, &e.UserID, &status, &e.Node, &e.Port, &e.EngineVersion, &e.PrevKeyHash, &e.PrevKeyExpiresAt,
		&e.BootDurationMS, &e.HealthFailures, &e.RestartAttempts, &e.LastHealthAt, &e.LastActiveAt, &e.SleepReason, &e.SleptAt,
		&e.StateDeadline, &e.OperationID, &e.LastError, &e.CreatedAt, &e.UpdatedAt, &slug)
	if errors.Is(err, pgx.ErrNoRows) {
		return e, "", orch.Errorf(orch.CodeEngineNotFound, "engine not found")
	}
	if err != nil {
		return e, "", fmt.Errorf("console engine: %w", err)
	}
	e.Status = orch.State(status)
	return e, slug, nil
}

// ConsoleAuditSearch selects audit rows; every field is optional.
type ConsoleAuditSearch struct {
	ProductID string
	UserID    string
	EngineID  string
	Actions   []string
	Actor     string
	Since     *time.Time
	Until     *time.Time // exclusive
	BeforeID  int64      // keyset paging: rows older than this one
	Limit     int
}

// ConsoleAuditEntry is an audit row with its product's slug.
type ConsoleAuditEntry struct {
	orch.AuditEntry
	ProductSlug string
}

// ConsoleAudit returns audit rows matching s, newest first (by id), at
// most s.Limit; page on with BeforeID = the last row's id.
func (q *Queries) ConsoleAudit(ctx context.Context, s ConsoleAuditSearch) ([]ConsoleAuditEntry, error) {
	if s.Limit <= 0 {
		s.Limit = 50
	}
	var before *int64
	if s.BeforeID > 0 {
		before = &s.BeforeID
	}
	var engineID *string
	if s.EngineID != "" {
		if !isUUID(s.EngineID) {
			return nil, nil
		}
		engineID = &s.EngineID
	}
	if s.Actions == nil {
		s.Actions = []string{}
	}
	rows, err := q.db.Query(ctx, `SELECT a.id, a."timestamp", coalesce(a.product_id::text, ''), coalesce(a.user_id, ''),
			coalesce(a.engine_id::text, ''), a.action, a.actor, a.metadata, a.duration_ms, coalesce(p.slug, '')
		FROM audit_log a LEFT JOIN products p ON p.id = a.product_id
		WHERE ($1::uuid IS NULL OR a.product_id = $1::uuid)
		  AND ($2 = '' OR a.user_id = $2)
		  AND ($3::uuid IS NULL OR a.engine_id = $3::uuid)
		  AND (cardinality($4::text[]) = 0 OR a.action = ANY($4))
		  AND ($5 = '' OR a.actor = $5)
		  AND ($6::timestamptz IS NULL OR a."timestamp" >= $6)
		  AND ($7::timestamptz IS NULL OR a."timestamp" < $7)
		  AND ($8::bigint IS NULL OR a.id < $8)
		ORDER BY a.id DESC LIMIT $9`,
		nullUUID(s.ProductID), s.UserID, engineID, s.Actions, s.Actor, s.Since, s.Until, before, s.Limit)
	return collect(rows, err, "console audit", func(r pgx.Row) (ConsoleAuditEntry, error) {
		var e ConsoleAuditEntry
		var action string
		var meta []byte
		if err := r.Scan(&e.ID, &e.Timestamp, &e.ProductID, &e.UserID, &e.EngineID, &action, &e.Actor, &meta, &e.DurationMS, &e.ProductSlug); err != nil {
			return e, fmt.Errorf("scan console audit: %w", err)
		}
		e.Action = orch.Action(action)
		if err := json.Unmarshal(meta, &e.Metadata); err != nil {
			return e, fmt.Errorf("console audit: metadata of row %d: %w", e.ID, err)
		}
		return e, nil
	})
}

// ConsoleBackupFilter selects backups, newest first.
type ConsoleBackupFilter struct {
	ProductID string
	UserID    string
	Limit     int
	Offset    int
}

// ConsoleBackup is a backup with its product's slug and whether the engine
// that took it still exists.
type ConsoleBackup struct {
	Backup
	ProductSlug  string
	EngineExists bool
}

// ConsoleBackupSummary sums up the backups of the scope.
type ConsoleBackupSummary struct {
	Count         int
	Bytes         int64
	NeverBackedUp int        // engines with no backup at all
	OldestLatest  *time.Time // the oldest "latest backup" across engines that have one
}

// ConsoleBackups returns a page of backups, the total and a summary.
func (q *Queries) ConsoleBackups(ctx context.Context, f ConsoleBackupFilter) ([]ConsoleBackup, int, ConsoleBackupSummary, error) {
	var sum ConsoleBackupSummary
	if f.Limit <= 0 {
		f.Limit = 50
	}
	pid := nullUUID(f.ProductID)
	var total int
	err := q.db.QueryRow(ctx, `SELECT count(*) FROM backups WHERE ($1::uuid IS NULL OR product_id = $1::uuid) AND ($2 = '' OR user_id = $2)`,
		pid, f.UserID).Scan(&total)
	if err != nil {
		return nil, 0, sum, fmt.Errorf("count console backups: %w", err)
	}
	rows, err := q.db.Query(ctx, `SELECT b.id::text, b.engine_id::text, b.product_id::text, b.user_id, b.node, b.path, b.size_bytes, b.sha256,
			b.engine_version, b.trigger, b.day::timestamp, b.paused_ms, b.duration_ms, coalesce(b.operation_id::text, ''), b.created_at, p.slug, EXISTS (SELECT 1 FROM engines e WHERE e.id = b.engine_id)
		FROM backups b JOIN products p ON p.id = b.product_id
		WHERE ($1::uuid IS NULL OR b.product_id = $1::uuid) AND ($2 = '' OR b.user_id = $2)
		ORDER BY b.created_at DESC, b.id LIMIT $3 OFFSET $4`, pid, f.UserID, f.Limit, f.Offset)
	out, err := collect(rows, err, "console backups", func(r pgx.Row) (ConsoleBackup, error) {
		var c ConsoleBackup
		b := &c.Backup
		err := r.Scan(&b.ID, &b.EngineID, &b.ProductID, &b.UserID, &b.Node, &b.Path, &b.SizeBytes, &b.SHA256,
			&b.EngineVersion, &b.Trigger, &b.Day, &b.PausedMS, &b.DurationMS, &b.OperationID, &b.CreatedAt,
			&c.ProductSlug, &c.EngineExists)
		return c, err
	})
	if err != nil {
		return nil, 0, sum, err
	}
	err = q.db.QueryRow(ctx, `
		WITH latest AS (SELECT engine_id, max(created_at) AS last FROM backups
			WHERE ($1::uuid IS NULL OR product_id = $1::uuid) GROUP BY engine_id)
		SELECT (SELECT count(*) FROM backups WHERE ($1::uuid IS NULL OR product_id = $1::uuid)),
			(SELECT coalesce(sum(size_bytes), 0) FROM backups WHERE ($1::uuid IS NULL OR product_id = $1::uuid)),
			(SELECT count(*) FROM engines e WHERE ($1::uuid IS NULL OR e.product_id = $1::uuid)
				AND NOT EXISTS (SELECT 1 FROM latest l WHERE l.engine_id = e.id)),
			(SELECT min(l.last) FROM latest l JOIN engines e ON e.id = l.engine_id)`, pid).
		Scan(&sum.Count, &sum.Bytes, &sum.NeverBackedUp, &sum.OldestLatest)
	if err != nil {
		return nil, 0, sum, fmt.Errorf("console backup summary: %w", err)
	}
	return out, total, sum, nil
}

// ConsoleHeadline is the fleet's headline numbers now, and the last hour
// minute by minute.
type ConsoleHeadline struct {
	At          time.Time
	ByState     map[orch.State]int
	Total       int
	InFlightOps int
	FailedOps1h int
	Stuck       int // engines in a transitional state past its deadline
	// Minutes are the last 60 whole minutes and the current one, oldest
	// first (61 entries): audit rows and failed operations per minute.
	Minutes []ConsoleMinute
}

// ConsoleMinute counts one minute's events.
type ConsoleMinute struct {
	Start      time.Time
	Restarts   int // restart + auto_restart_start
	Crashes    int // health_failed
	Provisions int
	FailedOps  int
}

// ConsoleHeadline reads the headline numbers of the scope (four short queries).
func (q *Queries) ConsoleHeadline(ctx context.Context, productID string) (ConsoleHeadline, error) {
	h := ConsoleHeadline{ByState: map[orch.State]int{}}
	pid := nullUUID(productID)
	if err := q.db.QueryRow(ctx, `SELECT now()`).Scan(&h.At); err != nil {
		return h, fmt.Errorf("console headline: %w", err)
	}
	rows, err := q.db.Query(ctx, `SELECT status, count(*) FROM engines WHERE ($1::uuid IS NULL OR product_id = $1::uuid) GROUP BY 1`, pid)
	if err != nil {
		return h, fmt.Errorf("console headline: %w", err)
	}
	var s string
	var n int
	if _, err := pgx.ForEachRow(rows, []any{&s, &n}, func() error { h.ByState[orch.State(s)] = n; h.Total += n; return nil }); err != nil {
		return h, fmt.Errorf("console headline: %w", err)
	}
	err = q.db.QueryRow(ctx, `SELECT
			(SELECT count(*) FROM operations WHERE status IN ('pending', 'running') AND ($1::uuid IS NULL OR product_id = $1::uuid)),
			(SELECT count(*) FROM operations WHERE status = 'failed' AND updated_at > now() - interval '1 hour'
				AND ($1::uuid IS NULL OR product_id = $1::uuid)),
			(SELECT count(*) FROM engines WHERE ($1::uuid IS NULL OR product_id = $1::uuid)
				AND state_deadline IS NOT NULL AND state_deadline < now() AND status IN ('provisioning', 'destroying'))`, pid).
		Scan(&h.InFlightOps, &h.FailedOps1h, &h.Stuck)
	if err != nil {
		return h, fmt.Errorf("console headline: %w", err)
	}
	type cell struct {
		m    time.Time
		what string
		n    int
	}
	var cells []cell
	var c cell
	rows, err = q.db.Query(ctx, `SELECT date_trunc('minute', "timestamp"), action, count(*)::int FROM audit_log
		WHERE "timestamp" >= date_trunc('minute', now()) - interval '60 minutes'
		  AND ($1::uuid IS NULL OR product_id = $1::uuid)
		  AND action IN ('restart', 'auto_restart_start', 'health_failed', 'provision')
		GROUP BY 1, 2
		UNION ALL
		SELECT date_trunc('minute', updated_at), 'failed_op', count(*)::int FROM operations
		WHERE status = 'failed' AND updated_at >= date_trunc('minute', now()) - interval '60 minutes'
		  AND ($1::uuid IS NULL OR product_id = $1::uuid)
		GROUP BY 1`, pid)
	if err != nil {
		return h, fmt.Errorf("console headline minutes: %w", err)
	}
	if _, err := pgx.ForEachRow(rows, []any{&c.m, &c.what, &c.n}, func() error { cells = append(cells, c); return nil }); err != nil {
		return h, fmt.Errorf("console headline minutes: %w", err)
	}
	start := h.At.Truncate(time.Minute).Add(-60 * time.Minute)
	h.Minutes = make([]ConsoleMinute, 61)
	for i := range h.Minutes {
		h.Minutes[i].Start = start.Add(time.Duration(i) * time.Minute)
	}
	for _, c := range cells {
		i := int(c.m.Sub(start) / time.Minute)
		if i < 0 || i >= len(h.Minutes) {
			continue
		}
		switch c.what {
		case "restart", "auto_restart_start":
			h.Minutes[i].Restarts += c.n
		case "health_failed":
			h.Minutes[i].Crashes += c.n
		case "provision":
			h.Minutes[i].Provisions += c.n
		case "failed_op":
			h.Minutes[i].FailedOps += c.n
		}
	}
	return h, nil
}

// ConsoleUserAudit returns a product user's audit rows of the given
// actions (all when empty) since since, newest first, at most limit: an
// engine's timeline and health history. Rows of the user's earlier
// engines (destroyed since) are included; EngineID tells them apart.
func (q *Queries) ConsoleUserAudit(ctx context.Context, productID, userID string, actions []string, since time.Time, limit int) ([]orch.AuditEntry, error) {
	if actions == nil {
		actions = []string{}
	}
	rows, err := q.db.Query(ctx, `SELECT id, "timestamp", coalesce(product_id::text, ''), coalesce(user_id, ''),
			coalesce(engine_id::text, ''), action, actor, metadata, duration_ms
		FROM audit_log
		WHERE product_id = $1 AND user_id = $2 AND "timestamp" >= $3
		  AND (cardinality($4::text[]) = 0 OR action = ANY($4))
		ORDER BY "timestamp" DESC, id DESC LIMIT $5`, productID, userID, since, actions, limit)
	return collect(rows, err, "console user audit", func(r pgx.Row) (orch.AuditEntry, error) {
		var e orch.AuditEntry
		var action string
		var meta []byte
		if err := r.Scan(&e.ID, &e.Timestamp, &e.ProductID, &e.UserID, &e.EngineID, &action, &e.Actor, &meta, &e.DurationMS); err != nil {
			return e, fmt.Errorf("scan console user audit: %w", err)
		}
		e.Action = orch.Action(action)
		return e, json.Unmarshal(meta, &e.Metadata)
	})
}
