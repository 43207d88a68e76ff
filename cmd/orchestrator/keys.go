package main

import (
	"context"
	"errors"
	"io"
	"log/slog"

	"github.com/jackc/pgx/v5/pgxpool"
)

// rotateMaster re-encrypts every engine key under the current master key.
// TODO(issue 3).
func rotateMaster(ctx context.Context, cfg Config, pool *pgxpool.Pool, log *slog.Logger, out io.Writer) error {
	return errors.New("not implemented")
}
