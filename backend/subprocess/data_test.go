package subprocess

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/enginefleet/orchestrator"
)

func tarNames(t *testing.T, data []byte) []string {
	t.Helper()
	var names []string
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return names
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, hdr.Name)
	}
}

func TestCopyDataOutIn(t *testing.T) {
	f := newFleet(t)
	b := f.backend()
	ctx := ctxT(t)
	src := testSpec(t, newID())
	mustEnsureStart(t, b, src)
	for _, m := range []string{"first memory", "second memory", "third: ünïcode"} {
		addMemory(t, src, m)
	}
	want := exportBrain(t, src)

	// Consistent copy: pause, copy, unpause (as the backup job does).
	var buf bytes.Buffer
	if err := b.Pause(ctx, src.EngineID); err != nil {
		t.Fatal(err)
	}
	if err := b.CopyDataOut(ctx, src.EngineID, &buf); err != nil {
		t.Fatal(err)
	}
	if err := b.Unpause(ctx, src.EngineID); err != nil {
		t.Fatal(err)
	}
	names := tarNames(t, buf.Bytes())
	if !contains(names, "brain.sqlite") {
		t.Fatalf("tar entries %v lack brain.sqlite", names)
	}
	for _, n := range names {
		if strings.HasPrefix(n, "/") || strings.HasPrefix(n, "./") || strings.HasPrefix(n, "data/") {
			t.Errorf("tar entry %q is not relative to the volume root", n)
		}
	}

	// Into another engine that already has a brain of its own.
	dst := testSpec(t, newID())
	mustEnsureStart(t, b, dst)
	addMemory(t, dst, "to be replaced")
	if err := b.CopyDataIn(ctx, dst.EngineID, dst.Image, bytes.NewReader(buf.Bytes())); err != nil {
		t.Fatal(err)
	}
	// The container is gone (like Docker's backend); Ensure+Start again.
	wantState(t, b, dst.EngineID, orchestrator.RuntimeMissing)
	mustEnsureStart(t, b, dst)
	if got := exportBrain(t, dst); got != want {
		t.Errorf("export after CopyDataIn:\n%s\nwant\n%s", got, want)
	}

	// Into an engine that has nothing yet (restore after destroy).
	fresh := testSpec(t, newID())
	if err := b.CopyDataIn(ctx, fresh.EngineID, fresh.Image, bytes.NewReader(buf.Bytes())); err != nil {
		t.Fatal(err)
	}
	mustEnsureStart(t, b, fresh)
	if got := exportBrain(t, fresh); got != want {
		t.Errorf("export of a fresh engine after CopyDataIn:\n%s\nwant\n%s", got, want)
	}

	// CopyDataOut works with the engine stopped and with no container.
	if err := b.Stop(ctx, fresh.EngineID, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	var out2 bytes.Buffer
	if err := b.CopyDataOut(ctx, fresh.EngineID, &out2); err != nil {
		t.Fatal(err)
	}
	if err := b.RemoveContainer(ctx, fresh.EngineID); err != nil {
		t.Fatal(err)
	}
	var out3 bytes.Buffer
	if err := b.CopyDataOut(ctx, fresh.EngineID, &out3); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out2.Bytes(), out3.Bytes()) {
		t.Error("CopyDataOut differs between stopped and removed container")
	}
	if err := b.CopyDataOut(ctx, newID(), io.Discard); !orchestrator.IsCode(err, orchestrator.CodeNotFound) {
		t.Errorf("CopyDataOut of a missing volume: %v", err)
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// TestCopyDataRoundTripExact checks that files not in the tar are gone,
// and modes, mtimes and nested directories survive.
func TestCopyDataRoundTripExact(t *testing.T) {
	f := newFleet(t)
	b := f.backend()
	ctx := ctxT(t)
	a, c := newID(), newID()
	mtime := time.Date(2024, 5, 6, 7, 8, 9, 123456789, time.UTC)
	if err := b.CopyDataIn(ctx, a, "", tarOf(t, []entry{
		{name: "./", dir: true, mode: 0o755},
		{name: "./brain.sqlite", body: "brain", mode: 0o600},
		{name: "sub/", dir: true, mode: 0o500}, // read-only dir with a file in it
		{name: "sub/deep/x.txt", body: "x", mode: 0o640},
		{name: "sub/y", body: "y1", mode: 0o644},
		{name: "sub/y", body: "y2", mode: 0o400}, // repeated entry wins
	}, mtime)); err != nil {
		t.Fatal(err)
	}
	got := snapshot(t, b.DataDir(a))
	want := map[string]string{
		"brain.sqlite":   "-rw------- brain",
		"sub":            "dr-x------ ",
		"sub/deep":       "drwx------ ",
		"sub/deep/x.txt": "-rw-r----- x",
		"sub/y":          "-r-------- y2",
	}
	if !equalMaps(got, want) {
		t.Errorf("extracted %v\nwant %v", got, want)
	}
	fi, err := os.Stat(filepath.Join(b.DataDir(a), "sub", "deep", "x.txt"))
	if err != nil || !fi.ModTime().Equal(mtime) {
		t.Errorf("mtime not preserved: %v %v", fi.ModTime(), err)
	}
	if fi, _ := os.Stat(filepath.Join(b.DataDir(a), "sub")); !fi.ModTime().Equal(mtime) {
		t.Errorf("dir mtime not preserved: %v", fi.ModTime())
	}

	// Out of a and into c, which has other files: c becomes exactly a.
	if err := os.MkdirAll(filepath.Join(b.engineDir(c), "data", "junk"), 0o700); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(b.engineDir(c), "data", "stale"), []byte("old"), 0o600)
	var buf bytes.Buffer
	if err := b.CopyDataOut(ctx, a, &buf); err != nil {
		t.Fatal(err)
	}
	if err := b.CopyDataIn(ctx, c, "", &buf); err != nil {
		t.Fatal(err)
	}
	if got := snapshot(t, b.DataDir(c)); !equalMaps(got, want) {
		t.Errorf("copied %v\nwant %v", got, want)
	}
	// No temporary directories left behind.
	ents, _ := os.ReadDir(b.engineDir(c))
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "data.") || strings.HasPrefix(e.Name(), ".tmp") {
			t.Errorf("leftover %s", e.Name())
		}
	}
	// Make the read-only dirs removable for t.TempDir's cleanup.
	for _, id := range []string{a, c} {
		os.Chmod(filepath.Join(b.DataDir(id), "sub"), 0o700)
	}
	if err := b.RemoveVolume(ctx, a); err != nil {
		t.Fatal(err)
	}
}

func equalMaps(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func snapshot(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil || p == root {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		body := ""
		if fi.Mode().IsRegular() {
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			body = string(data)
		}
		out[filepath.ToSlash(rel)] = fi.Mode().String() + " " + body
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

type entry struct {
	name     string
	body     string
	dir      bool
	mode     int64
	typeflag byte
	link     string
}

func tarOf(t *testing.T, entries []entry, mtime time.Time) io.Reader {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		hdr := &tar.Header{Name: e.name, Mode: e.mode, ModTime: mtime, Typeflag: tar.TypeReg, Size: int64(len(e.body)), Format: tar.FormatPAX}
		if e.mode == 0 {
			hdr.Mode = 0o644
		}
		if e.dir {
			hdr.Typeflag, hdr.Size = tar.TypeDir, 0
		}
		if e.typeflag != 0 {
			hdr.Typeflag, hdr.Size, hdr.Linkname = e.typeflag, 0, e.link
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		if hdr.Size > 0 {
			io.WriteString(tw, e.body)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return &buf
}

func TestCopyDataInRefusesUnsafeArchive(t *testing.T) {
	f := newFleet(t)
	b := f.backend()
	ctx := ctxT(t)
	spec := testSpec(t, newID())
	mustEnsureStart(t, b, spec)
	addMemory(t, spec, "precious")
	want := exportBrain(t, spec)
	rec := pidOf(t, b, spec.EngineID)
	outside := filepath.Join(f.root, "engines", "evil")

	cases := map[string][]entry{
		"dotdot":          {{name: "ok", body: "x"}, {name: "../evil", body: "pwned"}},
		"nested dotdot":   {{name: "a/../../evil", body: "pwned"}},
		"absolute":        {{name: outside, body: "pwned"}},
		"symlink":         {{name: "link", typeflag: tar.TypeSymlink, link: "/etc"}, {name: "link/passwd", body: "pwned"}},
		"relative link":   {{name: "link", typeflag: tar.TypeSymlink, link: "../.."}},
		"hard link":       {{name: "brain.sqlite", typeflag: tar.TypeLink, link: "/etc/passwd"}},
		"device":          {{name: "null", typeflag: tar.TypeChar}},
		"dotdot dir":      {{name: "../evil/", dir: true}},
		"dotdot mid file": {{name: "sub/", dir: true}, {name: "sub/../../../evil", body: "pwned"}},
	}
	for name, entries := range cases {
		err := b.CopyDataIn(ctx, spec.EngineID, spec.Image, tarOf(t, entries, time.Now()))
		if !errors.Is(err, ErrUnsafeArchive) || !orchestrator.IsCode(err, orchestrator.CodeBackupCorrupt) {
			t.Errorf("%s: CopyDataIn = %v, want ErrUnsafeArchive/BACKUP_CORRUPT", name, err)
		}
	}
	if exists(outside) || exists(filepath.Join(f.root, "evil")) {
		t.Fatal("a malicious archive wrote outside the data directory")
	}
	// A truncated stream is refused too.
	var good bytes.Buffer
	if err := b.CopyDataOut(ctx, spec.EngineID, &good); err != nil {
		t.Fatal(err)
	}
	if err := b.CopyDataIn(ctx, spec.EngineID, spec.Image, bytes.NewReader(good.Bytes()[:good.Len()/2])); err == nil {
		t.Error("CopyDataIn of a truncated archive succeeded")
	}
	// The engine kept running on its old data, untouched.
	if got := pidOf(t, b, spec.EngineID); !got.same(rec) {
		t.Error("a refused CopyDataIn restarted the engine")
	}
	wantState(t, b, spec.EngineID, orchestrator.RuntimeRunning)
	if got := exportBrain(t, spec); got != want {
		t.Errorf("data changed by a refused archive:\n%s\nwant\n%s", got, want)
	}
	ents, _ := os.ReadDir(b.engineDir(spec.EngineID))
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	for _, n := range names {
		if strings.HasPrefix(n, "data.") {
			t.Errorf("leftover %s after refused archives (dir: %v)", n, names)
		}
	}
}

func TestInterruptedSwapRecovers(t *testing.T) {
	f := newFleet(t)
	b := f.backend()
	ctx := context.Background()
	id := newID()
	write := func(dir, body string) {
		if err := os.MkdirAll(b.path(id, dir), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(b.path(id, dir), "brain.sqlite"), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	read := func() string {
		data, _ := os.ReadFile(filepath.Join(b.DataDir(id), "brain.sqlite"))
		return string(data)
	}
	// Crash after data → data.old, before data.new → data: roll forward.
	write(dirDataNew, "new")
	write(dirDataOld, "old")
	write(prefixIn+"123", "partial")
	var buf bytes.Buffer
	if err := b.CopyDataOut(ctx, id, &buf); err != nil {
		t.Fatal(err)
	}
	if got := read(); got != "new" {
		t.Errorf("after recovery data = %q, want new", got)
	}
	for _, n := range []string{dirDataNew, dirDataOld, prefixIn + "123"} {
		if exists(b.path(id, n)) {
			t.Errorf("%s left after recovery", n)
		}
	}
	// Crash before data → data.old (data and data.new both there): keep data.
	write(dirDataNew, "newer")
	if err := b.Ensure(ctx, testSpec(t, id)); err != nil {
		t.Fatal(err)
	}
	if got := read(); got != "new" || exists(b.path(id, dirDataNew)) {
		t.Errorf("after recovery data = %q (data.new left: %v)", got, exists(b.path(id, dirDataNew)))
	}
	// Only data.old left (crash in a swap without new data): roll back.
	if err := os.Rename(b.DataDir(id), b.path(id, dirDataOld)); err != nil {
		t.Fatal(err)
	}
	if _, vols, _ := b.List(ctx); len(vols) != 1 {
		t.Errorf("a volume mid-swap is not listed: %+v", vols)
	}
	if err := b.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	if got := read(); got != "new" {
		t.Errorf("after rollback data = %q", got)
	}
}

func TestCleanName(t *testing.T) {
	for in, want := range map[string]string{
		"a":         "a",
		"./a":       "a",
		"a/b/":      "a/b",
		"./":        "",
		".":         "",
		"a//b":      "a/b",
		"a/./b":     "a/b",
		"..a":       "..a",
		"a..":       "a..",
		"a/..b/c..": "a/..b/c..",
	} {
		got, err := cleanName(in)
		if err != nil || got != want {
			t.Errorf("cleanName(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "..", "../a", "a/..", "a/../b", "/a", "/", "a\x00b", "./../a"} {
		if got, err := cleanName(in); !errors.Is(err, ErrUnsafeArchive) {
			t.Errorf("cleanName(%q) = %q, %v; want refusal", in, got, err)
		}
	}
}
