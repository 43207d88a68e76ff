// Package drill rehearses a Postgres disaster recovery on a live fleet:
// dump the live database, restore the dump into an empty database, point
// a fresh orchestrator (the API role, no workers) at the copy, and check
// that it sees the same fleet and that every running engine is reachable
// with the key the copy holds for it. `orchestrator drill` runs it.
//
// What it touches: the live database is only read (one REPEATABLE READ
// transaction whose snapshot pg_dump shares, so the expected fleet and the
// dump are the same instant). The copy is written: the fresh API rotates
// each product's platform key there to act as the product, and admits
// write audit rows there. Engines are only called: admit on a running
// engine starts no job, and no worker runs against the copy (its fleet id
// is the live fleet's: workers on it would manage the live engines).
package drill

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/schema"
)

// Config says what to drill.
type Config struct {
	LiveURL   string // the live fleet's database (ORCH_DATABASE_URL)
	TargetURL string // an empty database on another server, restored into
	AdminKey  string // the fleet's admin key (the copy has the same)
	// Binary is the orchestrator binary run as the fresh API, with Env
	// (the caller's environment: master keys and engine URL template)
	// plus the copy's database URL and a loopback listen address.
	Binary string
	Env    []string
	// EnginePath is requested on each engine without and with its key:
	// the engine contract has every route but /health refuse a missing
	// key (401), so a key the engine accepts proves it is that engine's.
	EnginePath string
	// PGBin is a directory holding pg_dump and pg_restore ("" = PATH).
	PGBin string
	Out   io.Writer // progress and the verdict
}

// Result is what a drill found.
type Result struct {
	Products, Engines, Reachable, NotRunning int
	Problems                                 []string
	Took                                     time.Duration
}

// expected is the live fleet at the dump's instant.
type expected struct {
	products []orch.Product
	counts   map[string]map[orch.State]int
	engines  map[string][]orch.Engine
}

// Run runs the drill; the Result's Problems say what did not match (an
// error is returned when a step could not run at all).
func Run(ctx context.Context, cfg Config) (Result, error) {
	start := time.Now()
	var res Result
	if cfg.EnginePath == "" {
		cfg.EnginePath = "/"
	}
	if cfg.Out == nil {
		cfg.Out = io.Discard
	}
	if err := checkTarget(ctx, cfg); err != nil {
		return res, err
	}
	dir, err := os.MkdirTemp("", "orchestrator-drill-")
	if err != nil {
		return res, fmt.Errorf("temporary directory: %w", err)
	}
	defer os.RemoveAll(dir)
	dump := filepath.Join(dir, "live.dump")

	want, err := dumpLive(ctx, cfg, dump)
	if err != nil {
		return res, err
	}
	fi, _ := os.Stat(dump)
	var size int64
	if fi != nil {
		size = fi.Size()
	}
	fmt.Fprintf(cfg.Out, "drill: dumped the live database: %d bytes, %d products, %d engines (%s)\n",
		size, len(want.products), countEngines(want), time.Since(start).Round(time.Millisecond))

	t := time.Now()
	if err := pgTool(ctx, cfg, "pg_restore", cfg.TargetURL, "--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction", dump); err != nil {
		return res, err
	}
	fmt.Fprintf(cfg.Out, "drill: restored into %s (%s)\n", redacted(cfg.TargetURL), time.Since(t).Round(time.Millisecond))

	t = time.Now()
	api, stop, err := startAPI(ctx, cfg, dir)
	if err != nil {
		return res, err
	}
	defer stop()
	fmt.Fprintf(cfg.Out, "drill: a fresh orchestrator (api role) on the copy is healthy at %s (%s)\n", api, time.Since(t).Round(time.Millisecond))

	c := &client{base: api, admin: cfg.AdminKey, http: &http.Client{Timeout: 30 * time.Second}}
	res.Products = len(want.products)
	for _, p := range want.products {
		res.Problems = append(res.Problems, checkProduct(ctx, cfg, c, p, want, &res)...)
	}
	res.Took = time.Since(start)
	return res, nil
}

func countEngines(e expected) int {
	n := 0
	for _, es := range e.engines {
		n += len(es)
	}
	return n
}

// checkTarget refuses a target that is the live database or not empty:
// a drill never restores over data.
func checkTarget(ctx context.Context, cfg Config) error {
	if cfg.TargetURL == "" {
		return errors.New("no target database: give an empty database on another server (--target)")
	}
	if cfg.TargetURL == cfg.LiveURL {
		return errors.New("the target is the live database")
	}
	conn, err := pgx.Connect(ctx, cfg.TargetURL)
	if err != nil {
		return fmt.Errorf("connect to the target: %s", redactErr(err, cfg.TargetURL))
	}
	defer conn.Close(ctx)
	tables, err := schema.UserTableCount(ctx, conn)
	if err != nil {
		return fmt.Errorf("target: %w", err)
	}
	if tables > 0 {
		return fmt.Errorf("the target database is not empty (%d tables): a drill restores into an empty one only", tables)
	}
	return nil
}

// dumpLive reads the expected fleet and runs pg_dump on one snapshot.
func dumpLive(ctx context.Context, cfg Config, file string) (expected, error) {
	want := expected{counts: map[string]map[orch.State]int{}, engines: map[string][]orch.Engine{}}
	conn, err := pgx.Connect(ctx, cfg.LiveURL)
	if err != nil {
		return want, fmt.Errorf("connect to the live database: %s", redactErr(err, cfg.LiveURL))
	}
	defer conn.Close(ctx)
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return want, fmt.Errorf("live database: begin: %w", err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // read only
	snapshot, err := schema.ExportSnapshot(ctx, tx)
	if err != nil {
		return want, fmt.Errorf("live database: %w", err)
	}
	q := schema.New(tx)
	for off := 0; ; off += 1000 {
		ps, total, err := q.ListProducts(ctx, 1000, off)
		if err != nil {
			return want, fmt.Errorf("live database: %w", err)
		}
		want.products = append(want.products, ps...)
		if off+len(ps) >= total || len(ps) == 0 {
			break
		}
	}
	for _, p := range want.products {
		if want.counts[p.ID], err = q.StatusCounts(ctx, p.ID); err != nil {
			return want, fmt.Errorf("live database: %w", err)
		}
		for off := 0; ; off += 1000 {
			es, total, err := q.ListEngines(ctx, p.ID, "", 1000, off)
			if err != nil {
				return want, fmt.Errorf("live database: %w", err)
			}
			want.engines[p.ID] = append(want.engines[p.ID], es...)
			if off+len(es) >= total || len(es) == 0 {
				break
			}
		}
	}
	// The transaction stays open until pg_dump is done: its snapshot must
	// live while pg_dump imports it.
	if err := pgTool(ctx, cfg, "pg_dump", cfg.LiveURL, "--format=custom", "--snapshot="+snapshot, "--file="+file); err != nil {
		return want, err
	}
	return want, nil
}

// pgTool runs pg_dump or pg_restore on dbURL, its password in PGPASSWORD
// rather than on a command line other users can read.
func pgTool(ctx context.Context, cfg Config, tool, dbURL string, args ...string) error {
	bin := tool
	if cfg.PGBin != "" {
		bin = filepath.Join(cfg.PGBin, tool)
	}
	u, err := url.Parse(dbURL)
	if err != nil {
		return fmt.Errorf("%s: database URL: %w", tool, err)
	}
	env := os.Environ()
	if u.User != nil {
		if pw, ok := u.User.Password(); ok {
			env = append(env, "PGPASSWORD="+pw)
			u.User = url.User(u.User.Username())
		}
	}
	cmd := exec.CommandContext(ctx, bin, append([]string{"--dbname=" + u.String()}, args...)...)
	cmd.Env = env
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s: %w: %s", tool, err, strings.TrimSpace(redactErr(errors.New(stderr.String()), dbURL)))
	}
	return nil
}

// startAPI runs `orchestrator serve --roles=api` on the copy on a free
// loopback port and waits for its /health; stop ends it.
func startAPI(ctx context.Context, cfg Config, dir string) (base string, stop func(), err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, fmt.Errorf("free port: %w", err)
	}
	addr := ln.Addr().String()
	ln.Close()
	env := make([]string, 0, len(cfg.Env)+4)
	for _, kv := range cfg.Env {
		name, _, _ := strings.Cut(kv, "=")
		switch name {
		case "ORCH_DATABASE_URL", "ORCH_DATABASE_URL_FILE", "ORCH_LISTEN_ADDR", "ORCH_METRICS_ADDR", "ORCH_DATABASE_MAX_CONNS":
			continue
		}
		env = append(env, kv)
	}
	env = append(env, "ORCH_DATABASE_URL="+cfg.TargetURL, "ORCH_LISTEN_ADDR="+addr, "ORCH_METRICS_ADDR=off")
	logPath := filepath.Join(dir, "api.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return "", nil, fmt.Errorf("api log: %w", err)
	}
	cmd := exec.Command(cfg.Binary, "serve", "--roles=api")
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return "", nil, fmt.Errorf("start the fresh orchestrator: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop = func() {
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		logf.Close()
	}
	base = "http://" + addr
	deadline := time.Now().Add(2 * time.Minute)
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/health", nil)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return base, stop, nil
			}
		}
		select {
		case err := <-exited:
			exited <- err
			stop()
			return "", nil, fmt.Errorf("the fresh orchestrator exited (%v): %s", err, tail(logPath))
		case <-ctx.Done():
			stop()
			return "", nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			stop()
			return "", nil, fmt.Errorf("the fresh orchestrator is not healthy after 2 minutes: %s", tail(logPath))
		}
	}
}

// tail is the end of a log file, for an error.
func tail(path string) string {
	b, _ := os.ReadFile(path)
	var lines []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	if len(lines) > 10 {
		lines = lines[len(lines)-10:]
	}
	return strings.Join(lines, "\n")
}

// checkProduct compares the copy's /status with the expected counts and
// admits every running engine, then calls it with and without its key.
func checkProduct(ctx context.Context, cfg Config, c *client, p orch.Product, want expected, res *Result) []string {
	var problems []string
	bad := func(format string, args ...any) {
		problems = append(problems, fmt.Sprintf("product %s: ", p.Slug)+fmt.Sprintf(format, args...))
	}
	var rot struct {
		Key string `json:"platform_api_key"`
	}
	if st, err := c.do(ctx, http.MethodPost, "/products/"+p.ID+"/rotate-platform-key", "", map[string]any{"overlap_seconds": 0}, &rot); err != nil || st != http.StatusOK {
		bad("rotate its platform key on the copy: status %d: %v", st, err)
		return problems
	}
	var status struct {
		Total    int            `json:"total"`
		ByStatus map[string]int `json:"by_status"`
	}
	if st, err := c.do(ctx, http.MethodGet, "/status", rot.Key, nil, &status); err != nil || st != http.StatusOK {
		bad("GET /status: status %d: %v", st, err)
		return problems
	}
	total := 0
	for _, s := range orch.States {
		n := want.counts[p.ID][s]
		total += n
		if status.ByStatus[string(s)] != n {
			bad("/status says %d %s, the live database had %d", status.ByStatus[string(s)], s, n)
		}
	}
	if status.Total != total {
		bad("/status says %d engines, the live database had %d", status.Total, total)
	}
	fmt.Fprintf(cfg.Out, "drill: product %s: /status %d engines %s\n", p.Slug, status.Total, formatCounts(status.ByStatus))

	reached := 0
	for _, e := range want.engines[p.ID] {
		res.Engines++
		if e.Status != orch.StateRunning {
			res.NotRunning++
			continue
		}
		if msg := checkEngine(ctx, cfg, c, rot.Key, e); msg != "" {
			bad("engine of user %s: %s", e.UserID, msg)
			continue
		}
		reached++
	}
	res.Reachable += reached
	fmt.Fprintf(cfg.Out, "drill: product %s: %d running engines admitted and answering to their keys\n", p.Slug, reached)
	return problems
}

func formatCounts(m map[string]int) string {
	var parts []string
	for k, v := range m {
		if v > 0 {
			parts = append(parts, k+" "+strconv.Itoa(v))
		}
	}
	sort.Strings(parts)
	return "(" + strings.Join(parts, ", ") + ")"
}

// checkEngine admits a running engine through the copy and calls it: ""
// when it answered to its key and refused no key.
func checkEngine(ctx context.Context, cfg Config, c *client, platformKey string, e orch.Engine) string {
	var adm struct {
		Admitted bool   `json:"admitted"`
		Reason   string `json:"reason"`
		Engine   *struct {
			EngineID string `json:"engine_id"`
			URL      string `json:"url"`
			APIKey   string `json:"api_key"`
		} `json:"engine"`
	}
	st, err := c.do(ctx, http.MethodPost, "/engines/"+url.PathEscape(e.UserID)+"/admit", platformKey, map[string]any{}, &adm)
	switch {
	case err != nil:
		return "admit: " + err.Error()
	case st != http.StatusOK || !adm.Admitted || adm.Engine == nil:
		return fmt.Sprintf("admit: status %d, admitted %v, reason %q", st, adm.Admitted, adm.Reason)
	case adm.Engine.EngineID != e.ID:
		return "admit named engine " + adm.Engine.EngineID + ", the live database had " + e.ID
	}
	call := func(key string) (int, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(adm.Engine.URL, "/")+cfg.EnginePath, nil)
		if err != nil {
			return 0, err
		}
		if key != "" {
			req.Header.Set("X-Engine-Key", key)
		}
		resp, err := c.http.Do(req)
		if err != nil {
			return 0, err
		}
		io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20)) //nolint:errcheck
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	without, err := call("")
	if err != nil {
		return "not reachable at its URL: " + err.Error()
	}
	if without != http.StatusUnauthorized && without != http.StatusForbidden {
		return fmt.Sprintf("answered %d without a key to GET %s (expected 401): not an engine that checks keys", without, cfg.EnginePath)
	}
	with, err := call(adm.Engine.APIKey)
	if err != nil {
		return "not reachable at its URL: " + err.Error()
	}
	if with == http.StatusUnauthorized || with == http.StatusForbidden || with >= 500 {
		return fmt.Sprintf("refused the key the copy holds for it (%d)", with)
	}
	return ""
}

// client calls the fresh API, waiting out 429s.
type client struct {
	base, admin string
	http        *http.Client
}

func (c *client) do(ctx context.Context, method, path, platformKey string, body, out any) (int, error) {
	for {
		var rd io.Reader
		if body != nil {
			j, _ := json.Marshal(body)
			rd = bytes.NewReader(j)
		}
		req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
		if err != nil {
			return 0, err
		}
		if body != nil {
			req.Header.Set("Content-Type", "application/json")
		}
		if platformKey != "" {
			req.Header.Set("X-Platform-Key", platformKey)
		} else {
			req.Header.Set("X-Admin-Key", c.admin)
		}
		resp, err := c.http.Do(req)
		if err != nil {
			return 0, err
		}
		b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
		resp.Body.Close()
		if err != nil {
			return resp.StatusCode, err
		}
		if resp.StatusCode == http.StatusTooManyRequests {
			wait, _ := strconv.Atoi(resp.Header.Get("Retry-After"))
			select {
			case <-ctx.Done():
				return 0, ctx.Err()
			case <-time.After(time.Duration(max(wait, 1)) * time.Second):
			}
			continue
		}
		if resp.StatusCode < 300 && out != nil {
			if err := json.Unmarshal(b, out); err != nil {
				return resp.StatusCode, fmt.Errorf("decode: %w", err)
			}
		}
		if resp.StatusCode >= 300 {
			return resp.StatusCode, fmt.Errorf("%s", strings.TrimSpace(string(b)))
		}
		return resp.StatusCode, nil
	}
}

// redacted is dbURL without its password.
func redacted(dbURL string) string {
	u, err := url.Parse(dbURL)
	if err != nil {
		return "(target)"
	}
	if u.User != nil {
		u.User = url.User(u.User.Username())
	}
	return u.String()
}

// redactErr is err's text without dbURL's password.
func redactErr(err error, dbURL string) string {
	s := err.Error()
	if u, perr := url.Parse(dbURL); perr == nil && u.User != nil {
		if pw, ok := u.User.Password(); ok && pw != "" {
			s = strings.ReplaceAll(s, pw, "***")
		}
	}
	return s
}
