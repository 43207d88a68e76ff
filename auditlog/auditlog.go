// Package auditlog is the audit export file format and
// its chain verification. An export is a gzip-compressed JSONL file, one
// audit row per line in id order, with a manifest next to it holding the
// file's SHA-256, its row count and time range, and the SHA-256 of the
// previous export's file: the exports form a hash chain, export to export.
// Verify walks a directory of exports and names the first file that was
// altered, is missing or is out of order. Standard library only.
package auditlog

import (
	"bufio"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Format and Version identify a manifest.
const (
	Format  = "enginefleet.audit-export"
	Version = 1
)

// Row is one audit_log row as an export line.
type Row struct {
	ID         int64           `json:"id"`
	Timestamp  time.Time       `json:"timestamp"`
	ProductID  string          `json:"product_id,omitempty"`
	UserID     string          `json:"user_id,omitempty"`
	EngineID   string          `json:"engine_id,omitempty"`
	Action     string          `json:"action"`
	Actor      string          `json:"actor"`
	Metadata   json.RawMessage `json:"metadata"`
	DurationMS *int64          `json:"duration_ms,omitempty"`
}

// Manifest describes one export file; it is written next to the file as
// <file without .jsonl.gz>.manifest.json.
type Manifest struct {
	Format     string    `json:"format"`
	Version    int       `json:"version"`
	Seq        int64     `json:"seq"` // position in the chain, from 1
	ExportID   string    `json:"export_id"`
	File       string    `json:"file"`       // the data file's name (same directory)
	SHA256     string    `json:"sha256"`     // hex SHA-256 of the data file's bytes
	SizeBytes  int64     `json:"size_bytes"` // of the data file
	Rows       int64     `json:"rows"`
	FirstID    int64     `json:"first_id,omitempty"`
	LastID     int64     `json:"last_id,omitempty"`
	From       time.Time `json:"from"` // rows with from <= timestamp < to
	To         time.Time `json:"to"`
	ProductID  string    `json:"product_id,omitempty"` // only this product's rows; "" = every product
	PrevSHA256 string    `json:"prev_sha256"`          // the previous export's sha256; "" for the first
	CreatedAt  time.Time `json:"created_at"`
}

const stamp = "20060102T150405Z"

// FileName is the data file name of export seq: the zero-padded sequence
// first, so a directory listing is the chain's order.
func FileName(seq int64, from, to time.Time) string {
	return fmt.Sprintf("audit-%06d-%s-%s.jsonl.gz", seq, from.UTC().Format(stamp), to.UTC().Format(stamp))
}

// ManifestName is the manifest name of a data file.
func ManifestName(file string) string {
	return file[:len(file)-len(".jsonl.gz")] + ".manifest.json"
}

var (
	dataRE     = regexp.MustCompile(`^audit-(\d{6,})-[0-9TZ]+-[0-9TZ]+\.jsonl\.gz$`)
	manifestRE = regexp.MustCompile(`^audit-(\d{6,})-[0-9TZ]+-[0-9TZ]+\.manifest\.json$`)
)

// Writer writes one export's rows: JSONL, gzip, hashed and counted as it
// goes. Close finishes the stream; the caller then fsyncs and renames.
type Writer struct {
	dst    *bufio.Writer
	zw     *gzip.Writer
	sum    hash.Hash
	n      int64 // compressed bytes
	rows   int64
	first  int64
	last   int64
	enc    *json.Encoder
	closed bool
}

type countWriter struct {
	w io.Writer
	n *int64
}

func (c countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	*c.n += int64(n)
	return n, err
}

// NewWriter writes an export to w.
func NewWriter(w io.Writer) *Writer {
	ew := &Writer{sum: sha256.New()}
	ew.dst = bufio.NewWriterSize(io.MultiWriter(countWriter{w, &ew.n}, ew.sum), 256<<10)
	ew.zw, _ = gzip.NewWriterLevel(ew.dst, gzip.DefaultCompression)
	ew.enc = json.NewEncoder(ew.zw)
	ew.enc.SetEscapeHTML(false)
	return ew
}

// Write appends one row; ids must increase.
func (w *Writer) Write(r Row) error {
	if w.rows > 0 && r.ID <= w.last {
		return fmt.Errorf("audit export: row %d after row %d: ids must increase", r.ID, w.last)
	}
	if len(r.Metadata) == 0 {
		r.Metadata = json.RawMessage("{}")
	}
	r.Timestamp = r.Timestamp.UTC()
	if err := w.enc.Encode(r); err != nil {
		return fmt.Errorf("audit export: write row %d: %w", r.ID, err)
	}
	if w.rows == 0 {
		w.first = r.ID
	}
	w.last = r.ID
	w.rows++
	return nil
}

// Close ends the gzip stream and flushes it.
func (w *Writer) Close() error {
	if w.closed {
		return nil
	}
	w.closed = true
	if err := w.zw.Close(); err != nil {
		return fmt.Errorf("audit export: finish gzip: %w", err)
	}
	if err := w.dst.Flush(); err != nil {
		return fmt.Errorf("audit export: flush: %w", err)
	}
	return nil
}

// Fill sets the manifest fields the written data decides (hash, size,
// rows, id range). Call after Close.
func (w *Writer) Fill(m *Manifest) {
	m.Format, m.Version = Format, Version
	m.SHA256 = hex.EncodeToString(w.sum.Sum(nil))
	m.SizeBytes = w.n
	m.Rows = w.rows
	m.FirstID, m.LastID = w.first, w.last
}

// Rows is how many rows were written.
func (w *Writer) Rows() int64 { return w.rows }

// ReadManifest reads and decodes a manifest file.
func ReadManifest(path string) (Manifest, error) {
	var m Manifest
	b, err := os.ReadFile(path)
	if err != nil {
		return m, err
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("decode %s: %w", filepath.Base(path), err)
	}
	if m.Format != Format {
		return m, fmt.Errorf("%s: format %q is not %q", filepath.Base(path), m.Format, Format)
	}
	return m, nil
}

// EncodeManifest is the manifest's file content.
func EncodeManifest(m Manifest) ([]byte, error) {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// Problem kinds Verify reports.
const (
	Altered   = "altered"
	Missing   = "missing"
	Reordered = "reordered"
)

// VerifyError names the first file of the chain that fails verification.
type VerifyError struct {
	Kind   string // Altered, Missing or Reordered
	File   string // the file at fault (data file or manifest), or the expected name pattern of a missing export
	Seq    int64
	Detail string
}

func (e *VerifyError) Error() string {
	return fmt.Sprintf("%s: %s (export %d): %s", e.Kind, e.File, e.Seq, e.Detail)
}

// Report summarizes a verified chain.
type Report struct {
	Exports int
	Rows    int64
	Head    string // sha256 of the last export's file ("" when there is none)
	Last    Manifest
}

// VerifyOptions tunes Verify.
type VerifyOptions struct {
	// Through stops after export Through (0 = the whole chain).
	Through int64
	// OnRow, when set, is called with every row of every verified export
	// (the retention purge collects the ids it may delete).
	OnRow func(m Manifest, r Row) error
	// Head, when set, is an export known from outside the directory (the
	// newest one Postgres recorded): the chain must hold it, unaltered.
	// Without it, the newest export replaced together with its manifest
	// breaks no link.
	Head *Anchor
}

// Anchor is one export of the chain: its position and its file's sha256.
type Anchor struct {
	Seq    int64
	SHA256 string
}

// ParseAnchor reads "SEQ:SHA256".
func ParseAnchor(s string) (Anchor, error) {
	seq, sum, ok := strings.Cut(s, ":")
	n, err := strconv.ParseInt(seq, 10, 64)
	if !ok || err != nil || n < 1 || len(sum) != 64 || strings.Trim(strings.ToLower(sum), "0123456789abcdef") != "" {
		return Anchor{}, fmt.Errorf("head %q: want SEQ:SHA256 (an export's seq and sha256, as GET /audit/exports shows them)", s)
	}
	return Anchor{Seq: n, SHA256: strings.ToLower(sum)}, nil
}

type entry struct {
	data, manifest string
}

// Verify checks the chain of exports in dir: every export 1..N has its
// data file and manifest, each file hashes to its manifest's sha256 and
// holds exactly the rows it claims (ids increasing, timestamps in range),
// and each manifest's prev_sha256 is the previous export's sha256. It
// returns a *VerifyError naming the first altered, missing or reordered
// file; other errors are I/O trouble.
func Verify(dir string, o VerifyOptions) (Report, error) {
	var rep Report
	ents, err := os.ReadDir(dir)
	if err != nil {
		return rep, fmt.Errorf("read %s: %w", dir, err)
	}
	bySeq := map[int64]*entry{}
	var maxSeq int64
	get := func(seq int64) *entry {
		if bySeq[seq] == nil {
			bySeq[seq] = &entry{}
		}
		maxSeq = max(maxSeq, seq)
		return bySeq[seq]
	}
	for _, e := range ents {
		name := e.Name()
		if m := dataRE.FindStringSubmatch(name); m != nil {
			seq, _ := strconv.ParseInt(m[1], 10, 64)
			if x := get(seq); x.data != "" {
				return rep, &VerifyError{Kind: Reordered, File: name, Seq: seq, Detail: "two data files claim export " + m[1] + ": " + x.data}
			}
			bySeq[seq].data = name
		} else if m := manifestRE.FindStringSubmatch(name); m != nil {
			seq, _ := strconv.ParseInt(m[1], 10, 64)
			if x := get(seq); x.manifest != "" {
				return rep, &VerifyError{Kind: Reordered, File: name, Seq: seq, Detail: "two manifests claim export " + m[1] + ": " + x.manifest}
			}
			bySeq[seq].manifest = name
		}
	}
	if o.Through > 0 {
		maxSeq = min(maxSeq, o.Through)
	}
	// Every manifest's hash, to tell a reordered file from an altered one.
	hashes := map[string]int64{}
	manifests := map[int64]Manifest{}
	for seq, x := range bySeq {
		if x.manifest == "" {
			continue
		}
		m, err := ReadManifest(filepath.Join(dir, x.manifest))
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return rep, err
			}
			return rep, &VerifyError{Kind: Altered, File: x.manifest, Seq: seq, Detail: err.Error()}
		}
		manifests[seq] = m
		hashes[m.SHA256] = seq
	}

	// Each file is read once (hash and row checks), when first needed.
	type read struct {
		sum  string
		rows rowCheck
		err  error
	}
	reads := map[int64]read{}
	readOf := func(seq int64) read {
		if r, ok := reads[seq]; ok {
			return r
		}
		var r read
		r.sum, r.rows, r.err = readExport(dir, manifests[seq], o.OnRow)
		reads[seq] = r
		return r
	}
	present := func(seq int64) bool {
		x := bySeq[seq]
		return x != nil && x.data != "" && x.manifest != ""
	}

	for seq := int64(1); seq <= maxSeq; seq++ {
		x := bySeq[seq]
		switch {
		case x == nil:
			return rep, &VerifyError{Kind: Missing, File: fmt.Sprintf("audit-%06d-*.jsonl.gz", seq), Seq: seq,
				Detail: "neither the data file nor the manifest of this export is there"}
		case x.manifest == "":
			return rep, &VerifyError{Kind: Missing, File: ManifestName(x.data), Seq: seq, Detail: "manifest missing for " + x.data}
		case x.data == "":
			want := manifests[seq].File
			if want == "" {
				want = x.manifest
			}
			return rep, &VerifyError{Kind: Missing, File: want, Seq: seq, Detail: "data file missing (manifest " + x.manifest + ")"}
		}
		m := manifests[seq]
		if m.Seq != seq || m.File != x.data {
			return rep, &VerifyError{Kind: Reordered, File: x.manifest, Seq: seq,
				Detail: fmt.Sprintf("manifest describes export %d (%s), found in place of export %d", m.Seq, m.File, seq)}
		}
		r := readOf(seq)
		if r.err != nil {
			if errors.Is(r.err, os.ErrNotExist) {
				return rep, &VerifyError{Kind: Missing, File: x.data, Seq: seq, Detail: r.err.Error()}
			}
			return rep, r.err
		}
		if r.sum != m.SHA256 {
			if other, ok := hashes[r.sum]; ok && other != seq {
				return rep, &VerifyError{Kind: Reordered, File: x.data, Seq: seq,
					Detail: fmt.Sprintf("holds the contents of export %d (%s)", other, bySeq[other].data)}
			}
			return rep, &VerifyError{Kind: Altered, File: x.data, Seq: seq,
				Detail: fmt.Sprintf("sha256 %s, manifest says %s", r.sum, m.SHA256)}
		}
		if r.rows.err != "" {
			return rep, &VerifyError{Kind: Altered, File: x.data, Seq: seq, Detail: r.rows.err}
		}
		prev := ""
		if seq > 1 {
			prev = readOf(seq - 1).sum
		}
		if m.PrevSHA256 != prev {
			// The link to the predecessor is broken. If this export's own
			// successor no longer recognises it either, this export (file
			// and manifest) was replaced; otherwise its predecessor was.
			culprit := seq - 1
			if seq == 1 {
				culprit = seq
			} else if present(seq+1) && manifests[seq+1].PrevSHA256 != r.sum {
				culprit = seq
			}
			return rep, &VerifyError{Kind: Altered, File: bySeq[culprit].data, Seq: culprit,
				Detail: fmt.Sprintf("the chain breaks here: export %d records prev_sha256 %q, export %d hashes to %q", seq, m.PrevSHA256, seq-1, prev)}
		}
		rep.Exports++
		rep.Rows += m.Rows
		rep.Head = r.sum
		rep.Last = m
	}
	if h := o.Head; h != nil && (o.Through == 0 || h.Seq <= o.Through) {
		if h.Seq > maxSeq {
			return rep, &VerifyError{Kind: Missing, File: fmt.Sprintf("audit-%06d-*.jsonl.gz", h.Seq), Seq: h.Seq,
				Detail: fmt.Sprintf("the head export is not there (the chain ends at export %d)", maxSeq)}
		}
		if got := readOf(h.Seq).sum; got != h.SHA256 {
			return rep, &VerifyError{Kind: Altered, File: bySeq[h.Seq].data, Seq: h.Seq,
				Detail: fmt.Sprintf("sha256 %s, the head recorded outside the directory says %s", got, h.SHA256)}
		}
	}
	return rep, nil
}

type rowCheck struct{ err string }

// readExport hashes the data file and checks its rows against m.
func readExport(dir string, m Manifest, onRow func(Manifest, Row) error) (string, rowCheck, error) {
	f, err := os.Open(filepath.Join(dir, m.File))
	if err != nil {
		return "", rowCheck{}, err
	}
	defer f.Close()
	h := sha256.New()
	tee := io.TeeReader(bufio.NewReaderSize(f, 256<<10), h)
	check := func() rowCheck {
		zr, err := gzip.NewReader(tee)
		if err != nil {
			return rowCheck{"not a gzip file: " + err.Error()}
		}
		sc := bufio.NewScanner(zr)
		sc.Buffer(make([]byte, 64<<10), 64<<20)
		var n, last int64
		for sc.Scan() {
			var r Row
			if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
				return rowCheck{fmt.Sprintf("line %d: %v", n+1, err)}
			}
			n++
			if n > 1 && r.ID <= last {
				return rowCheck{fmt.Sprintf("line %d: row %d after row %d", n, r.ID, last)}
			}
			last = r.ID
			if r.Timestamp.Before(m.From) || !r.Timestamp.Before(m.To) {
				return rowCheck{fmt.Sprintf("line %d: row %d at %s is outside %s – %s", n, r.ID, r.Timestamp.Format(time.RFC3339Nano),
					m.From.Format(time.RFC3339), m.To.Format(time.RFC3339))}
			}
			if m.ProductID != "" && r.ProductID != m.ProductID {
				return rowCheck{fmt.Sprintf("line %d: row %d belongs to another product", n, r.ID)}
			}
			if onRow != nil {
				if err := onRow(m, r); err != nil {
					return rowCheck{"callback: " + err.Error()}
				}
			}
		}
		if err := sc.Err(); err != nil {
			return rowCheck{"unreadable: " + err.Error()}
		}
		if n != m.Rows {
			return rowCheck{fmt.Sprintf("%d rows, manifest says %d", n, m.Rows)}
		}
		return rowCheck{}
	}
	rc := check()
	// Hash whatever the check did not read (trailing bytes count too).
	if _, err := io.Copy(io.Discard, tee); err != nil {
		return "", rowCheck{}, fmt.Errorf("read %s: %w", m.File, err)
	}
	return hex.EncodeToString(h.Sum(nil)), rc, nil
}
