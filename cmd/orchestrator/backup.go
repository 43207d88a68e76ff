package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/lifecycle"
	"github.com/enginefleet/orchestrator/schema"
)

const backupUsage = `usage:
  orchestrator backup list --product P --user U
  orchestrator backup restore --product P --user U --backup ID [--async] [--timeout 10m]

P is a product slug or id. restore enqueues the restore as an admin
operation (a worker runs it) and waits for its outcome.`

// backupCommand runs `orchestrator backup …`.
func backupCommand(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	if len(args) == 0 || (args[0] != "restore" && args[0] != "list") {
		fmt.Fprintln(stderr, backupUsage)
		return errors.New("usage: orchestrator backup list|restore")
	}
	fs := flag.NewFlagSet("backup "+args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	product := fs.String("product", "", "product slug or id")
	user := fs.String("user", "", "the product's user id")
	backupID := fs.String("backup", "", "backup id (restore)")
	async := fs.Bool("async", false, "restore: print the operation id and return at once")
	timeout := fs.Duration("timeout", 10*time.Minute, "restore: how long to wait for the outcome")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if *product == "" || *user == "" || (args[0] == "restore" && *backupID == "") {
		fmt.Fprintln(stderr, backupUsage)
		return errors.New("--product, --user and (for restore) --backup are required")
	}
	return withDB(ctx, getenv, nil, func(cfg Config, pool *pgxpool.Pool, log *slog.Logger) error {
		p, err := schema.New(pool).ProductByRef(ctx, *product)
		if err != nil {
			return err
		}
		if args[0] == "list" {
			return listBackups(ctx, pool, p, *user, stdout)
		}
		return restoreBackup(ctx, cfg, pool, log, p, *user, *backupID, *async, *timeout, stdout)
	})
}

func listBackups(ctx context.Context, pool *pgxpool.Pool, p orch.Product, user string, stdout io.Writer) error {
	bs, total, err := schema.New(pool).ListUserBackups(ctx, p.ID, user, 1000, 0)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%-36s  %-24s  %-9s  %12s  %-36s  %s\n", "BACKUP", "CREATED", "TRIGGER", "BYTES", "ENGINE", "SHA256")
	for _, b := range bs {
		fmt.Fprintf(stdout, "%-36s  %-24s  %-9s  %12d  %-36s  %s\n", b.ID, b.CreatedAt.UTC().Format(time.RFC3339), b.Trigger,
			b.SizeBytes, b.EngineID, b.SHA256)
	}
	fmt.Fprintf(stdout, "%d backups\n", total)
	return nil
}

// restoreBackup starts the restore through the lifecycle core (the same
// checks and operation as POST /engines/{user_id}/restore, actor "admin")
// and waits for its outcome the way the API does: woken by NOTIFY.
func restoreBackup(ctx context.Context, cfg Config, pool *pgxpool.Pool, log *slog.Logger, p orch.Product, user, backupID string,
	async bool, timeout time.Duration, stdout io.Writer) error {
	kr, err := keys.NewKeyring(cfg.MasterKey, cfg.MasterKeyPrev)
	if err != nil {
		return err
	}
	rc, err := river.NewClient[pgx.Tx](riverpgxv5.New(pool), &river.Config{Logger: log})
	if err != nil {
		return fmt.Errorf("river client: %w", err)
	}
	core := lifecycle.New(coreConfig(cfg), pool, rc, kr, log)
	lctx, stop := context.WithCancel(ctx)
	defer stop()
	go core.Run(lctx) // the listener a wait is woken by
	e, opID, err := core.Restore(ctx, p, user, backupID, orch.ActorAdmin)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "restoring backup %s into engine %s (product %s, user %s): operation %s\n", backupID, e.ID, p.Slug, user, opID)
	if async {
		return nil
	}
	if err := core.Wait(ctx, p.ID, opID, timeout); err != nil {
		if orch.IsCode(err, orch.CodeBackendTimeout) || orch.IsCode(err, orch.CodeBootTimeout) {
			return fmt.Errorf("restore still not finished after %s (is a worker running?); follow operation %s", timeout, opID)
		}
		return fmt.Errorf("restore failed: %w", err)
	}
	fmt.Fprintf(stdout, "restored: engine %s is running\n", e.ID)
	return nil
}
