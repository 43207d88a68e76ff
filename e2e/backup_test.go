package e2e_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/enginefleet/orchestrator/backend/docker/dockertest"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	dclient "github.com/moby/moby/client"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stretchr/testify/require"
	_ "modernc.org/sqlite"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/refengine"
	"github.com/enginefleet/orchestrator/scheduler"
	"github.com/enginefleet/orchestrator/schema"
	"github.com/enginefleet/orchestrator/workers"
)

// rawGet returns an engine route's body bytes as the engine sent them.
func rawGet(t testing.TB, url, key string) []byte {
	t.Helper()
	req, err := http.NewRequest("GET", url, nil)
	require.NoError(t, err)
	req.Header.Set("X-Engine-Key", key)
	res, err := httpClient.Do(req)
	require.NoError(t, err)
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, res.StatusCode, "%s: %s", url, b)
	return b
}

// addMemories writes n memories to an engine.
func addMemories(t testing.TB, url, key, prefix string, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		r := engineCall(t, "POST", url+"/memories", key, map[string]any{"content": fmt.Sprintf("%s memory %d: the cat is called Miso", prefix, i), "tags": []string{prefix}})
		require.Equal(t, http.StatusCreated, r.Status, "%v", r.Body)
	}
}

// brainCheck extracts a volume tar (as CopyDataOut or a backup holds it)
// into a directory, opens brain.sqlite there with SQLite (replaying its
// WAL, as the engine would) and returns PRAGMA integrity_check's verdict
// and the number of memories.
func brainCheck(t testing.TB, tarStream io.Reader) (string, int) {
	t.Helper()
	dir := t.TempDir()
	tr := tar.NewReader(tarStream)
	found := false
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err)
		if hdr.Typeflag != tar.TypeReg {
			continue
		}
		require.NotContains(t, hdr.Name, "..")
		p := filepath.Join(dir, hdr.Name)
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o700))
		f, err := os.Create(p)
		require.NoError(t, err)
		_, err = io.Copy(f, tr)
		require.NoError(t, err)
		require.NoError(t, f.Close())
		if hdr.Name == "brain.sqlite" {
			found = true
		}
	}
	require.True(t, found, "the archive holds brain.sqlite")
	db, err := sql.Open("sqlite", filepath.Join(dir, "brain.sqlite"))
	require.NoError(t, err)
	defer db.Close()
	var verdict string
	require.NoError(t, db.QueryRow(`PRAGMA integrity_check`).Scan(&verdict))
	var n int
	require.NoError(t, db.QueryRow(`SELECT count(*) FROM memories`).Scan(&n))
	var fts int
	require.NoError(t, db.QueryRow(`SELECT count(*) FROM memories_fts WHERE memories_fts MATCH 'Miso'`).Scan(&fts))
	require.Equal(t, n, fts, "the full-text index matches the table")
	return verdict, n
}

// volumeCheck copies an engine's volume out and checks the brain in it.
func (f *fleet) volumeCheck(engineID string) (string, int) {
	f.t.Helper()
	var buf bytes.Buffer
	require.NoError(f.t, f.Backend.CopyDataOut(context.Background(), engineID, &buf))
	return brainCheck(f.t, &buf)
}

// copiesData reports whether the fleet's backend copies brain volumes
// (docker, subprocess); on kubernetes backups are the engine's export.
func (f *fleet) copiesData() bool {
	c, ok := f.Backend.(orch.DataCopier)
	return !ok || c.CopiesData()
}

// checkBackup checks a backup's archive: a volume copy holds an intact
// brain of n memories; a portable one (kubernetes) the engine's export,
// byte-identical to export.
func (f *fleet) checkBackup(backupID string, export []byte, n int) {
	f.t.Helper()
	if f.copiesData() {
		verdict, got := brainCheck(f.t, f.backupTar(backupID))
		require.Equal(f.t, "ok", verdict)
		require.Equal(f.t, n, got)
		return
	}
	tr := tar.NewReader(f.backupTar(backupID))
	h, err := tr.Next()
	require.NoError(f.t, err)
	require.Equal(f.t, workers.PortableEntry, h.Name)
	b, err := io.ReadAll(tr)
	require.NoError(f.t, err)
	require.Equal(f.t, string(export), string(b))
	_, err = tr.Next()
	require.ErrorIs(f.t, err, io.EOF, "a portable backup holds the export only")
}

// checkVolume checks the brain in an engine's volume, where the backend
// can copy it out (on kubernetes the export checks stand for it).
func (f *fleet) checkVolume(engineID string, n int) {
	f.t.Helper()
	if !f.copiesData() {
		return
	}
	verdict, got := f.volumeCheck(engineID)
	require.Equal(f.t, "ok", verdict)
	require.Equal(f.t, n, got)
}

// backupFile opens a recorded backup's archive as a tar stream.
func (f *fleet) backupTar(backupID string) io.Reader {
	f.t.Helper()
	b, err := schema.New(f.Pool).BackupByID(context.Background(), backupID)
	require.NoError(f.t, err)
	raw, err := os.ReadFile(filepath.Join(f.Backups, b.Path))
	require.NoError(f.t, err)
	zr, err := gzip.NewReader(bytes.NewReader(raw))
	require.NoError(f.t, err)
	return zr
}

// finalBackupFiles lists the backup files under final names (no temporaries).
func finalBackupFiles(t testing.TB, dir string) []string {
	t.Helper()
	var out []string
	require.NoError(t, filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && filepath.Ext(p) == ".gz" && !bytes.HasPrefix([]byte(d.Name()), []byte(".tmp-")) {
			out = append(out, p)
		}
		return nil
	}))
	return out
}

// The restore drill, on Docker: memories → backup → destroy →
// provision again → restore the destroyed engine's backup → the engine's
// export is byte-identical to before and its brain passes integrity_check.
func TestRestoreDrillDocker(t *testing.T) {
	t.Parallel()
	restoreDrill(t, newFleet(t, fleetOpts{backend: "docker"}))
}

func restoreDrill(t *testing.T, f *fleet) {
	_, key := f.product("acme", orch.Policy{})
	r := f.call("POST", "/engines/provision", key, map[string]any{"user_id": "alice"})
	require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
	url, ekey, oldID := r.str("url"), r.str("api_key"), r.str("engine_id")
	addMemories(t, url, ekey, "drill", 25)
	before := rawGet(t, url+"/memory/export", ekey)

	b := f.call("POST", "/engines/alice/backups", key, nil)
	require.Equal(t, http.StatusOK, b.Status, "%v", b.Body)
	require.Equal(t, "succeeded", b.str("status"))
	backupID := b.str("backup_id")
	bk, _ := b.Body["backup"].(map[string]any)
	require.Equal(t, oldID, bk["engine_id"])
	require.Equal(t, "manual", bk["trigger"])
	require.NotEmpty(t, bk["sha256"])
	t.Logf("backup: %v bytes, engine paused %v ms", bk["size_bytes"], bk["paused_ms"])
	f.checkBackup(backupID, before, 25)

	// Disaster: the engine is destroyed. Its backups stay listed.
	require.Equal(t, http.StatusOK, f.call("DELETE", "/engines/alice", key, nil).Status)
	l := f.call("GET", "/engines/alice/backups", key, nil)
	require.Equal(t, http.StatusOK, l.Status, "%v", l.Body)
	require.EqualValues(t, 1, l.Body["total"])

	// A fresh engine for the same user, then the old engine's backup.
	r = f.call("POST", "/engines/provision", key, map[string]any{"user_id": "alice"})
	require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
	url, ekey, newID := r.str("url"), r.str("api_key"), r.str("engine_id")
	require.NotEqual(t, oldID, newID)
	require.Equal(t, `{"format":"enginefleet.brain","version":1,"memories":[]}`+"\n", string(rawGet(t, url+"/memory/export", ekey)))

	rs := f.call("POST", "/engines/alice/restore", key, map[string]any{"backup_id": backupID})
	require.Equal(t, http.StatusOK, rs.Status, "%v", rs.Body)
	require.Equal(t, "running", rs.str("status"))
	require.Equal(t, newID, rs.str("engine_id"))
	after := rawGet(t, url+"/memory/export", ekey)
	require.Equal(t, string(before), string(after), "the restored brain exports byte-identically")
	f.checkVolume(newID, 25)
	acts := f.auditActions(newID)
	require.Equal(t, "restore", acts[len(acts)-1])
	require.Contains(t, f.auditActions(oldID), "backup")
	var meta map[string]any
	require.NoError(t, f.Pool.QueryRow(context.Background(),
		`SELECT metadata FROM audit_log WHERE engine_id = $1 AND action = 'restore'`, newID).Scan(&meta))
	require.Equal(t, backupID, meta["backup_id"])
	require.Equal(t, oldID, meta["source_engine_id"])
}

// Backups taken while a client writes memories as fast as it can, on
// Docker: every backup holds an intact brain, and restores to an engine
// that boots and answers with exactly the backed-up memories.
func TestBackupWhileWritingDocker(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{backend: "docker"})
	_, key := f.product("acme", orch.Policy{})
	r := f.call("POST", "/engines/provision", key, map[string]any{"user_id": "writer"})
	require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
	url, ekey := r.str("url"), r.str("api_key")

	var written atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for c := 0; c < 4; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := &http.Client{Timeout: 30 * time.Second}
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				body := fmt.Sprintf(`{"content":"writer %d memory %d about Miso the cat %s"}`, c, i, randHex(64))
				req, _ := http.NewRequest("POST", url+"/memories", bytes.NewBufferString(body))
				req.Header.Set("Content-Type", "application/json")
				req.Header.Set("X-Engine-Key", ekey)
				res, err := client.Do(req)
				if err != nil {
					continue // the engine is being restored or paused
				}
				io.Copy(io.Discard, res.Body) //nolint:errcheck
				res.Body.Close()
				if res.StatusCode == http.StatusCreated {
					written.Add(1)
				}
			}
		}()
	}
	var ids []string
	var counts []int
	for i := 0; i < 3; i++ {
		// Each backup is taken while the writers are writing: some
		// memories were stored since the previous one.
		from := written.Load()
		testenv.Await(t, 30*time.Second, "the writers wrote 10 memories since the last backup", func() error {
			return testenv.Check(written.Load() >= from+10, "%d written", written.Load()-from)
		})
		b := f.call("POST", "/engines/writer/backups", key, nil)
		require.Equal(t, http.StatusOK, b.Status, "%v", b.Body)
		ids = append(ids, b.str("backup_id"))
	}
	close(stop)
	wg.Wait()
	require.Greater(t, written.Load(), int64(20), "the writers were writing")
	for _, id := range ids {
		verdict, n := brainCheck(t, f.backupTar(id))
		require.Equal(t, "ok", verdict, "backup %s", id)
		counts = append(counts, n)
	}
	t.Logf("%d memories written; backups hold %v", written.Load(), counts)
	require.IsIncreasing(t, counts, "each backup holds more memories than the one before")

	// Each backup restores to an engine that boots with exactly its memories.
	for i, id := range ids {
		rs := f.call("POST", "/engines/writer/restore", key, map[string]any{"backup_id": id})
		require.Equal(t, http.StatusOK, rs.Status, "%v", rs.Body)
		var bundle struct {
			Memories []map[string]any `json:"memories"`
		}
		require.NoError(t, decodeJSON(bytes.NewReader(rawGet(t, url+"/memory/export", ekey)), &bundle))
		require.Len(t, bundle.Memories, counts[i], "restored backup %d", i)
	}
}

// provisionUser provisions a user's engine and returns its url, key and id.
func (f *fleet) newEngine(key, user string) (string, string, string) {
	f.t.Helper()
	r := f.call("POST", "/engines/provision", key, map[string]any{"user_id": user})
	require.Equal(f.t, http.StatusOK, r.Status, "%v", r.Body)
	return r.str("url"), r.str("api_key"), r.str("engine_id")
}

// Backups and restores on the subprocess backend: async operations,
// joining, listing, errors, and a restore that rewinds the brain.
func TestBackupRestoreSubprocess(t *testing.T) {
	t.Parallel()
	backupRestore(t, newFleet(t, fleetOpts{}))
}

// The same on a backend that cannot copy volumes (as kubernetes): backups
// are the engine's export, restores its import.
func TestBackupRestorePortable(t *testing.T) {
	t.Parallel()
	backupRestore(t, newFleet(t, fleetOpts{portable: true}))
}

// The restore drill through the engine's export and import.
func TestRestoreDrillPortable(t *testing.T) {
	t.Parallel()
	restoreDrill(t, newFleet(t, fleetOpts{portable: true}))
}

func backupRestore(t *testing.T, f *fleet) {
	ctx := context.Background()
	_, key := f.product("acme", orch.Policy{})
	_, otherKey := f.product("other", orch.Policy{})
	url, ekey, id := f.newEngine(key, "bob")
	addMemories(t, url, ekey, "first", 5)
	atBackup := rawGet(t, url+"/memory/export", ekey)

	require.Equal(t, "ENGINE_NOT_FOUND", f.call("POST", "/engines/nobody/backups", key, nil).code())
	require.Equal(t, "ENGINE_NOT_FOUND", f.call("POST", "/engines/bob/backups", otherKey, nil).code(), "another product's engine is invisible")
	require.Equal(t, "INVALID_REQUEST", f.call("POST", "/engines/..bad/backups", key, nil).code())

	// Async: 202 with the backup id and an operation to follow.
	a := f.call("POST", "/engines/bob/backups", key, nil, "Prefer", "respond-async")
	require.Equal(t, http.StatusAccepted, a.Status, "%v", a.Body)
	backupID, opID := a.str("backup_id"), a.str("operation_id")
	require.NotEmpty(t, opID)
	require.Eventually(t, func() bool {
		return f.call("GET", "/operations/"+opID, key, nil).str("status") == "succeeded"
	}, 30*time.Second, 50*time.Millisecond)
	require.Equal(t, "backup", f.call("GET", "/operations/"+opID, key, nil).str("kind"))

	// Two requests at once: one backup, both answer it.
	var got [2]resp
	parallel(2, func(i int) { got[i] = f.call("POST", "/engines/bob/backups", key, nil) })
	require.Equal(t, http.StatusOK, got[0].Status, "%v", got[0].Body)
	require.Equal(t, http.StatusOK, got[1].Status, "%v", got[1].Body)

	addMemories(t, url, ekey, "later", 3)
	l := f.call("GET", "/engines/bob/backups", key, nil)
	require.Equal(t, http.StatusOK, l.Status, "%v", l.Body)
	list := l.Body["backups"].([]any)
	require.GreaterOrEqual(t, len(list), 2)
	require.LessOrEqual(t, len(list), 3)
	require.Equal(t, backupID, list[len(list)-1].(map[string]any)["backup_id"], "newest first")
	require.EqualValues(t, 0, f.call("GET", "/engines/bob/backups", otherKey, nil).Body["total"])

	// The backup file: <product>/<user>/<timestamp>.tar.gz, recorded hash.
	b, err := schema.New(f.Pool).BackupByID(ctx, backupID)
	require.NoError(t, err)
	require.Regexp(t, `^[0-9a-f-]{36}/bob/\d{8}T\d{6}\.\d{3}Z\.tar\.gz$`, b.Path)
	require.Equal(t, id, b.EngineID)

	// Errors: unknown backup, someone else's backup, bad id.
	require.Equal(t, "BACKUP_NOT_FOUND", f.call("POST", "/engines/bob/restore", key, map[string]any{"backup_id": uuid.NewString()}).code())
	require.Equal(t, "INVALID_REQUEST", f.call("POST", "/engines/bob/restore", key, map[string]any{"backup_id": "nope"}).code())
	f.newEngine(key, "carol")
	require.Equal(t, "BACKUP_NOT_FOUND", f.call("POST", "/engines/carol/restore", key, map[string]any{"backup_id": backupID}).code())

	// Restore rewinds the brain to the backup.
	rs := f.call("POST", "/engines/bob/restore", key, map[string]any{"backup_id": backupID})
	require.Equal(t, http.StatusOK, rs.Status, "%v", rs.Body)
	require.Equal(t, "running", rs.str("status"))
	require.Equal(t, string(atBackup), string(rawGet(t, url+"/memory/export", ekey)))
	f.checkVolume(id, 5)
	entries, err := os.ReadDir(filepath.Join(f.Backups, ".restore"))
	require.NoError(t, err)
	require.Empty(t, entries, "the safety copy is removed after a restore")

	// Async restore: 202, then the operation succeeds.
	ar := f.call("POST", "/engines/bob/restore", key, map[string]any{"backup_id": backupID}, "Prefer", "respond-async")
	require.Equal(t, http.StatusAccepted, ar.Status, "%v", ar.Body)
	require.Eventually(t, func() bool {
		return f.call("GET", "/operations/"+ar.str("operation_id"), key, nil).str("status") == "succeeded"
	}, 30*time.Second, 50*time.Millisecond)

	acts := f.auditActions(id)
	require.Contains(t, acts, "backup")
	require.Equal(t, "restore", acts[len(acts)-1])
}

// A backup file with one byte flipped is refused before anything is
// touched: BACKUP_CORRUPT, and the engine keeps its current brain.
func TestCorruptBackupRefused(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{})
	f.dumpOnFailure(t)
	ctx := context.Background()
	_, key := f.product("acme", orch.Policy{})
	url, ekey, id := f.newEngine(key, "dave")
	addMemories(t, url, ekey, "old", 3)
	bk := f.call("POST", "/engines/dave/backups", key, nil)
	require.Equal(t, http.StatusOK, bk.Status, "%v", bk.Body)
	addMemories(t, url, ekey, "new", 4)
	current := rawGet(t, url+"/memory/export", ekey)
	before, err := f.Backend.Inspect(ctx, id)
	require.NoError(t, err)

	b, err := schema.New(f.Pool).BackupByID(ctx, bk.str("backup_id"))
	require.NoError(t, err)
	path := filepath.Join(f.Backups, b.Path)
	raw, err := os.ReadFile(path)
	require.NoError(t, err)
	raw[len(raw)/2] ^= 0x01
	require.NoError(t, os.WriteFile(path, raw, 0o600))

	r := f.call("POST", "/engines/dave/restore", key, map[string]any{"backup_id": b.ID})
	require.Equal(t, http.StatusBadGateway, r.Status, "%v", r.Body)
	require.Equal(t, "BACKUP_CORRUPT", r.code())
	require.Contains(t, r.str("error", "message"), "SHA-256")

	// Untouched: same process (never stopped), same brain, still running.
	after, err := f.Backend.Inspect(ctx, id)
	require.NoError(t, err)
	require.Equal(t, orch.RuntimeRunning, after.State)
	require.Equal(t, before.CreatedAt, after.CreatedAt, "the engine was not recreated")
	require.Equal(t, string(current), string(rawGet(t, url+"/memory/export", ekey)))
	require.Equal(t, "running", f.call("GET", "/engines/dave", key, nil).str("status"))
	var code string
	require.NoError(t, f.Pool.QueryRow(ctx, `SELECT metadata->>'error_code' FROM audit_log WHERE engine_id = $1 AND action = 'restore'`, id).Scan(&code))
	require.Equal(t, "BACKUP_CORRUPT", code, "the refused restore is audited")

	// A missing file is refused the same way.
	require.NoError(t, os.Remove(path))
	r = f.call("POST", "/engines/dave/restore", key, map[string]any{"backup_id": b.ID})
	require.Equal(t, "BACKUP_CORRUPT", r.code(), "%v", r.Body)
	require.Equal(t, string(current), string(rawGet(t, url+"/memory/export", ekey)))
}

// A restore whose brain does not boot puts the previous brain back.
func TestFailedRestoreRollsBack(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{bootTimeout: 4 * time.Second})
	ctx := context.Background()
	pid, key := f.product("acme", orch.Policy{})
	url, ekey, id := f.newEngine(key, "erin")
	addMemories(t, url, ekey, "keep", 6)
	current := rawGet(t, url+"/memory/export", ekey)

	// A well-formed backup (right hash) of a brain the engine cannot open.
	var tarBuf bytes.Buffer
	tw := tar.NewWriter(&tarBuf)
	junk := bytes.Repeat([]byte("not a database "), 1000)
	require.NoError(t, tw.WriteHeader(&tar.Header{Name: "brain.sqlite", Mode: 0o600, Size: int64(len(junk)), Typeflag: tar.TypeReg}))
	_, err := tw.Write(junk)
	require.NoError(t, err)
	require.NoError(t, tw.Close())
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	_, err = zw.Write(tarBuf.Bytes())
	require.NoError(t, err)
	require.NoError(t, zw.Close())
	rel := filepath.Join(pid, "erin", "19990101T000000.000Z.tar.gz")
	require.NoError(t, os.MkdirAll(filepath.Join(f.Backups, pid, "erin"), 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(f.Backups, rel), gz.Bytes(), 0o600))
	bad := schema.Backup{ID: uuid.NewString(), EngineID: id, ProductID: pid, UserID: "erin", Node: f.Node, Path: rel,
		SizeBytes: int64(gz.Len()), SHA256: sha256Hex(gz.Bytes()), EngineVersion: f.Image, Trigger: schema.BackupManual}
	require.NoError(t, schema.New(f.Pool).InsertBackup(ctx, bad))

	r := f.call("POST", "/engines/erin/restore", key, map[string]any{"backup_id": bad.ID})
	require.Equal(t, http.StatusGatewayTimeout, r.Status, "%v", r.Body)
	require.Equal(t, "BOOT_TIMEOUT", r.code())
	require.Equal(t, "running", f.call("GET", "/engines/erin", key, nil).str("status"))
	require.Equal(t, string(current), string(rawGet(t, url+"/memory/export", ekey)), "the previous brain is back")
	var rolled bool
	require.NoError(t, f.Pool.QueryRow(ctx, `SELECT (metadata->>'rolled_back')::bool FROM audit_log WHERE engine_id = $1 AND action = 'restore'`, id).Scan(&rolled))
	require.True(t, rolled)
	entries, err := os.ReadDir(filepath.Join(f.Backups, ".restore"))
	require.NoError(t, err)
	require.Empty(t, entries)
}

// Retention prunes rows and files together, never the newest backup of a
// user who has an engine, and sweeps stray files.
func TestBackupRetention(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{})
	ctx := context.Background()
	_, key := f.product("acme", orch.Policy{})
	f.newEngine(key, "fay")
	f.newEngine(key, "gus")
	ids := map[string][]string{}
	for _, u := range []string{"fay", "fay", "gus", "gus"} {
		r := f.call("POST", "/engines/"+u+"/backups", key, nil)
		require.Equal(t, http.StatusOK, r.Status, "%v", r.Body)
		ids[u] = append(ids[u], r.str("backup_id"))
	}
	require.Equal(t, http.StatusOK, f.call("DELETE", "/engines/gus", key, nil).Status)
	// Everything is old now.
	_, err := f.Pool.Exec(ctx, `UPDATE backups SET created_at = created_at - interval '30 days'`)
	require.NoError(t, err)
	paths := map[string]string{}
	for _, list := range ids {
		for _, id := range list {
			b, err := schema.New(f.Pool).BackupByID(ctx, id)
			require.NoError(t, err)
			paths[id] = filepath.Join(f.Backups, b.Path)
		}
	}
	// Strays: an unrecorded backup and a temporary file, both old.
	stray := filepath.Join(filepath.Dir(paths[ids["fay"][0]]), "20000101T000000.000Z.tar.gz")
	tmp := filepath.Join(filepath.Dir(paths[ids["fay"][0]]), ".tmp-x-123.tar")
	fresh := filepath.Join(filepath.Dir(paths[ids["fay"][0]]), ".tmp-y-456.tar")
	for _, p := range []string{stray, tmp, fresh} {
		require.NoError(t, os.WriteFile(p, []byte("x"), 0o600))
	}
	old := time.Now().Add(-2 * time.Hour)
	require.NoError(t, os.Chtimes(stray, old, old))
	require.NoError(t, os.Chtimes(tmp, old, old))

	pruned, strays, err := f.Workers.Backups.PruneBackups(ctx)
	require.NoError(t, err)
	require.Equal(t, 3, pruned, "fay's older backup and both of gus's (no engine any more)")
	require.Equal(t, 2, strays)
	var left []string
	rows, err := f.Pool.Query(ctx, `SELECT id::text FROM backups`)
	require.NoError(t, err)
	left, err = pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	require.Equal(t, []string{ids["fay"][1]}, left, "the newest backup of an existing engine stays")
	for id, p := range paths {
		_, err := os.Stat(p)
		require.Equal(t, id == ids["fay"][1], err == nil, "file of %s", id)
	}
	_, err = os.Stat(fresh)
	require.NoError(t, err, "a fresh temporary file may belong to a running backup")
	var prunedRows int
	require.NoError(t, f.Pool.QueryRow(ctx, `SELECT count(*) FROM audit_log WHERE action = 'backup' AND metadata->>'pruned' = 'true'`).Scan(&prunedRows))
	require.Equal(t, 3, prunedRows)
}

// The nightly schedule with two scheduler replicas that both lead (as in
// a split brain), firing again and again, and a second tick the same day:
// exactly one backup per engine for the day.
func TestNightlyBackupTwoSchedulers(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{})
	ctx := context.Background()
	_, key := f.product("acme", orch.Policy{})
	for _, u := range []string{"u1", "u2", "u3"} {
		f.newEngine(key, u)
	}
	var replicas []*scheduler.Scheduler
	for i := 0; i < 2; i++ {
		rc, err := river.NewClient(riverpgxv5.New(f.Pool), &river.Config{Logger: testenv.Quiet()})
		require.NoError(t, err)
		s, err := scheduler.New(scheduler.Config{Instance: fmt.Sprintf("r%d-%s", i, f.Node), LockKey: int64(1000 + i), Poll: 100 * time.Millisecond},
			f.Pool, rc, testenv.Quiet(), scheduler.Fleet(scheduler.FleetConfig{Nodes: []string{f.Node}, BackupCron: "0 3 * * *"})...)
		require.NoError(t, err)
		sctx, stop := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); s.Run(sctx) }() //nolint:errcheck
		t.Cleanup(func() { stop(); <-done })
		replicas = append(replicas, s)
	}
	require.Eventually(t, func() bool { return replicas[0].Leader() && replicas[1].Leader() }, 5*time.Second, 20*time.Millisecond)
	// Both fire the nightly tick at once, twice.
	parallel(4, func(i int) { require.NoError(t, replicas[i%2].Fire(ctx, "backup")) })
	// A second fan-out the same day (another tick: a replayed or
	// mis-scheduled one).
	earlier := time.Now().UTC().Truncate(24 * time.Hour).Add(time.Minute)
	_, err := f.River.Insert(ctx, jobs.BackupAll{Tick: earlier}, nil)
	require.NoError(t, err)

	require.Eventually(t, func() bool {
		var pending int
		require.NoError(t, f.Pool.QueryRow(ctx, `SELECT count(*) FROM river_job WHERE kind IN ('backup_all', 'engine_backup')
			AND state NOT IN ('completed', 'discarded', 'cancelled')`).Scan(&pending))
		return pending == 0
	}, time.Minute, 100*time.Millisecond)
	var n, engines, days int
	require.NoError(t, f.Pool.QueryRow(ctx, `SELECT count(*), count(DISTINCT engine_id), count(DISTINCT day) FROM backups WHERE trigger = 'scheduled'`).Scan(&n, &engines, &days))
	require.Equal(t, 3, n, "one backup per engine")
	require.Equal(t, 3, engines)
	require.Equal(t, 1, days)
	var fanouts int
	require.NoError(t, f.Pool.QueryRow(ctx, `SELECT count(*) FROM river_job WHERE kind = 'backup_all'`).Scan(&fanouts))
	require.Equal(t, 2, fanouts, "one fan-out per tick, however many replicas fire it")
	require.Len(t, finalBackupFiles(t, f.Backups), 3)
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// dumpOnFailure logs the fleet's River jobs and operations if t failed.
func (f *fleet) dumpOnFailure(t *testing.T) {
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		rows, err := f.Pool.Query(context.Background(), `SELECT id, kind, state, attempt, coalesce(errors::text, ''), args::text FROM river_job ORDER BY id`)
		if err != nil {
			return
		}
		for rows.Next() {
			var id int64
			var attempt int
			var kind, state, errs, args string
			rows.Scan(&id, &kind, &state, &attempt, &errs, &args) //nolint:errcheck
			t.Logf("job %d %s %s attempt %d args %s errors %s", id, kind, state, attempt, args, errs)
		}
		rows.Close()
	})
}

// benchBrain returns a directory holding a ~100 MB brain (about 110,000
// memories with their full-text index), built once and cached under the
// temporary directory.
func benchBrain(b *testing.B) string {
	b.Helper()
	dir := filepath.Join(os.TempDir(), "enginefleet-bench-brain-v1")
	if fi, err := os.Stat(filepath.Join(dir, "brain.sqlite")); err == nil && fi.Size() > 90<<20 {
		return dir
	}
	tmp, err := os.MkdirTemp(os.TempDir(), "enginefleet-bench-brain-*")
	require.NoError(b, err)
	ctx := context.Background()
	br, err := refengine.OpenBrain(ctx, filepath.Join(tmp, "brain.sqlite"))
	require.NoError(b, err)
	words := strings.Fields("the quick brown fox jumps over the lazy dog user likes coffee tea morning evening project meeting " +
		"deadline report family friend travel book music film garden kitchen recipe weather city river mountain ocean Miso cat")
	rng := mrand.New(mrand.NewPCG(1, 2))
	for i := 0; i < 2000; i++ {
		words = append(words, fmt.Sprintf("w%x", rng.Uint32()))
	}
	var ms []refengine.Memory
	for i := 0; i < 110000; i++ {
		var sb strings.Builder
		for sb.Len() < 600 {
			sb.WriteString(words[rng.IntN(len(words))])
			sb.WriteByte(' ')
		}
		ms = append(ms, refengine.Memory{ID: int64(i + 1), Content: sb.String(), Tags: []string{"bench"}, CreatedAt: "2026-01-01T00:00:00Z"})
	}
	_, err = br.Import(ctx, refengine.Bundle{Format: refengine.BundleFormat, Version: refengine.BundleVersion, Memories: ms})
	require.NoError(b, err)
	require.NoError(b, br.Close())
	os.RemoveAll(dir) //nolint:errcheck
	require.NoError(b, os.Rename(tmp, dir))
	return dir
}

// tarDir is a tar stream of a directory's regular files (the volume layout).
func tarDir(b *testing.B, dir string) *bytes.Buffer {
	b.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	ents, err := os.ReadDir(dir)
	require.NoError(b, err)
	for _, e := range ents {
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		require.NoError(b, err)
		require.NoError(b, tw.WriteHeader(&tar.Header{Name: e.Name(), Mode: 0o600, Size: int64(len(data)), Typeflag: tar.TypeReg, ModTime: time.Now()}))
		_, err = tw.Write(data)
		require.NoError(b, err)
	}
	require.NoError(b, tw.Close())
	return &buf
}

// Backup of a 100 MB brain of a running Docker engine: how long the engine
// is frozen (target ≤ 1 s) and the whole backup (freeze, copy, gzip,
// SHA-256, fsync) against `tar czf` of the same volume directory on the
// host (target ratio ≤ 1.5). Medians of 3.
func BenchmarkBackup100MB(b *testing.B) {
	const samples = 3
	f := benchFleet(b, fleetOpts{backend: "docker"})
	ctx := context.Background()
	_, key := f.product("bench", orch.Policy{})
	r := f.call("POST", "/engines/provision", key, map[string]any{"user_id": "big"})
	require.Equal(b, http.StatusOK, r.Status, "%v", r.Body)
	id, url, ekey := r.str("engine_id"), r.str("url"), r.str("api_key")
	brain := benchBrain(b)
	require.Equal(b, http.StatusOK, f.call("POST", "/engines/big/stop", key, nil).Status)
	require.NoError(b, f.Backend.CopyDataIn(ctx, id, f.Image, tarDir(b, brain)))
	st := f.call("POST", "/engines/big/start", key, nil)
	require.Equal(b, http.StatusOK, st.Status, "%v", st.Body)
	addMemories(b, url, ekey, "live", 20) // a live WAL next to the database
	e, err := schema.New(f.Pool).EngineByID(ctx, id)
	require.NoError(b, err)

	cli := dockertest.RequireDocker(b)
	vol, err := cli.VolumeInspect(ctx, orch.VolumeName(id), dclient.VolumeInspectOptions{})
	require.NoError(b, err)
	mount := vol.Volume.Mountpoint
	var size int64
	ents, _ := os.ReadDir(mount)
	for _, en := range ents {
		if fi, err := en.Info(); err == nil {
			size += fi.Size()
		}
	}
	b.Logf("volume %s: %.1f MB", mount, float64(size)/(1<<20))

	var paused, total, tarczf []time.Duration
	var gzSize int64
	for i := 0; i < samples; i++ {
		bf, err := f.Workers.Backups.WriteBackup(ctx, e, uuid.NewString())
		require.NoError(b, err)
		paused, total = append(paused, bf.Paused), append(total, bf.Total)
		gzSize = bf.SizeBytes

		out := filepath.Join(b.TempDir(), "baseline.tar.gz")
		start := time.Now()
		cmd := exec.Command("tar", "czf", out, "-C", mount, ".")
		o, err := cmd.CombinedOutput()
		require.NoError(b, err, "%s", o)
		tarczf = append(tarczf, time.Since(start))
	}
	b.Logf("paused %v, backup %v, tar czf %v; archive %.1f MB", paused, total, tarczf, float64(gzSize)/(1<<20))
	b.ReportMetric(ms(pct(paused, 0.5)), "paused-p50-ms")
	b.ReportMetric(ms(pct(total, 0.5)), "backup-p50-ms")
	b.ReportMetric(ms(pct(tarczf, 0.5)), "tarczf-p50-ms")
	b.ReportMetric(float64(pct(total, 0.5))/float64(pct(tarczf, 0.5)), "ratio")
	b.ReportMetric(float64(size)/(1<<20), "brain-MB")
}

// `orchestrator backup list|restore` from a shell, against the running
// fleet's database (its workers do the restore).
func TestBackupRestoreCLI(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{})
	_, key := f.product("acme", orch.Policy{})
	url, ekey, _ := f.newEngine(key, "hal")
	addMemories(t, url, ekey, "kept", 4)
	want := rawGet(t, url+"/memory/export", ekey)
	bk := f.call("POST", "/engines/hal/backups", key, nil)
	require.Equal(t, http.StatusOK, bk.Status, "%v", bk.Body)
	addMemories(t, url, ekey, "lost", 3)

	cli := func(args ...string) (string, error) {
		cmd := exec.Command(orchestratorBinary(t), args...)
		cmd.Env = append(os.Environ(), "ORCH_DATABASE_URL="+f.DBURL, "ORCH_MASTER_KEY="+keys.GenerateMasterKey(),
			"ORCH_ADMIN_KEY="+adminKey, "ORCH_LOG_LEVEL=error", "ORCH_METRICS_ADDR=off")
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := cli("backup", "list", "--product", "acme", "--user", "hal")
	require.NoError(t, err, out)
	require.Contains(t, out, bk.str("backup_id"))
	out, err = cli("backup", "restore", "--product", "acme", "--user", "hal", "--backup", bk.str("backup_id"))
	require.NoError(t, err, out)
	require.Contains(t, out, "restored")
	require.Equal(t, string(want), string(rawGet(t, url+"/memory/export", ekey)))
	var actor string
	require.NoError(t, f.Pool.QueryRow(context.Background(), `SELECT actor FROM audit_log WHERE action = 'restore'`).Scan(&actor))
	require.Equal(t, "admin", actor)

	out, err = cli("backup", "restore", "--product", "acme", "--user", "hal", "--backup", uuid.NewString())
	require.Error(t, err)
	require.Contains(t, out, "BACKUP_NOT_FOUND")
	out, err = cli("backup", "restore", "--product", "nope", "--user", "hal", "--backup", uuid.NewString())
	require.Error(t, err)
	require.Contains(t, out, "PRODUCT_NOT_FOUND")
}

// Through the engine's API a backup needs the engine running: a stopped
// engine's manual backup is ENGINE_NOT_RUNNING, and nothing is recorded.
func TestPortableBackupNeedsRunningEngine(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{portable: true})
	_, key := f.product("acme", orch.Policy{})
	f.newEngine(key, "dora")
	require.Equal(t, http.StatusOK, f.call("POST", "/engines/dora/stop", key, nil).Status)
	r := f.call("POST", "/engines/dora/backups", key, nil)
	require.Equal(t, "ENGINE_NOT_RUNNING", r.code(), "%v", r.Body)
	require.EqualValues(t, 0, f.call("GET", "/engines/dora/backups", key, nil).Body["total"])
}
