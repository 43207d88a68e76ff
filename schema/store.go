package schema

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/schema/internal/dbsqlc"
)

// NOTIFY channels. Payloads are ids.
const (
	ChannelProducts = "orch_products" // payload: product id; a product or its keys changed
	ChannelOps      = "orch_ops"      // payload: operation id; an operation changed state
)

// DBTX is a pool, a connection or a transaction.
type DBTX interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// Queries runs the orchestrator's SQL on a DBTX: the queries sqlc
// generates from queries/*.sql (gen) behind methods that speak the domain,
// and the hand-written ones.
type Queries struct {
	db  DBTX
	gen *dbsqlc.Queries
}

// New binds the queries to a pool, a connection or a transaction.
func New(db DBTX) *Queries { return &Queries{db: db, gen: dbsqlc.New(db)} }

// Unreachable reports whether err means Postgres could not be reached or
// dropped the connection (refused, reset, closed, shutting down): nothing
// was wrong with the request, and it may be retried as it is.
func Unreachable(err error) bool {
	var ce *pgconn.ConnectError
	var pe *pgconn.PgError
	var ne net.Error
	switch {
	case err == nil:
		return false
	case errors.As(err, &ce):
		return true
	case errors.As(err, &pe):
		// Class 08: connection exception; 57P01–03: the server is
		// shutting down, crashed, or not yet accepting connections.
		return strings.HasPrefix(pe.Code, "08") || pe.Code == "57P01" || pe.Code == "57P02" || pe.Code == "57P03"
	case errors.As(err, &ne), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed):
		return true
	}
	return pgconn.SafeToRetry(err)
}

// collect scans every row of a query (rows, err as Query returns them)
// with scan; what names the query in errors.
func collect[T any](rows pgx.Rows, err error, what string, scan func(pgx.Row) (T, error)) ([]T, error) {
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	defer rows.Close()
	var out []T
	for rows.Next() {
		v, err := scan(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return out, nil
}

func isUniqueViolation(err error, constraint string) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "23505" && (constraint == "" || pe.ConstraintName == constraint)
}

// Notify sends a NOTIFY within the caller's transaction (delivered at commit).
func (q *Queries) Notify(ctx context.Context, channel, payload string) error {
	if _, err := q.db.Exec(ctx, "SELECT pg_notify($1, $2)", channel, payload); err != nil {
		return fmt.Errorf("notify %s: %w", channel, err)
	}
	return nil
}

// InsertAudit appends one audit row.
func (q *Queries) InsertAudit(ctx context.Context, e orch.AuditEntry) error {
	md := e.Metadata
	if md == nil {
		md = map[string]any{}
	}
	b, err := json.Marshal(md)
	if err != nil {
		return fmt.Errorf("encode audit metadata: %w", err)
	}
	_, err = q.db.Exec(ctx, `INSERT INTO audit_log (product_id, user_id, engine_id, action, actor, metadata, duration_ms)
		VALUES ($1, $2, $3, $4, $5, $6, $7)`,
		nullUUID(e.ProductID), nullText(e.UserID), nullUUID(e.EngineID), string(e.Action), e.Actor, b, e.DurationMS)
	if err != nil {
		return fmt.Errorf("insert audit %s: %w", e.Action, err)
	}
	return nil
}

func nullText(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

func nullUUID(s string) *string { return nullText(s) }
