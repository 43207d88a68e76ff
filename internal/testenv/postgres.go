// Package testenv is test support shared by the project's test suites: a
// fresh migrated Postgres database per test, the reference engine built as a
// binary or image, and the Docker requirement rule (skip locally, fail in CI).
package testenv

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/enginefleet/orchestrator/schema"
)

// BaseURL is the server tests create their databases on:
// ORCH_TEST_DATABASE_URL, which `make test` sets after starting Postgres.
func BaseURL(t testing.TB) string {
	t.Helper()
	u := os.Getenv("ORCH_TEST_DATABASE_URL")
	if u == "" {
		t.Fatal("ORCH_TEST_DATABASE_URL is not set: run `make test` (it starts a throwaway Postgres) or point it at a server where databases may be created")
	}
	return u
}

// withDB replaces the database name in a postgres URL.
func withDB(base, db string) string {
	cfg, err := pgx.ParseConfig(base)
	if err != nil {
		panic(err)
	}
	// Rebuild from parts: keep host, port, user, password, sslmode.
	u := fmt.Sprintf("postgresql://%s@%s:%d/%s?sslmode=disable", cfg.User, cfg.Host, cfg.Port, db)
	if cfg.Password != "" {
		u = fmt.Sprintf("postgresql://%s:%s@%s:%d/%s?sslmode=disable", cfg.User, cfg.Password, cfg.Host, cfg.Port, db)
	}
	return u
}

func randName(prefix string) string {
	b := make([]byte, 6)
	rand.Read(b) //nolint:errcheck
	return prefix + hex.EncodeToString(b)
}

// Quiet is a logger that drops everything, for components under test.
func Quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// templateName names the migrated template database after the migrations'
// content, so a schema change gets a fresh template.
func templateName() string {
	ms, err := schema.Migrations()
	if err != nil {
		panic(err)
	}
	h := sha256.New()
	for _, m := range ms {
		h.Write([]byte(m.SQL))
	}
	return "orch_tmpl_" + hex.EncodeToString(h.Sum(nil))[:12]
}

func adminConn(ctx context.Context, t testing.TB) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(ctx, BaseURL(t))
	if err != nil {
		t.Fatalf("connect to test postgres: %v", err)
	}
	return conn
}

// ensureTemplate creates and migrates the template database once per
// schema version, serialized across test processes by an advisory lock.
func ensureTemplate(ctx context.Context, t testing.TB, conn *pgx.Conn) string {
	t.Helper()
	name := templateName()
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock(4242)"); err != nil {
		t.Fatalf("template lock: %v", err)
	}
	defer conn.Exec(ctx, "SELECT pg_advisory_unlock(4242)") //nolint:errcheck
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1 AND datistemplate)", name).Scan(&exists); err != nil {
		t.Fatalf("check template: %v", err)
	}
	if exists {
		return name
	}
	conn.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)") //nolint:errcheck
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("create template: %v", err)
	}
	pool, err := pgxpool.New(ctx, withDB(BaseURL(t), name))
	if err != nil {
		t.Fatalf("connect template: %v", err)
	}
	if err := schema.MigrateUp(ctx, pool, Quiet()); err != nil {
		pool.Close()
		t.Fatalf("migrate template: %v", err)
	}
	pool.Close()
	if _, err := conn.Exec(ctx, "ALTER DATABASE "+name+" WITH is_template true"); err != nil {
		t.Fatalf("mark template: %v", err)
	}
	return name
}

// DB returns the URL of a fresh, fully migrated database of its own for
// this test, dropped when the test ends. Tests using it may run in parallel.
func DB(t testing.TB) string {
	t.Helper()
	return newDB(t, true)
}

// EmptyDB returns the URL of a fresh database with no migrations applied.
func EmptyDB(t testing.TB) string {
	t.Helper()
	return newDB(t, false)
}

func newDB(t testing.TB, migrated bool) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conn := adminConn(ctx, t)
	defer conn.Close(ctx)
	name := randName("orch_t_")
	stmt := "CREATE DATABASE " + name
	if migrated {
		stmt += " TEMPLATE " + ensureTemplate(ctx, t, conn)
	}
	var err error
	// The template may be briefly in use by a concurrent CREATE: wait for
	// it to be free; any other error ends the wait.
	busy := Poll(10*time.Second, func() error {
		_, err = conn.Exec(ctx, stmt)
		if err != nil && strings.Contains(err.Error(), "being accessed by other users") {
			return err
		}
		return nil
	})
	if busy != nil || err != nil {
		t.Fatalf("create test database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, BaseURL(t))
		if err != nil {
			return
		}
		defer c.Close(ctx)
		c.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)") //nolint:errcheck
	})
	url := withDB(BaseURL(t), name)
	if migrated {
		// A copy of the template would share its fleet id: each test
		// database is a deployment of its own.
		c, err := pgx.Connect(ctx, url)
		if err != nil {
			t.Fatalf("connect test database: %v", err)
		}
		defer c.Close(ctx)
		if _, err := c.Exec(ctx, "UPDATE fleet SET id = gen_random_uuid()"); err != nil {
			t.Fatalf("new fleet id: %v", err)
		}
	}
	return url
}

// Pool opens a pool on url, closed when the test ends.
func Pool(t testing.TB, url string) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatalf("open pool: %v", err)
	}
	t.Cleanup(pool.Close)
	return pool
}
