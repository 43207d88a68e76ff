// Command orchestrator runs the engine fleet orchestrator: the API, worker
// and scheduler roles (together or apart), migrations, the OpenAPI
// document and key tools. Configuration comes from the environment only.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
	"github.com/enginefleet/orchestrator/server"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `usage: orchestrator <command> [flags]

commands:
  serve [--roles=api,worker,scheduler]   run the given roles (default: all three)
  migrate up|status                      apply or show database migrations
  openapi                                print the OpenAPI document (YAML)
  keys generate                          print a fresh master key and admin key
  keys rotate-master                     re-encrypt every engine key under ORCH_MASTER_KEY
  backup list --product P --user U       list a user's brain backups
  backup restore --product P --user U --backup ID
                                         restore a backup into the user's engine (a worker runs it)
  audit verify [--head SEQ:SHA256] DIR   check the audit export hash chain in DIR
  drill --target URL                     Postgres restore drill: pg_dump this fleet's database, restore it
                                         into the empty database URL, run a fresh API on it, check /status
                                         and that every running engine answers to its key (docs/production.md)
  version                                print the version
`

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr, os.Getenv); err != nil {
		fmt.Fprintln(os.Stderr, "orchestrator:", err)
		os.Exit(1)
	}
}

func run(args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errors.New("no command given")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	switch args[0] {
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	case "version":
		fmt.Fprintln(stdout, version)
		return nil
	case "openapi":
		return writeOpenAPI(stdout)
	case "keys":
		if len(args) > 1 && args[1] == "generate" {
			fmt.Fprintf(stdout, "ORCH_MASTER_KEY=%s\nORCH_ADMIN_KEY=%s\n", keys.GenerateMasterKey(), keys.Generate())
			return nil
		}
		if len(args) > 1 && args[1] == "rotate-master" {
			return withDB(ctx, getenv, nil, func(cfg Config, pool *pgxpool.Pool, log *slog.Logger) error {
				return rotateMaster(ctx, cfg, pool, log, stdout)
			})
		}
		return errors.New("usage: orchestrator keys generate|rotate-master")
	case "backup":
		return backupCommand(ctx, args[1:], stdout, stderr, getenv)
	case "audit":
		return auditCommand(args[1:], stdout, stderr)
	case "drill":
		return drillCommand(ctx, args[1:], stdout, stderr, getenv)
	case "migrate":
		sub := "up"
		if len(args) > 1 {
			sub = args[1]
		}
		return withDB(ctx, getenv, nil, func(cfg Config, pool *pgxpool.Pool, log *slog.Logger) error {
			switch sub {
			case "up":
				return schema.MigrateUp(ctx, pool, log)
			case "status":
				ours, river, err := schema.Status(ctx, pool)
				if err != nil {
					return err
				}
				for _, m := range ours {
					state := "pending"
					if m.Applied {
						state = "applied"
					}
					fmt.Fprintf(stdout, "%-40s %s\n", m.Name, state)
				}
				fmt.Fprintf(stdout, "%-40s %v\n", "river (current)", river)
				return nil
			default:
				return fmt.Errorf("usage: orchestrator migrate up|status")
			}
		})
	case "serve":
		fs := flag.NewFlagSet("serve", flag.ContinueOnError)
		fs.SetOutput(stderr)
		roles := fs.String("roles", "api,worker,scheduler", "comma-separated roles to run: api, worker, scheduler")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		set, err := parseRoles(*roles)
		if err != nil {
			return err
		}
		return withDB(ctx, getenv, &set, func(cfg Config, pool *pgxpool.Pool, log *slog.Logger) error {
			return serve(ctx, cfg, set, pool, log)
		})
	default:
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("unknown command %q", args[0])
	}
}

func parseRoles(s string) (server.Roles, error) {
	var r server.Roles
	for _, p := range splitList(s) {
		switch p {
		case "api":
			r.API = true
		case "worker":
			r.Worker = true
		case "scheduler":
			r.Scheduler = true
		default:
			return r, fmt.Errorf("unknown role %q (want api, worker, scheduler)", p)
		}
	}
	if !r.API && !r.Worker && !r.Scheduler {
		return r, errors.New("--roles names no role")
	}
	return r, nil
}

func newLogger(cfg Config, w io.Writer) *slog.Logger {
	var lvl slog.Level
	lvl.UnmarshalText([]byte(cfg.LogLevel)) //nolint:errcheck // validated in loadConfig
	opts := &slog.HandlerOptions{Level: lvl}
	if cfg.LogFormat == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// withDB loads the configuration, connects with a pool sized for the
// roles served (nil: a CLI command), migrates when serving, and runs fn.
func withDB(ctx context.Context, getenv func(string) string, serving *server.Roles, fn func(Config, *pgxpool.Pool, *slog.Logger) error) error {
	cfg, err := loadConfig(getenv)
	if err != nil {
		return err
	}
	conns, err := poolSize(cfg, serving)
	if err != nil {
		return err
	}
	out := newLogWriter(os.Stdout) // batched: see logwriter.go
	defer out.Close()
	log := newLogger(cfg, out)
	for _, w := range cfg.Warnings {
		log.Warn(w)
	}
	pcfg, err := pgxpool.ParseConfig(cfg.DatabaseURL)
	if err != nil {
		return fmt.Errorf("ORCH_DATABASE_URL: %w", err)
	}
	pcfg.MaxConns = int32(conns)
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return fmt.Errorf("connect to postgres: %w", err)
	}
	defer pool.Close()
	// Wait for Postgres up to a minute: in compose it may still be starting.
	deadline := time.Now().Add(time.Minute)
	for {
		pctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		err = pool.Ping(pctx)
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("connect to postgres: %s", redactURL(err.Error(), cfg.DatabaseURL))
		}
		log.Warn("postgres not reachable yet; retrying", "error", redactURL(err.Error(), cfg.DatabaseURL))
		time.Sleep(time.Second)
	}
	if serving != nil {
		if err := server.UntilReachable(ctx, log, "migrate", func() error { return schema.MigrateUp(ctx, pool, log) }); err != nil {
			return err
		}
	}
	return fn(cfg, pool, log)
}

// redactURL keeps a database password out of error text.
func redactURL(s, dbURL string) string {
	if i := strings.Index(dbURL, "://"); i >= 0 {
		if j := strings.Index(dbURL[i+3:], "@"); j >= 0 {
			userinfo := dbURL[i+3 : i+3+j]
			if k := strings.Index(userinfo, ":"); k >= 0 && k+1 < len(userinfo) {
				return strings.ReplaceAll(s, userinfo[k+1:], "***")
			}
		}
	}
	return s
}
