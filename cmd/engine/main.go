// Command engine is the reference engine (see package engine): a
// single-tenant server with a SQLite brain that speaks the engine contract.
//
// Environment:
//
//	ENGINE_KEY_HASH                 hex SHA-256 of the engine key (required)
//	ENGINE_KEY_HASH_PREVIOUS        previous key's hash, accepted until ...
//	ENGINE_KEY_PREVIOUS_EXPIRES_AT  ... this RFC 3339 time (required with it)
//	SQLITE_DB_PATH                  brain file (default /data/brain.sqlite)
//	CATALOG_DIR                     read-only catalog (default /catalog)
//	ENGINE_LISTEN_ADDR              listen address (default :8000)
//	ENGINE_LOG_LEVEL                debug, info (default), warn, error
//
// Test knobs:
//
//	ENGINE_BOOT_DELAY_S     /health says 503 "starting" this long after start (float seconds)
//	ENGINE_UNHEALTHY        "1"/"true": start unhealthy
//	ENGINE_UNHEALTHY_AFTER_S /health fails from this long after start on (float seconds): a release that breaks after boot
//	ENGINE_TOKEN_DELAY_MS   pause between /execute token events
//
// The version reported by /health is set at build time with
// -ldflags "-X main.version=...". SIGTERM or SIGINT drain in-flight
// requests (up to 25 s), close the brain and exit 0.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/enginefleet/orchestrator/refengine"
)

// version is stamped by the build (-X main.version=...).
var version = "dev"

func main() {
	os.Exit(run())
}

func run() int {
	cfg, level, err := loadConfig(os.Getenv)
	log := slog.New(slog.NewJSONHandler(os.Stdout, &slog.HandlerOptions{Level: level}))
	if err != nil {
		log.Error("invalid configuration", "err", err.Error())
		fmt.Fprintf(os.Stderr, "engine: invalid configuration:\n%v\n", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := refengine.Run(ctx, cfg, log); err != nil {
		log.Error("engine stopped", "err", err.Error())
		return 1
	}
	log.Info("engine stopped")
	return 0
}

// loadConfig reads the engine's configuration from getenv, reporting every
// problem at once.
func loadConfig(getenv func(string) string) (refengine.Config, slog.Level, error) {
	var errs []error
	cfg := refengine.Config{
		KeyHash:     strings.TrimSpace(getenv("ENGINE_KEY_HASH")),
		PrevKeyHash: strings.TrimSpace(getenv("ENGINE_KEY_HASH_PREVIOUS")),
		DBPath:      getenv("SQLITE_DB_PATH"),
		CatalogDir:  getenv("CATALOG_DIR"),
		ListenAddr:  getenv("ENGINE_LISTEN_ADDR"),
		Version:     version,
	}
	if v := strings.TrimSpace(getenv("ENGINE_KEY_PREVIOUS_EXPIRES_AT")); v != "" {
		t, err := time.Parse(time.RFC3339Nano, v)
		if err != nil {
			errs = append(errs, fmt.Errorf("ENGINE_KEY_PREVIOUS_EXPIRES_AT: not an RFC 3339 time: %q", v))
		}
		cfg.PrevKeyExpiresAt = t
	}
	if v := strings.TrimSpace(getenv("ENGINE_BOOT_DELAY_S")); v != "" {
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || f < 0 || f > 24*3600 {
			errs = append(errs, fmt.Errorf("ENGINE_BOOT_DELAY_S: want seconds from 0 to 86400, got %q", v))
		}
		cfg.BootDelay = time.Duration(f * float64(time.Second))
	}
	if v := strings.TrimSpace(getenv("ENGINE_TOKEN_DELAY_MS")); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			errs = append(errs, fmt.Errorf("ENGINE_TOKEN_DELAY_MS: want a non-negative integer, got %q", v))
		}
		cfg.TokenDelay = time.Duration(n) * time.Millisecond
	}
	if v := strings.TrimSpace(getenv("ENGINE_UNHEALTHY_AFTER_S")); v != "" {
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || f <= 0 || f > 24*3600 {
			errs = append(errs, fmt.Errorf("ENGINE_UNHEALTHY_AFTER_S: want seconds from 0 to 86400, got %q", v))
		}
		cfg.UnhealthyAfter = time.Duration(f * float64(time.Second))
	}
	if v := strings.TrimSpace(getenv("ENGINE_UNHEALTHY")); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("ENGINE_UNHEALTHY: want 1/0/true/false, got %q", v))
		}
		cfg.ForceUnhealthy = b
	}
	level := slog.LevelInfo
	if v := strings.TrimSpace(getenv("ENGINE_LOG_LEVEL")); v != "" {
		if err := level.UnmarshalText([]byte(v)); err != nil {
			errs = append(errs, fmt.Errorf("ENGINE_LOG_LEVEL: want debug, info, warn or error, got %q", v))
		}
	}
	if err := cfg.Validate(); err != nil {
		errs = append(errs, err)
	}
	return cfg, level, errors.Join(errs...)
}
