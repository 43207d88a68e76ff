package e2e_test

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/auditlog"
	"github.com/enginefleet/orchestrator/jobs"
)

// admin calls the orchestrator with the admin key.
func (f *fleet) admin(method, path string, body any) resp {
	f.t.Helper()
	return do(f.t, method, f.URL+path, body, map[string]string{"X-Admin-Key": adminKey})
}

// insertAudit appends n audit rows for a product at ts (the log is
// append-only; INSERT with an explicit timestamp backdates test rows).
func (f *fleet) insertAudit(productID, user, action string, ts time.Time, n int) {
	f.t.Helper()
	_, err := f.Pool.Exec(context.Background(), `INSERT INTO audit_log ("timestamp", product_id, user_id, action, actor, metadata)
		SELECT $1::timestamptz + i * interval '1 ms', $2, $3, $4, 'system', jsonb_build_object('i', i) FROM generate_series(1, $5) AS i`,
		ts, productID, user, action, n)
	require.NoError(f.t, err)
}

// export requests an export and waits for it to succeed.
func (f *fleet) export(from, to time.Time, productID string) resp {
	f.t.Helper()
	body := map[string]any{"from": from.Format(time.RFC3339Nano), "to": to.Format(time.RFC3339Nano)}
	if productID != "" {
		body["product_id"] = productID
	}
	r := f.admin("POST", "/audit/exports", body)
	require.Equal(f.t, http.StatusAccepted, r.Status, "%v", r.Body)
	id := r.str("export_id")
	var g resp
	require.Eventually(f.t, func() bool {
		g = f.admin("GET", "/audit/exports/"+id, nil)
		return g.str("status") == "succeeded" || g.str("status") == "failed"
	}, 30*time.Second, 20*time.Millisecond)
	require.Equal(f.t, "succeeded", g.str("status"), "%v", g.Body)
	return g
}

// verifyCLI runs `orchestrator audit verify dir` and returns its output and
// whether it exited 0.
func verifyCLI(t *testing.T, dir string, flags ...string) (string, bool) {
	t.Helper()
	args := append(append([]string{"audit", "verify"}, flags...), dir)
	out, err := exec.Command(orchestratorBinary(t), args...).CombinedOutput()
	if err != nil {
		var ee *exec.ExitError
		require.ErrorAs(t, err, &ee)
		return string(out), false
	}
	return string(out), true
}

func copyDir(t *testing.T, src string) string {
	t.Helper()
	dst := t.TempDir()
	ents, err := os.ReadDir(src)
	require.NoError(t, err)
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(dst, e.Name()), b, 0o600))
	}
	return dst
}

// Three exports chain; verify passes. Then, each on a copy of the
// directory: one byte changed, a file deleted, two files swapped, a file
// forged with its manifest rewritten to match: verify fails (exit
// non-zero) and names the file.
func TestAuditExportChain(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{})
	pid, _ := f.product("acme", orch.Policy{})
	base := time.Now().UTC().Add(-4 * time.Hour).Truncate(time.Hour)
	for i := 0; i < 3; i++ {
		f.insertAudit(pid, "u", "start", base.Add(time.Duration(i)*time.Hour+time.Minute), 50+i)
	}

	// The API refuses bad requests.
	require.Equal(t, "INVALID_ADMIN_KEY", f.call("POST", "/audit/exports", "x", map[string]any{"from": base, "to": base.Add(time.Hour)}).code())
	require.Equal(t, "INVALID_REQUEST", f.admin("POST", "/audit/exports", map[string]any{"from": base, "to": base}).code())
	require.Equal(t, "INVALID_REQUEST", f.admin("POST", "/audit/exports", map[string]any{"from": base, "to": time.Now().Add(time.Hour)}).code())
	require.Equal(t, "PRODUCT_NOT_FOUND", f.admin("POST", "/audit/exports", map[string]any{"from": base, "to": base.Add(time.Hour),
		"product_id": "00000000-0000-4000-8000-000000000000"}).code())
	require.Equal(t, "EXPORT_NOT_FOUND", f.admin("GET", "/audit/exports/00000000-0000-4000-8000-000000000000", nil).code())

	var exps []resp
	for i := 0; i < 3; i++ {
		exps = append(exps, f.export(base.Add(time.Duration(i)*time.Hour), base.Add(time.Duration(i+1)*time.Hour), ""))
	}
	for i, e := range exps {
		require.EqualValues(t, i+1, e.Body["seq"])
		require.EqualValues(t, 50+i, e.Body["row_count"])
		if i > 0 {
			require.Equal(t, exps[i-1].str("sha256"), e.str("prev_sha256"), "export %d links to export %d", i+1, i)
		}
	}
	m, err := auditlog.ReadManifest(filepath.Join(f.Exports, exps[1].str("manifest")))
	require.NoError(t, err)
	require.Equal(t, exps[1].str("sha256"), m.SHA256)
	require.Equal(t, exps[0].str("sha256"), m.PrevSHA256)
	require.EqualValues(t, 51, m.Rows)

	out, ok := verifyCLI(t, f.Exports)
	require.True(t, ok, out)
	require.Contains(t, out, "ok: 3 exports, 153 rows")

	// GET /audit/exports lists them newest first; the newest one's seq
	// and sha256 anchor verify to what Postgres recorded.
	list := f.admin("GET", "/audit/exports", nil)
	require.Equal(t, http.StatusOK, list.Status, "%v", list.Body)
	xs := list.Body["exports"].([]any)
	require.Len(t, xs, 3)
	newest := xs[0].(map[string]any)
	require.Equal(t, exps[2].str("export_id"), newest["export_id"])
	require.Equal(t, "succeeded", newest["status"])
	require.Len(t, f.admin("GET", "/audit/exports?limit=1", nil).Body["exports"], 1)
	require.Equal(t, "INVALID_REQUEST", f.admin("GET", "/audit/exports?limit=0", nil).code())
	require.Equal(t, "INVALID_ADMIN_KEY", f.call("GET", "/audit/exports", "x", nil).code())
	head := fmt.Sprintf("--head=%v:%s", newest["seq"], newest["sha256"])
	out, ok = verifyCLI(t, f.Exports, head)
	require.True(t, ok, out)
	out, ok = verifyCLI(t, f.Exports, "--head=3:nothex")
	require.False(t, ok, out)
	require.Contains(t, out, "want SEQ:SHA256")

	file := func(i int) string { return exps[i].str("file") }

	// The newest export replaced together with a consistent manifest
	// breaks no link: only the anchor catches it.
	{
		dir := copyDir(t, f.Exports)
		var buf bytes.Buffer
		w := auditlog.NewWriter(&buf)
		require.NoError(t, w.Write(auditlog.Row{ID: 1 << 40, Timestamp: base.Add(2*time.Hour + time.Minute), ProductID: pid, UserID: "u", Action: "stop", Actor: "system"}))
		require.NoError(t, w.Close())
		mp := filepath.Join(dir, auditlog.ManifestName(file(2)))
		m, err := auditlog.ReadManifest(mp)
		require.NoError(t, err)
		w.Fill(&m)
		require.NoError(t, os.WriteFile(filepath.Join(dir, file(2)), buf.Bytes(), 0o600))
		enc, err := auditlog.EncodeManifest(m)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(mp, enc, 0o600))
		out, ok := verifyCLI(t, dir)
		require.True(t, ok, "without the anchor the forgery passes: %s", out)
		out, ok = verifyCLI(t, dir, head)
		require.False(t, ok, out)
		require.Contains(t, out, "altered")
		require.Contains(t, out, file(2))
	}
	cases := []struct {
		name   string
		tamper func(dir string)
		want   []string
	}{
		{"byte changed", func(dir string) {
			p := filepath.Join(dir, file(1))
			b, _ := os.ReadFile(p)
			b[len(b)/2] ^= 0x20
			os.WriteFile(p, b, 0o600) //nolint:errcheck
		}, []string{"altered", file(1)}},
		{"data file deleted", func(dir string) { os.Remove(filepath.Join(dir, file(1))) }, []string{"missing", file(1)}}, //nolint:errcheck
		{"export deleted", func(dir string) {
			os.Remove(filepath.Join(dir, file(1)))                        //nolint:errcheck
			os.Remove(filepath.Join(dir, auditlog.ManifestName(file(1)))) //nolint:errcheck
		}, []string{"missing", "audit-000002-"}},
		{"two files swapped", func(dir string) {
			a, c := filepath.Join(dir, file(0)), filepath.Join(dir, file(2))
			os.Rename(a, a+".x") //nolint:errcheck
			os.Rename(c, a)      //nolint:errcheck
			os.Rename(a+".x", c) //nolint:errcheck
		}, []string{"reordered", file(0), "export 3"}},
		{"file forged, manifest rewritten", func(dir string) {
			// Replace export 2 by other bytes (export 1's) and rewrite its
			// manifest to match: only the chain links can tell.
			b, _ := os.ReadFile(filepath.Join(dir, file(0)))
			os.WriteFile(filepath.Join(dir, file(1)), b, 0o600) //nolint:errcheck
			mp := filepath.Join(dir, auditlog.ManifestName(file(1)))
			m, _ := auditlog.ReadManifest(mp)
			m.SHA256 = exps[0].str("sha256")
			m.PrevSHA256 = ""
			m.Rows = 50
			m.From, m.To = base, base.Add(time.Hour)
			enc, _ := auditlog.EncodeManifest(m)
			os.WriteFile(mp, enc, 0o600) //nolint:errcheck
		}, []string{"altered", file(1)}},
	}
	for _, c := range cases {
		dir := copyDir(t, f.Exports)
		c.tamper(dir)
		out, ok := verifyCLI(t, dir)
		require.False(t, ok, "%s: verify must fail: %s", c.name, out)
		for _, w := range c.want {
			require.Contains(t, out, w, c.name)
		}
		_, err := auditlog.Verify(dir, auditlog.VerifyOptions{})
		var ve *auditlog.VerifyError
		require.ErrorAs(t, err, &ve, c.name)
		t.Logf("%s: %s", c.name, strings.TrimSpace(out))
	}
}

// GET /audit: the product's own rows, newest first, with filters.
func TestAuditList(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{})
	pid, key := f.product("acme", orch.Policy{})
	other, otherKey := f.product("other", orch.Policy{})
	t0 := time.Now().UTC().Add(-time.Hour).Truncate(time.Second)
	f.insertAudit(pid, "ann", "start", t0, 3)
	f.insertAudit(pid, "ann", "stop", t0.Add(10*time.Minute), 2)
	f.insertAudit(pid, "ben", "start", t0.Add(20*time.Minute), 4)
	f.insertAudit(other, "ann", "start", t0, 5)

	all := f.call("GET", "/audit", key, nil)
	require.Equal(t, http.StatusOK, all.Status, "%v", all.Body)
	es := all.Body["entries"].([]any)
	require.Len(t, es, 9)
	var ts []string
	for _, e := range es {
		ts = append(ts, e.(map[string]any)["timestamp"].(string))
	}
	require.True(t, sort.SliceIsSorted(ts, func(i, j int) bool { return ts[i] > ts[j] }), "newest first")

	count := func(q string) int {
		r := f.call("GET", "/audit?"+q, key, nil)
		require.Equal(t, http.StatusOK, r.Status, "%s: %v", q, r.Body)
		return len(r.Body["entries"].([]any))
	}
	require.Equal(t, 5, count("user_id=ann"))
	require.Equal(t, 7, count("action=start"))
	require.Equal(t, 3, count("user_id=ann&action=start"))
	require.Equal(t, 6, count("since="+t0.Add(5*time.Minute).Format(time.RFC3339)))
	require.Equal(t, 3, count("until="+t0.Add(5*time.Minute).Format(time.RFC3339)))
	require.Equal(t, 2, count("limit=2"))
	require.Equal(t, 5, len(f.call("GET", "/audit", otherKey, nil).Body["entries"].([]any)), "each product sees its own rows")

	require.Equal(t, "INVALID_REQUEST", f.call("GET", "/audit?limit=1001", key, nil).code())
	require.Equal(t, "INVALID_REQUEST", f.call("GET", "/audit?action=nope", key, nil).code())
	require.Equal(t, "INVALID_REQUEST", f.call("GET", "/audit?since=yesterday", key, nil).code())
	require.Equal(t, "INVALID_PLATFORM_KEY", f.call("GET", "/audit", "bad", nil).code())
	e := es[0].(map[string]any)
	require.Equal(t, "ben", e["user_id"])
	require.Equal(t, "system", e["actor"])
	require.NotNil(t, e["metadata"])
}

// Scheduled exports cover contiguous ranges; the retention purge then
// deletes exactly the old rows that a verified export holds, and nothing
// once the chain on disk no longer verifies.
func TestScheduledExportsAndPurge(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{})
	ctx := context.Background()
	pid, _ := f.product("acme", orch.Policy{})
	old := time.Now().UTC().Add(-40 * 24 * time.Hour) // past the fleet's 30-day retention
	f.insertAudit(pid, "u", "start", old, 20)
	f.insertAudit(pid, "u", "stop", old.Add(24*time.Hour), 10)
	f.insertAudit(pid, "u", "start", time.Now().UTC().Add(-time.Hour), 5) // recent: kept

	count := func(q string, args ...any) int {
		var n int
		require.NoError(t, f.Pool.QueryRow(ctx, q, args...).Scan(&n))
		return n
	}
	waitJobs := func() {
		require.Eventually(t, func() bool {
			return count(`SELECT count(*) FROM river_job WHERE kind = 'audit_export' AND state NOT IN ('completed', 'discarded', 'cancelled')`) == 0
		}, 30*time.Second, 20*time.Millisecond)
	}

	// A scheduled export of one day's old rows only (tick = old + 1 day):
	// from the oldest row's day up to the tick.
	tick1 := old.Add(24 * time.Hour).Truncate(time.Minute)
	_, err := f.River.Insert(ctx, jobs.AuditExport{Tick: tick1}, nil)
	require.NoError(t, err)
	waitJobs()
	// Its rows are past the retention and in a verified export: purged.
	var purged int
	require.NoError(t, f.Pool.QueryRow(ctx, `SELECT purged_rows FROM audit_exports WHERE tick = $1`, tick1).Scan(&purged))
	require.Equal(t, 20, purged)
	require.Equal(t, 0, count(`SELECT count(*) FROM audit_log WHERE product_id = $1 AND "timestamp" < $2`, pid, tick1))

	// The next tick: contiguous, up to now.
	tick2 := time.Now().UTC().Add(-time.Minute).Truncate(time.Minute)
	_, err = f.River.Insert(ctx, jobs.AuditExport{Tick: tick2}, nil)
	require.NoError(t, err)
	waitJobs()
	var from2, to1 time.Time
	require.NoError(t, f.Pool.QueryRow(ctx, `SELECT (SELECT from_ts FROM audit_exports WHERE tick = $2), (SELECT to_ts FROM audit_exports WHERE tick = $1)`, tick1, tick2).Scan(&to1, &from2))
	require.True(t, to1.Equal(from2), "scheduled exports are contiguous: %s vs %s", to1, from2)
	rep, err := auditlog.Verify(f.Exports, auditlog.VerifyOptions{})
	require.NoError(t, err)
	require.Equal(t, 2, rep.Exports)

	// Every row older than 30 days is in a verified export and gone; the
	// recent ones and every row of the rest of the log stay.
	require.Equal(t, 0, count(`SELECT count(*) FROM audit_log WHERE "timestamp" < now() - interval '30 days'`))
	require.Equal(t, 5, count(`SELECT count(*) FROM audit_log WHERE product_id = $1`, pid))
	require.Equal(t, 30, count(`SELECT sum(purged_rows)::int FROM audit_exports`))
	// The exports still hold the purged rows.
	require.EqualValues(t, 35, rep.Rows)

	// Rows no export holds are never purged, and a chain that no longer
	// verifies stops the purge.
	f.insertAudit(pid, "u", "start", old.Add(2*time.Hour), 7) // old, but after the export ran
	n, err := f.Workers.Audit.PurgeAudit(ctx)
	require.NoError(t, err)
	require.Zero(t, n)
	require.Equal(t, 7, count(`SELECT count(*) FROM audit_log WHERE "timestamp" < now() - interval '30 days'`))
	ex := f.export(old.Add(time.Hour), old.Add(3*time.Hour), pid)
	p := filepath.Join(f.Exports, ex.str("file"))
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	b[len(b)/2] ^= 0x01
	require.NoError(t, os.WriteFile(p, b, 0o600))
	_, err = f.Workers.Audit.PurgeAudit(ctx)
	require.ErrorContains(t, err, "does not verify")
	require.Equal(t, 7, count(`SELECT count(*) FROM audit_log WHERE "timestamp" < now() - interval '30 days'`))

	// UPDATE and DELETE by hand still fail.
	_, err = f.Pool.Exec(ctx, `UPDATE audit_log SET actor = 'x'`)
	require.ErrorContains(t, err, "append-only")
	_, err = f.Pool.Exec(ctx, `DELETE FROM audit_log`)
	require.ErrorContains(t, err, "append-only")
}

// GET /metrics (and GET /audit) of a product with 1,000,000 audit rows
// spread over 30 days, inserted with one generate_series INSERT: p50 over
// 25 requests each (target for /metrics ≤ 50 ms). One row in five is a
// provision or a destroy; the audit_totals trigger is statement-level, so
// the bulk insert stays linear.
func BenchmarkMetrics1MAuditRows(b *testing.B) {
	const samples = 25
	f := benchFleet(b, fleetOpts{})
	ctx := context.Background()
	pid, key := f.product("bench", orch.Policy{})
	start := time.Now()
	_, err := f.Pool.Exec(ctx, `INSERT INTO audit_log ("timestamp", product_id, user_id, engine_id, action, actor, metadata, duration_ms)
		SELECT now() - (i * interval '2592 milliseconds'), $1, 'user-' || (i % 5000), NULL,
			CASE i % 10 WHEN 0 THEN 'provision' WHEN 5 THEN 'destroy'
				ELSE (ARRAY['start','stop','health_check','health_failed','restart','auto_restart_start','admit_denied','backup'])[1 + i % 8] END,
			'bench', jsonb_build_object('i', i), CASE WHEN i % 10 = 0 THEN 800 + i % 400 END
		FROM generate_series(1, 1000000) AS i`, pid)
	require.NoError(b, err)
	_, err = f.Pool.Exec(ctx, `ANALYZE audit_log`)
	require.NoError(b, err)
	b.Logf("inserted 1,000,000 audit rows in %v", time.Since(start))

	measure := func(path string) []time.Duration {
		var ds []time.Duration
		for i := 0; i < samples; i++ {
			t0 := time.Now()
			r := f.call("GET", path, key, nil)
			ds = append(ds, time.Since(t0))
			require.Equal(b, http.StatusOK, r.Status, "%v", r.Body)
		}
		return ds
	}
	m := measure("/metrics")
	r := f.call("GET", "/metrics", key, nil)
	b.Logf("metrics: %v", r.Body)
	require.EqualValues(b, 100000, r.Body["total_provisions"])
	a := measure("/audit?limit=100")
	u := measure("/audit?user_id=user-42&action=provision&limit=100")
	b.ReportMetric(ms(pct(m, 0.5)), "metrics-p50-ms")
	b.ReportMetric(ms(pct(m, 0.95)), "metrics-p95-ms")
	b.ReportMetric(ms(pct(a, 0.5)), "audit-p50-ms")
	b.ReportMetric(ms(pct(u, 0.5)), "audit-filtered-p50-ms")
}
