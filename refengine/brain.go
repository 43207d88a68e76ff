package refengine

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unicode"

	"modernc.org/sqlite"
)

// TimeFormat is how a memory's created_at is stored and served: RFC 3339
// in UTC with a fixed nine-digit fraction, so the text is the same on every
// engine and sorts like the time it names.
const TimeFormat = "2006-01-02T15:04:05.000000000Z"

// Bundle identifiers of the portable brain format (GET /memory/export).
const (
	BundleFormat  = "enginefleet.brain"
	BundleVersion = 1
)

// Limits on what one memory may hold.
const (
	MaxContentBytes = 64 << 10
	MaxTags         = 64
	MaxTagBytes     = 128
)

// Memory is one entry of the brain.
type Memory struct {
	ID        int64    `json:"id"`
	Content   string   `json:"content"`
	Tags      []string `json:"tags"`
	CreatedAt string   `json:"created_at"`
}

// Bundle is the whole brain as a portable JSON document.
type Bundle struct {
	Format   string   `json:"format"`
	Version  int      `json:"version"`
	Memories []Memory `json:"memories"`
}

// Brain is the engine's persistent memory: a SQLite file with a memories
// table and an FTS5 index over content and tags.
type Brain struct {
	db   *sql.DB
	path string
	now  func() time.Time
}

// Errors returned by Brain methods.
var (
	// ErrInvalidQuery is returned by Search when a raw FTS5 query does not parse.
	ErrInvalidQuery = errors.New("invalid full-text query")
	// ErrInvalid is wrapped by validation failures of memories and bundles.
	ErrInvalid = errors.New("invalid")
)

const schema = `
CREATE TABLE IF NOT EXISTS memories (
	id         INTEGER PRIMARY KEY,
	content    TEXT NOT NULL,
	tags       TEXT NOT NULL DEFAULT '[]',
	created_at TEXT NOT NULL
);
CREATE VIRTUAL TABLE IF NOT EXISTS memories_fts USING fts5(
	content, tags,
	content='memories', content_rowid='id',
	tokenize='porter unicode61 remove_diacritics 2'
);
PRAGMA user_version = 1;
`

// OpenBrain opens (creating if needed) the SQLite brain at path, creating
// its directory, in WAL mode with a busy timeout and in-memory temp storage
// (the engine may write only under its data directory).
func OpenBrain(ctx context.Context, path string) (*Brain, error) {
	if path == "" {
		return nil, errors.New("open brain: empty path")
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create data directory: %w", err)
	}
	dsn := path + "?_txlock=immediate" +
		"&_pragma=busy_timeout(10000)" +
		"&_pragma=journal_mode(WAL)" +
		"&_pragma=synchronous(NORMAL)" +
		"&_pragma=temp_store(MEMORY)" +
		"&_pragma=foreign_keys(1)"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open brain: %w", err)
	}
	db.SetMaxOpenConns(8)
	db.SetMaxIdleConns(8)
	db.SetConnMaxIdleTime(5 * time.Minute)
	if _, err := db.ExecContext(ctx, schema); err != nil {
		db.Close()
		return nil, fmt.Errorf("create schema: %w", err)
	}
	return &Brain{db: db, path: path, now: time.Now}, nil
}

// Path is the SQLite file's path.
func (b *Brain) Path() string { return b.path }

// Ping checks that the database answers and has its schema.
func (b *Brain) Ping(ctx context.Context) error {
	var n int
	if err := b.db.QueryRowContext(ctx, `SELECT count(*) FROM (SELECT 1 FROM memories LIMIT 1)`).Scan(&n); err != nil {
		return err
	}
	return nil
}

// Close checkpoints the WAL into the database file and closes it.
func (b *Brain) Close() error {
	_, cerr := b.db.Exec(`PRAGMA wal_checkpoint(TRUNCATE)`)
	if err := b.db.Close(); err != nil {
		return fmt.Errorf("close brain: %w", err)
	}
	if cerr != nil {
		return fmt.Errorf("checkpoint brain: %w", cerr)
	}
	return nil
}

// validateMemory checks content and tags; it returns an error wrapping ErrInvalid.
func validateMemory(content string, tags []string) error {
	if strings.TrimSpace(content) == "" {
		return fmt.Errorf("%w: content is empty", ErrInvalid)
	}
	if len(content) > MaxContentBytes {
		return fmt.Errorf("%w: content is longer than %d bytes", ErrInvalid, MaxContentBytes)
	}
	if len(tags) > MaxTags {
		return fmt.Errorf("%w: more than %d tags", ErrInvalid, MaxTags)
	}
	for _, t := range tags {
		if t == "" || len(t) > MaxTagBytes {
			return fmt.Errorf("%w: a tag must have 1 to %d bytes", ErrInvalid, MaxTagBytes)
		}
	}
	return nil
}

func encodeTags(tags []string) (string, error) {
	if tags == nil {
		tags = []string{}
	}
	b, err := json.Marshal(tags)
	return string(b), err
}

func decodeTags(s string) ([]string, error) {
	tags := []string{}
	if err := json.Unmarshal([]byte(s), &tags); err != nil {
		return nil, fmt.Errorf("decode tags: %w", err)
	}
	if tags == nil {
		tags = []string{}
	}
	return tags, nil
}

func insertMemory(ctx context.Context, tx *sql.Tx, m Memory) error {
	tags, err := encodeTags(m.Tags)
	if err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx,
		`INSERT INTO memories (id, content, tags, created_at) VALUES (?, ?, ?, ?)`,
		m.ID, m.Content, tags, m.CreatedAt); err != nil {
		return fmt.Errorf("insert memory: %w", err)
	}
	if _, err := tx.ExecContext(ctx,
		`INSERT INTO memories_fts (rowid, content, tags) VALUES (?, ?, ?)`,
		m.ID, m.Content, tags); err != nil {
		return fmt.Errorf("index memory: %w", err)
	}
	return nil
}

// Add stores a new memory and returns it. Errors wrapping ErrInvalid
// report bad content or tags.
func (b *Brain) Add(ctx context.Context, content string, tags []string) (Memory, error) {
	if err := validateMemory(content, tags); err != nil {
		return Memory{}, err
	}
	if tags == nil {
		tags = []string{}
	}
	tx, err := b.db.BeginTx(ctx, nil)
	if err != nil {
		return Memory{}, fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback()
	m := Memory{Content: content, Tags: tags, CreatedAt: b.now().UTC().Format(TimeFormat)}
	if err := tx.QueryRowContext(ctx, `SELECT coalesce(max(id), 0) + 1 FROM memories`).Scan(&m.ID); err != nil {
		return Memory{}, fmt.Errorf("next id: %w", err)
	}
	if err := insertMemory(ctx, tx, m); err != nil {
		return Memory{}, err
	}
	if err := tx.Commit(); err != nil {
		return Memory{}, fmt.Errorf("commit: %w", err)
	}
	return m, nil
}

// SearchMode says how Search reads its query.
type SearchMode int

// Search modes.
const (
	// AllWords matches memories containing every word of the query; the
	// words are quoted, so no input is a syntax error.
	AllWords SearchMode = iota
	// AnyWord matches memories containing at least one word of the query.
	AnyWord
	// RawFTS5 passes the query to FTS5 as written (phrases, OR, NOT,
	// prefix*, column filters); a query that does not parse returns
	// ErrInvalidQuery.
	RawFTS5
)

// Words splits text into the words the full-text index knows (runs of
// letters, marks and digits).
func Words(text string) []string {
	return strings.FieldsFunc(text, func(r rune) bool {
		return !unicode.IsLetter(r) && !unicode.IsDigit(r) && !unicode.IsNumber(r) && !unicode.IsMark(r)
	})
}

// ftsQuery builds the MATCH expression for query in mode; "" means the
// query has no searchable word.
func ftsQuery(query string, mode SearchMode) string {
	if mode == RawFTS5 {
		return query
	}
	words := Words(query)
	seen := make(map[string]bool, len(words))
	quoted := make([]string, 0, len(words))
	for _, w := range words {
		lw := strings.ToLower(w)
		if seen[lw] {
			continue
		}
		seen[lw] = true
		quoted = append(quoted, `"`+strings.ReplaceAll(w, `"`, `""`)+`"`)
	}
	sep := " "
	if mode == AnyWord {
		sep = " OR "
	}
	return strings.Join(quoted, sep)
}

// Search returns up to limit memories matching query, best match first
// (BM25, then newest). An empty query returns the newest memories. With
// RawFTS5 a malformed query returns an error wrapping ErrInvalidQuery.
func (b *Brain) Search(ctx context.Context, query string, mode SearchMode, limit int) ([]Memory, error) {
	if strings.TrimSpace(query) == "" {
		return b.query(ctx, `SELECT id, content, tags, created_at FROM memories ORDER BY id DESC LIMIT ?`, limit)
	}
	match := ftsQuery(query, mode)
	if strings.TrimSpace(match) == "" {
		return []Memory{}, nil
	}
	ms, err := b.query(ctx, `
		SELECT m.id, m.content, m.tags, m.created_at
		FROM memories_fts JOIN memories m ON m.id = memories_fts.rowid
		WHERE memories_fts MATCH ?
		ORDER BY bm25(memories_fts), m.id DESC
		LIMIT ?`, match, limit)
	if err != nil {
		var se *sqlite.Error
		if errors.As(err, &se) && se.Code() == 1 { // SQLITE_ERROR: the MATCH expression did not parse
			return nil, fmt.Errorf("%w: %s", ErrInvalidQuery, strings.TrimPrefix(se.Error(), "SQL logic error: "))
		}
		return nil, err
	}
	return ms, nil
}

func (b *Brain) query(ctx context.Context, q string, args ...any) ([]Memory, error) {
	rows, err := b.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("query memories: %w", err)
	}
	defer rows.Close()
	ms := []Memory{}
	for rows.Next() {
		m, err := scanMemory(rows)
		if err != nil {
			return nil, err
		}
		ms = append(ms, m)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("query memories: %w", err)
	}
	return ms, nil
}

func scanMemory(rows *sql.Rows) (Memory, error) {
	var m Memory
	var tags string
	if err := rows.Scan(&m.ID, &m.Content, &tags, &m.CreatedAt); err != nil {
		return Memory{}, fmt.Errorf("scan memory: %w", err)
	}
	t, err := decodeTags(tags)
	if err != nil {
		return Memory{}, err
	}
	m.Tags = t
	return m, nil
}

// Export calls fn for every memory in id order, from one consistent
// snapshot of the brain.
func (b *Brain) Export(ctx context.Context, fn func(Memory) error) error {
	tx, err := b.db.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback()
	rows, err := tx.QueryContext(ctx, `SELECT id, content, tags, created_at FROM memories ORDER BY id`)
	if err != nil {
		return fmt.Errorf("export memories: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		m, err := scanMemory(rows)
		if err != nil {
			return err
		}
		if err := fn(m); err != nil {
			return err
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("export memories: %w", err)
	}
	return nil
}

// ValidateBundle checks a bundle and normalises it in place (timestamps to
// TimeFormat, null tags to []). Errors wrap ErrInvalid.
func ValidateBundle(bn *Bundle) error {
	if bn.Format != BundleFormat {
		return fmt.Errorf("%w: format must be %q", ErrInvalid, BundleFormat)
	}
	if bn.Version != BundleVersion {
		return fmt.Errorf("%w: unsupported bundle version %d (want %d)", ErrInvalid, bn.Version, BundleVersion)
	}
	seen := make(map[int64]bool, len(bn.Memories))
	for i := range bn.Memories {
		m := &bn.Memories[i]
		if m.ID <= 0 {
			return fmt.Errorf("%w: memories[%d]: id must be positive", ErrInvalid, i)
		}
		if seen[m.ID] {
			return fmt.Errorf("%w: memories[%d]: duplicate id %d", ErrInvalid, i, m.ID)
		}
		seen[m.ID] = true
		if err := validateMemory(m.Content, m.Tags); err != nil {
			return fmt.Errorf("memories[%d]: %w", i, err)
		}
		t, err := time.Parse(time.RFC3339Nano, m.CreatedAt)
		if err != nil {
			return fmt.Errorf("%w: memories[%d]: created_at is not RFC 3339", ErrInvalid, i)
		}
		m.CreatedAt = t.UTC().Format(TimeFormat)
		if m.Tags == nil {
			m.Tags = []string{}
		}
	}
	return nil
}

// Import replaces the brain's contents with the bundle's memories in one
// transaction, keeping ids, timestamps and tags. It returns the number of
// memories imported; errors wrapping ErrInvalid report a bad bundle.
func (b *Brain) Import(ctx context.Context, bn Bundle) (int, error) {
	if err := ValidateBundle(&bn); err != nil {
		return 0, err
	}
	tx, err := b.db.BeginTx(ctx, nil)
	if err != nil {
		return 0, fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `DELETE FROM memories`); err != nil {
		return 0, fmt.Errorf("clear memories: %w", err)
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO memories_fts (memories_fts) VALUES ('delete-all')`); err != nil {
		return 0, fmt.Errorf("clear index: %w", err)
	}
	for _, m := range bn.Memories {
		if err := insertMemory(ctx, tx, m); err != nil {
			return 0, err
		}
	}
	if err := tx.Commit(); err != nil {
		return 0, fmt.Errorf("commit: %w", err)
	}
	return len(bn.Memories), nil
}
