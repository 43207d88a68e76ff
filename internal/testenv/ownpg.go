package testenv

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/enginefleet/orchestrator/schema"
)

// PGServer is a PostgreSQL server of one test's own, for drills that must
// restart or stop the database without disturbing the other tests (which
// share the server `make test` started).
type PGServer struct {
	URL  string // of its migrated database "orch"
	dir  string
	port int
	t    testing.TB
}

// pgBin finds a PostgreSQL server binary on PATH or in Debian's versioned
// directory, as scripts/pg.sh does.
func pgBin(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	ms, _ := filepath.Glob("/usr/lib/postgresql/*/bin/" + name)
	if len(ms) > 0 {
		return ms[len(ms)-1], nil
	}
	return "", fmt.Errorf("%s not found (install the PostgreSQL server)", name)
}

// asPostgres runs a server binary as the postgres user when this process
// is root (initdb refuses root).
func asPostgres(bin string, args ...string) *exec.Cmd {
	if os.Geteuid() == 0 {
		return exec.Command("runuser", append([]string{"-u", "postgres", "--", bin}, args...)...)
	}
	return exec.Command(bin, args...)
}

// OwnPostgres initialises and starts a fresh PostgreSQL server in a
// temporary directory on a free loopback port, with a migrated database,
// stopped and removed when the test ends. Missing server binaries make the
// test fail in CI and skip elsewhere (Unavailable).
func OwnPostgres(t testing.TB) *PGServer {
	t.Helper()
	initdb, err := pgBin("initdb")
	if err != nil {
		Unavailable(t, "%v", err)
	}
	dir, err := os.MkdirTemp("", "orch-pg-")
	if err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Fatalf("running as root needs a postgres user: %v", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	s := &PGServer{dir: dir, port: FreePort(t), t: t}
	t.Cleanup(func() {
		s.ctl("stop", "-m", "immediate") //nolint:errcheck
		os.RemoveAll(dir)
	})
	if out, err := asPostgres(initdb, "-D", filepath.Join(dir, "data"), "-U", "postgres", "-A", "trust", "-E", "UTF8").CombinedOutput(); err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	if err := s.ctl("start"); err != nil {
		t.Fatal(err)
	}
	base := fmt.Sprintf("postgresql://postgres@127.0.0.1:%d/postgres?sslmode=disable", s.port)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, base)
	if err != nil {
		t.Fatalf("connect to own postgres: %v", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE orch"); err != nil {
		t.Fatalf("create database: %v", err)
	}
	s.URL = withDB(base, "orch")
	pool := Pool(t, s.URL)
	if err := schema.MigrateUp(ctx, pool, Quiet()); err != nil {
		t.Fatalf("migrate own postgres: %v", err)
	}
	pool.Close()
	return s
}

// ctl runs pg_ctl with the server's options.
func (s *PGServer) ctl(action string, extra ...string) error {
	pgctl, err := pgBin("pg_ctl")
	if err != nil {
		return err
	}
	args := []string{"-D", filepath.Join(s.dir, "data"), "-l", filepath.Join(s.dir, "server.log"), "-w", "-t", "60"}
	args = append(args, extra...)
	if action == "start" || action == "restart" {
		args = append(args, "-o", fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off", s.port, s.dir))
	}
	args = append(args, action)
	if out, err := asPostgres(pgctl, args...).CombinedOutput(); err != nil {
		log, _ := os.ReadFile(filepath.Join(s.dir, "server.log"))
		return fmt.Errorf("pg_ctl %s: %v\n%s\n%s", action, err, out, log)
	}
	return nil
}

// Restart restarts the server the way an operator or a crash would: every
// connection is dropped (fast shutdown), then it accepts again.
func (s *PGServer) Restart() error { return s.ctl("restart", "-m", "fast") }
