package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/enginefleet/orchestrator/drill"
)

// drillCommand runs the Postgres restore drill (package drill) on the
// fleet of ORCH_DATABASE_URL.
func drillCommand(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := flag.NewFlagSet("drill", flag.ContinueOnError)
	fs.SetOutput(stderr)
	target := fs.String("target", "", "an EMPTY database on another Postgres server to restore into (postgresql://...); refused when it holds any table")
	enginePath := fs.String("engine-path", "/", "path requested on each running engine without and with its key (the engine must answer 401 without)")
	pgBin := fs.String("pg-bin", "", "directory of pg_dump and pg_restore (default: PATH); their major version must be at least the servers'")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *target == "" {
		fs.Usage()
		return errors.New("drill: --target is required")
	}
	cfg, err := loadConfig(getenv)
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("drill: %w", err)
	}
	res, err := drill.Run(ctx, drill.Config{LiveURL: cfg.DatabaseURL, TargetURL: *target, AdminKey: cfg.AdminKey,
		Binary: self, Env: os.Environ(), EnginePath: *enginePath, PGBin: *pgBin, Out: stdout})
	if err != nil {
		return fmt.Errorf("drill: %s", redactURL(redactURL(err.Error(), cfg.DatabaseURL), *target))
	}
	if len(res.Problems) > 0 {
		for _, p := range res.Problems {
			fmt.Fprintln(stdout, "drill: FAIL:", p)
		}
		return fmt.Errorf("drill failed: %d problems (%s)", len(res.Problems), strings.SplitN(res.Problems[0], "\n", 2)[0])
	}
	fmt.Fprintf(stdout, "drill: ok: %d products, %d engines as expected, %d running engines reachable with their keys (%d not running, not called), in %s; the copy stays in the target database: drop it when done\n",
		res.Products, res.Engines, res.Reachable, res.NotRunning, res.Took.Round(1e6))
	return nil
}
