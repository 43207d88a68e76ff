package workers

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"
	"github.com/stretchr/testify/require"
	_ "modernc.org/sqlite"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/backend/subprocess"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

// cutBackend cancels the job's context in the middle of CopyDataOut, after
// `after` bytes: the job dies mid-copy, with the engine frozen.
type cutBackend struct {
	orch.Backend
	cut    atomic.Pointer[context.CancelFunc]
	after  int
	copied atomic.Int64
}

type cutWriter struct {
	w     io.Writer
	left  int
	fire  func()
	ctx   context.Context
	total *atomic.Int64
}

func (c *cutWriter) Write(p []byte) (int, error) {
	if c.left <= 0 {
		c.fire()
		return 0, c.ctx.Err()
	}
	if len(p) > c.left {
		p = p[:c.left]
	}
	n, err := c.w.Write(p)
	c.left -= n
	c.total.Add(int64(n))
	return n, err
}

func (b *cutBackend) CopyDataOut(ctx context.Context, id string, w io.Writer) error {
	cancel := b.cut.Load()
	if cancel == nil {
		return b.Backend.CopyDataOut(ctx, id, w)
	}
	return b.Backend.CopyDataOut(ctx, id, &cutWriter{w: w, left: b.after, fire: *cancel, ctx: ctx, total: &b.copied})
}

func freePort(t *testing.T) int { return testenv.FreePort(t) }

// A backup job whose context is cancelled in the middle of the copy (as a
// killed worker's job is cut off) leaves no file under a final name and no
// frozen engine; a worker that died outright leaves at most temporaries
// and a paused engine. The retry produces a good backup either way, and
// the sweep removes the temporaries once old.
// rig is a Workers on a fresh database and a subprocess backend (wrapped
// in cutBackend), with one running engine holding memories.
type rig struct {
	w    *Workers
	be   *cutBackend
	sb   *subprocess.Backend
	q    *schema.Queries
	pool *pgxpool.Pool
	dir  string // ORCH_BACKUP_DIR
	p    orch.Product
	e    orch.Engine
	key  string
	base string // the engine's URL
}

func newRig(t *testing.T, memories int) *rig {
	t.Helper()
	ctx := context.Background()
	r := &rig{pool: testenv.Pool(t, testenv.DB(t)), dir: t.TempDir()}
	node := "wtest-" + uuid.NewString()[:8]
	sb, err := subprocess.New(subprocess.Config{DataRoot: t.TempDir(), EngineBinary: testenv.EngineBinary(t), Node: node}, testenv.Quiet())
	require.NoError(t, err)
	r.sb, r.be = sb, &cutBackend{Backend: sb, after: 16 << 10}
	r.w = New(Config{Node: node, Engines: EngineConfig{BootTimeout: 20 * time.Second, StopGrace: 2 * time.Second},
		Backups: BackupConfig{Dir: r.dir}}, r.pool, r.be, testenv.Quiet())
	r.q = schema.New(r.pool)
	r.p, err = r.q.InsertProduct(ctx, "acme", "acme", orch.Policy{}, keys.Hash(keys.Generate()))
	require.NoError(t, err)
	r.key = keys.Generate()
	e := orch.Engine{ID: uuid.NewString(), ProductID: r.p.ID, UserID: "zoe", Status: orch.StateProvisioning, Node: node,
		Port: freePort(t), EngineVersion: "enginefleet/engine:wtest", KeyHash: keys.Hash(r.key), KeyEnc: "unused"}
	require.NoError(t, r.q.InsertEngine(ctx, e))
	t.Cleanup(func() {
		sb.RemoveContainer(context.Background(), e.ID) //nolint:errcheck
		sb.RemoveVolume(context.Background(), e.ID)    //nolint:errcheck
	})
	_, err = r.w.r.bootAndWait(ctx, e, r.w.r.currentSpec(e))
	require.NoError(t, err)
	r.e, err = r.q.SetEngineState(ctx, e, schema.EngineChange{Status: orch.StateRunning})
	require.NoError(t, err)
	r.base = fmt.Sprintf("http://127.0.0.1:%d", e.Port)
	r.addMemories(t, 0, memories)
	return r
}

func (r *rig) addMemories(t *testing.T, from, n int) {
	t.Helper()
	for i := from; i < from+n; i++ {
		req, _ := http.NewRequest("POST", r.base+"/memories", strings.NewReader(fmt.Sprintf(`{"content":"memory %d: %s"}`, i, strings.Repeat("Miso ", 60))))
		req.Header.Set("X-Engine-Key", r.key)
		req.Header.Set("Content-Type", "application/json")
		res, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		res.Body.Close()
		require.Equal(t, http.StatusCreated, res.StatusCode)
	}
}

// export is the engine's /memory/export body.
func (r *rig) export(t *testing.T) string {
	t.Helper()
	req, _ := http.NewRequest("GET", r.base+"/memory/export", nil)
	req.Header.Set("X-Engine-Key", r.key)
	res, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, res.StatusCode, "%s", b)
	return string(b)
}

func TestBackupKilledMidCopy(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	r := newRig(t, 150)
	w, be, sb, q, pool, dir, p, e := r.w, r.be, r.sb, r.q, r.pool, r.dir, r.p, r.e
	node, base := e.Node, r.base

	op := orch.Operation{ID: uuid.NewString(), ProductID: p.ID, EngineID: e.ID, UserID: e.UserID, Kind: orch.OpBackup, Actor: "acme"}
	backupID := uuid.NewString()
	require.NoError(t, q.InsertOperation(ctx, op, schema.OpPayload{BackupID: backupID}, 4242))
	bw := &backupWorker{bk: w.Backups}
	job := func(attempt int) *river.Job[jobs.Backup] {
		return &river.Job[jobs.Backup]{JobRow: &rivertype.JobRow{ID: 4242, Attempt: attempt, MaxAttempts: 5, Kind: "engine_backup"},
			Args: jobs.Backup{EngineID: e.ID, Node: node, BackupID: backupID, OperationID: op.ID}}
	}
	finals := func() []string {
		var out []string
		filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error { //nolint:errcheck
			if err == nil && !d.IsDir() && !strings.HasPrefix(d.Name(), ".tmp-") {
				out = append(out, p)
			}
			return nil
		})
		return out
	}

	// Attempt 1: the job's context is cancelled mid-copy.
	jctx, cancel := context.WithCancel(ctx)
	be.cut.Store(&cancel)
	err := bw.Work(jctx, job(1))
	require.Error(t, err, "the cut attempt fails (River retries it)")
	require.Greater(t, be.copied.Load(), int64(0), "the copy had started")
	require.Empty(t, finals(), "no file under a final name")
	info, err := sb.Inspect(ctx, e.ID)
	require.NoError(t, err)
	require.Equal(t, orch.RuntimeRunning, info.State, "the engine is unpaused even though the job was cut off")
	require.NoError(t, Probe(ctx, http.DefaultClient, base+"/health"))
	cur, _, err := q.OperationByID(ctx, op.ID)
	require.NoError(t, err)
	require.Equal(t, orch.OpRunning, cur.Status, "the operation waits for the retry")
	var retryAudited bool
	require.NoError(t, pool.QueryRow(ctx, `SELECT (metadata->>'will_retry')::bool FROM audit_log WHERE engine_id = $1 AND action = 'backup'`, e.ID).Scan(&retryAudited))
	require.True(t, retryAudited)

	// A worker SIGKILLed mid-copy runs no cleanup: it leaves a partial
	// temporary and a frozen engine. Simulate exactly that.
	sub := filepath.Join(dir, p.ID, "zoe")
	require.NoError(t, os.MkdirAll(sub, 0o700))
	partial := filepath.Join(sub, ".tmp-"+backupID+"-123.tar")
	require.NoError(t, os.WriteFile(partial, []byte("half a tar"), 0o600))
	require.NoError(t, sb.Pause(ctx, e.ID))

	// Attempt 2 (River's retry): a good backup.
	be.cut.Store(nil)
	require.NoError(t, bw.Work(ctx, job(2)))
	info, err = sb.Inspect(ctx, e.ID)
	require.NoError(t, err)
	require.Equal(t, orch.RuntimeRunning, info.State, "the retry thawed the engine")
	require.NoError(t, Probe(ctx, http.DefaultClient, base+"/health"))
	cur, _, err = q.OperationByID(ctx, op.ID)
	require.NoError(t, err)
	require.Equal(t, orch.OpSucceeded, cur.Status)
	b, err := q.BackupByID(ctx, backupID)
	require.NoError(t, err)
	require.Equal(t, []string{filepath.Join(dir, b.Path)}, finals())
	sum, n, err := hashFile(filepath.Join(dir, b.Path))
	require.NoError(t, err)
	require.Equal(t, b.SHA256, sum)
	require.Equal(t, b.SizeBytes, n)
	verdict, memories := checkArchive(t, filepath.Join(dir, b.Path))
	require.Equal(t, "ok", verdict)
	require.Equal(t, 150, memories)

	// The sweep removes the old temporary, never the recorded file.
	old := time.Now().Add(-2 * strayAge)
	require.NoError(t, os.Chtimes(partial, old, old))
	require.NoError(t, os.Chtimes(filepath.Join(dir, b.Path), old, old))
	n2, err := w.Backups.removeStrays(ctx)
	require.NoError(t, err)
	require.Equal(t, 1, n2)
	_, err = os.Stat(partial)
	require.True(t, errors.Is(err, os.ErrNotExist))
	require.Equal(t, []string{filepath.Join(dir, b.Path)}, finals())

	// A retry of the finished job changes nothing.
	require.NoError(t, bw.Work(ctx, job(3)))
	require.Equal(t, []string{filepath.Join(dir, b.Path)}, finals())
}

// checkArchive extracts a backup and runs SQLite's integrity check on it.
func checkArchive(t *testing.T, path string) (string, int) {
	t.Helper()
	raw, err := os.ReadFile(path)
	require.NoError(t, err)
	zr, err := gzip.NewReader(bytes.NewReader(raw))
	require.NoError(t, err)
	out := t.TempDir()
	tr := tar.NewReader(zr)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err)
		if hdr.Typeflag != tar.TypeReg {
			continue
		}
		b, err := io.ReadAll(tr)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(out, filepath.Base(hdr.Name)), b, 0o600))
	}
	db, err := sql.Open("sqlite", filepath.Join(out, "brain.sqlite"))
	require.NoError(t, err)
	defer db.Close()
	var verdict string
	require.NoError(t, db.QueryRow(`PRAGMA integrity_check`).Scan(&verdict))
	var n int
	require.NoError(t, db.QueryRow(`SELECT count(*) FROM memories`).Scan(&n))
	return verdict, n
}

func TestLinkUniqueNeverReplaces(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	at := time.Date(2026, 1, 2, 3, 4, 5, 6e6, time.UTC)
	var names []string
	for i := 0; i < 3; i++ {
		tmp := filepath.Join(dir, fmt.Sprintf(".tmp-%d", i))
		require.NoError(t, os.WriteFile(tmp, []byte{byte(i)}, 0o600))
		name, err := linkUnique(tmp, dir, at)
		require.NoError(t, err)
		names = append(names, name)
	}
	require.Equal(t, []string{"20260102T030405.006Z.tar.gz", "20260102T030405.007Z.tar.gz", "20260102T030405.008Z.tar.gz"}, names)
	for i, n := range names {
		b, err := os.ReadFile(filepath.Join(dir, n))
		require.NoError(t, err)
		require.Equal(t, []byte{byte(i)}, b)
	}
}
