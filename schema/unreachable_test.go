package schema_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/schema"
)

func TestUnreachable(t *testing.T) {
	t.Parallel()
	for err, want := range map[error]bool{
		nil:                            false,
		errors.New("boom"):             false,
		pgx.ErrNoRows:                  false,
		&pgconn.PgError{Code: "23505"}: false, // a unique violation is the request's fault
		&pgconn.PgError{Code: "08006"}: true,
		&pgconn.PgError{Code: "57P01"}: true,
		fmt.Errorf("scan engine: %w", io.ErrUnexpectedEOF): true,
		context.Canceled: false,
	} {
		assert.Equal(t, want, schema.Unreachable(err), "%v", err)
	}

	// The real thing: a port nothing listens on.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := pgx.Connect(ctx, "postgres://x@127.0.0.1:1/x?connect_timeout=2")
	require.Error(t, err)
	assert.True(t, schema.Unreachable(fmt.Errorf("get engine: %w", err)), "%v", err)
}
