package auditlog_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/auditlog"
)

// writeChain writes n exports of rows rows each into dir, chained.
func writeChain(t *testing.T, dir string, n, rows int) []auditlog.Manifest {
	t.Helper()
	base := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	prev := ""
	id := int64(0)
	var out []auditlog.Manifest
	for i := 0; i < n; i++ {
		from, to := base.Add(time.Duration(i)*time.Hour), base.Add(time.Duration(i+1)*time.Hour)
		var buf bytes.Buffer
		w := auditlog.NewWriter(&buf)
		for r := 0; r < rows; r++ {
			id++
			require.NoError(t, w.Write(auditlog.Row{ID: id, Timestamp: from.Add(time.Duration(r) * time.Second), Action: "start",
				Actor: "system", Metadata: json.RawMessage(`{"r":1}`)}))
		}
		require.NoError(t, w.Close())
		m := auditlog.Manifest{Seq: int64(i + 1), ExportID: "x", File: auditlog.FileName(int64(i+1), from, to), From: from, To: to, PrevSHA256: prev}
		w.Fill(&m)
		require.NoError(t, os.WriteFile(filepath.Join(dir, m.File), buf.Bytes(), 0o600))
		b, err := auditlog.EncodeManifest(m)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(dir, auditlog.ManifestName(m.File)), b, 0o600))
		prev = m.SHA256
		out = append(out, m)
	}
	return out
}

func verifyErr(t *testing.T, dir string) *auditlog.VerifyError {
	t.Helper()
	_, err := auditlog.Verify(dir, auditlog.VerifyOptions{})
	var ve *auditlog.VerifyError
	require.True(t, errors.As(err, &ve), "want a VerifyError, got %v", err)
	return ve
}

func TestVerify(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ms := writeChain(t, dir, 4, 10)
	rep, err := auditlog.Verify(dir, auditlog.VerifyOptions{})
	require.NoError(t, err)
	require.Equal(t, 4, rep.Exports)
	require.EqualValues(t, 40, rep.Rows)
	require.Equal(t, ms[3].SHA256, rep.Head)

	// Through stops early; OnRow sees every row of the verified exports.
	var ids []int64
	rep, err = auditlog.Verify(dir, auditlog.VerifyOptions{Through: 2, OnRow: func(m auditlog.Manifest, r auditlog.Row) error {
		ids = append(ids, r.ID)
		return nil
	}})
	require.NoError(t, err)
	require.Equal(t, 2, rep.Exports)
	require.Len(t, ids, 20)

	empty, err := auditlog.Verify(t.TempDir(), auditlog.VerifyOptions{})
	require.NoError(t, err)
	require.Zero(t, empty.Exports)
}

func TestVerifyFindsTampering(t *testing.T) {
	t.Parallel()
	for name, c := range map[string]struct {
		tamper   func(dir string, ms []auditlog.Manifest)
		kind     string
		seq      int64
		manifest bool // the manifest is named, not the data file
	}{
		"row count edited in a manifest": {func(dir string, ms []auditlog.Manifest) {
			m := ms[1]
			m.Rows = 9
			b, _ := auditlog.EncodeManifest(m)
			os.WriteFile(filepath.Join(dir, auditlog.ManifestName(m.File)), b, 0o600) //nolint:errcheck
		}, auditlog.Altered, 2, false},
		"manifest missing": {func(dir string, ms []auditlog.Manifest) {
			os.Remove(filepath.Join(dir, auditlog.ManifestName(ms[2].File))) //nolint:errcheck
		}, auditlog.Missing, 3, true},
		"manifest not JSON": {func(dir string, ms []auditlog.Manifest) {
			os.WriteFile(filepath.Join(dir, auditlog.ManifestName(ms[0].File)), []byte("{"), 0o600) //nolint:errcheck
		}, auditlog.Altered, 1, true},
		"manifests swapped": {func(dir string, ms []auditlog.Manifest) {
			a, b := filepath.Join(dir, auditlog.ManifestName(ms[0].File)), filepath.Join(dir, auditlog.ManifestName(ms[1].File))
			ab, _ := os.ReadFile(a)
			bb, _ := os.ReadFile(b)
			os.WriteFile(a, bb, 0o600) //nolint:errcheck
			os.WriteFile(b, ab, 0o600) //nolint:errcheck
		}, auditlog.Reordered, 1, true},
		"first export replaced with a consistent manifest": {func(dir string, ms []auditlog.Manifest) {
			var buf bytes.Buffer
			w := auditlog.NewWriter(&buf)
			w.Write(auditlog.Row{ID: 1, Timestamp: ms[0].From, Action: "stop", Actor: "x"}) //nolint:errcheck
			w.Close()                                                                       //nolint:errcheck
			m := ms[0]
			w.Fill(&m)
			os.WriteFile(filepath.Join(dir, m.File), buf.Bytes(), 0o600) //nolint:errcheck
			b, _ := auditlog.EncodeManifest(m)
			os.WriteFile(filepath.Join(dir, auditlog.ManifestName(m.File)), b, 0o600) //nolint:errcheck
		}, auditlog.Altered, 1, false},
		"trailing garbage": {func(dir string, ms []auditlog.Manifest) {
			f, _ := os.OpenFile(filepath.Join(dir, ms[3].File), os.O_APPEND|os.O_WRONLY, 0)
			f.Write([]byte("x")) //nolint:errcheck
			f.Close()
		}, auditlog.Altered, 4, false},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			ms := writeChain(t, dir, 4, 10)
			c.tamper(dir, ms)
			ve := verifyErr(t, dir)
			require.Equal(t, c.kind, ve.Kind, ve.Error())
			require.Equal(t, c.seq, ve.Seq, ve.Error())
			want := ms[c.seq-1].File
			if c.manifest {
				want = auditlog.ManifestName(want)
			}
			require.Equal(t, want, ve.File, ve.Error())
		})
	}
}

func TestWriterRefusesDisorder(t *testing.T) {
	t.Parallel()
	w := auditlog.NewWriter(&bytes.Buffer{})
	require.NoError(t, w.Write(auditlog.Row{ID: 5}))
	require.Error(t, w.Write(auditlog.Row{ID: 5}))
}

// The newest export replaced together with its manifest breaks no link;
// only a head recorded elsewhere (Postgres) catches it, and a head export
// deleted outright.
func TestVerifyHeadAnchor(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ms := writeChain(t, dir, 3, 10)
	head := &auditlog.Anchor{Seq: 3, SHA256: ms[2].SHA256}
	_, err := auditlog.Verify(dir, auditlog.VerifyOptions{Head: head})
	require.NoError(t, err)
	// An older anchor holds too: exports written after it are fine.
	_, err = auditlog.Verify(dir, auditlog.VerifyOptions{Head: &auditlog.Anchor{Seq: 2, SHA256: ms[1].SHA256}})
	require.NoError(t, err)

	var buf bytes.Buffer
	w := auditlog.NewWriter(&buf)
	require.NoError(t, w.Write(auditlog.Row{ID: 1000, Timestamp: ms[2].From, Action: "stop", Actor: "x"}))
	require.NoError(t, w.Close())
	m := ms[2]
	w.Fill(&m)
	require.NoError(t, os.WriteFile(filepath.Join(dir, m.File), buf.Bytes(), 0o600))
	b, err := auditlog.EncodeManifest(m)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, auditlog.ManifestName(m.File)), b, 0o600))

	_, err = auditlog.Verify(dir, auditlog.VerifyOptions{})
	require.NoError(t, err, "without an anchor the replaced head goes unnoticed")
	_, err = auditlog.Verify(dir, auditlog.VerifyOptions{Head: head})
	var ve *auditlog.VerifyError
	require.ErrorAs(t, err, &ve)
	require.Equal(t, auditlog.Altered, ve.Kind)
	require.Equal(t, ms[2].File, ve.File)

	require.NoError(t, os.Remove(filepath.Join(dir, m.File)))
	require.NoError(t, os.Remove(filepath.Join(dir, auditlog.ManifestName(m.File))))
	_, err = auditlog.Verify(dir, auditlog.VerifyOptions{Head: head})
	require.ErrorAs(t, err, &ve)
	require.Equal(t, auditlog.Missing, ve.Kind)
	require.EqualValues(t, 3, ve.Seq)

	for _, bad := range []string{"", "3", "x:" + ms[0].SHA256, "0:" + ms[0].SHA256, "3:abc", "3:" + strings.Repeat("g", 64)} {
		_, err := auditlog.ParseAnchor(bad)
		require.Error(t, err, bad)
	}
	a, err := auditlog.ParseAnchor("3:" + strings.ToUpper(ms[2].SHA256))
	require.NoError(t, err)
	require.Equal(t, *head, a)
}
