package refengine

import (
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Defaults of the engine contract.
const (
	DefaultDBPath          = "/data/brain.sqlite"
	DefaultCatalogDir      = "/catalog"
	DefaultListenAddr      = ":8000"
	DefaultShutdownTimeout = 25 * time.Second
)

// UnhealthyMarker is the file, next to the SQLite file, whose presence
// makes the engine report unhealthy (set by PUT /debug/health); it
// survives a restart of the process or container.
const UnhealthyMarker = "unhealthy"

// Config is everything the engine needs. cmd/engine fills it from the
// environment (ENGINE_KEY_HASH, SQLITE_DB_PATH, ...).
type Config struct {
	// KeyHash is the hex SHA-256 of the engine key (required).
	KeyHash string
	// PrevKeyHash, when set, is a previous key's hex SHA-256, accepted
	// until PrevKeyExpiresAt (required with it).
	PrevKeyHash      string
	PrevKeyExpiresAt time.Time
	// DBPath is the SQLite brain; its directory is the data directory.
	DBPath string
	// CatalogDir is a read-only catalog; absent is fine, unreadable is not.
	CatalogDir string
	// ListenAddr is where Run listens.
	ListenAddr string
	// Version is reported by /health.
	Version string
	// BootDelay keeps /health at 503 "starting" that long after start.
	BootDelay time.Duration
	// ForceUnhealthy starts the engine unhealthy (as if the marker existed).
	ForceUnhealthy bool
	// UnhealthyAfter, when set, makes /health fail from this long after
	// start on: an engine release that boots fine and then breaks (the
	// rollout tests' bad image).
	UnhealthyAfter time.Duration
	// TokenDelay is slept between the token events of /execute, to mimic
	// a model that streams.
	TokenDelay time.Duration
	// ShutdownTimeout bounds the drain of in-flight requests in Run.
	ShutdownTimeout time.Duration
}

// withDefaults fills the zero fields that have a default.
func (c Config) withDefaults() Config {
	if c.DBPath == "" {
		c.DBPath = DefaultDBPath
	}
	if c.CatalogDir == "" {
		c.CatalogDir = DefaultCatalogDir
	}
	if c.ListenAddr == "" {
		c.ListenAddr = DefaultListenAddr
	}
	if c.Version == "" {
		c.Version = "dev"
	}
	if c.ShutdownTimeout <= 0 {
		c.ShutdownTimeout = DefaultShutdownTimeout
	}
	return c
}

// Validate reports every problem of the configuration at once.
func (c Config) Validate() error {
	var errs []error
	if c.KeyHash == "" {
		errs = append(errs, errors.New("ENGINE_KEY_HASH is required"))
	} else if _, err := parseKeyHash(c.KeyHash); err != nil {
		errs = append(errs, fmt.Errorf("ENGINE_KEY_HASH: %w", err))
	}
	if c.PrevKeyHash != "" {
		if _, err := parseKeyHash(c.PrevKeyHash); err != nil {
			errs = append(errs, fmt.Errorf("ENGINE_KEY_HASH_PREVIOUS: %w", err))
		}
		if c.PrevKeyExpiresAt.IsZero() {
			errs = append(errs, errors.New("ENGINE_KEY_PREVIOUS_EXPIRES_AT is required with ENGINE_KEY_HASH_PREVIOUS"))
		}
	}
	if c.BootDelay < 0 {
		errs = append(errs, errors.New("ENGINE_BOOT_DELAY_S must not be negative"))
	}
	if c.TokenDelay < 0 {
		errs = append(errs, errors.New("ENGINE_TOKEN_DELAY_MS must not be negative"))
	}
	return errors.Join(errs...)
}

// parseKeyHash decodes a hex SHA-256 (either case).
func parseKeyHash(s string) ([32]byte, error) {
	var h [32]byte
	b, err := hex.DecodeString(strings.TrimSpace(s))
	if err != nil || len(b) != len(h) {
		return h, errors.New("must be 64 hex digits (a SHA-256)")
	}
	copy(h[:], b)
	return h, nil
}
