package main

import (
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/refengine"
)

const hash = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b" // sha256("secret")

func env(kv map[string]string) func(string) string {
	return func(k string) string { return kv[k] }
}

func TestLoadConfig(t *testing.T) {
	t.Run("defaults", func(t *testing.T) {
		cfg, level, err := loadConfig(env(map[string]string{"ENGINE_KEY_HASH": hash}))
		require.NoError(t, err)
		assert.Equal(t, slog.LevelInfo, level)
		assert.Equal(t, hash, cfg.KeyHash)
		assert.Equal(t, "dev", cfg.Version)
		// Paths and address default inside refengine.New, so the zero values stay.
		assert.Equal(t, "", cfg.DBPath)
		assert.Zero(t, cfg.BootDelay)
		assert.False(t, cfg.ForceUnhealthy)
	})
	t.Run("everything", func(t *testing.T) {
		cfg, level, err := loadConfig(env(map[string]string{
			"ENGINE_KEY_HASH":                hash,
			"ENGINE_KEY_HASH_PREVIOUS":       strings.ToUpper(hash),
			"ENGINE_KEY_PREVIOUS_EXPIRES_AT": "2030-01-02T03:04:05+01:00",
			"SQLITE_DB_PATH":                 "/tmp/x/brain.sqlite",
			"CATALOG_DIR":                    "/cat",
			"ENGINE_LISTEN_ADDR":             "127.0.0.1:9001",
			"ENGINE_BOOT_DELAY_S":            "1.5",
			"ENGINE_UNHEALTHY":               "1",
			"ENGINE_UNHEALTHY_AFTER_S":       "2.5",
			"ENGINE_TOKEN_DELAY_MS":          "20",
			"ENGINE_LOG_LEVEL":               "debug",
		}))
		require.NoError(t, err)
		assert.Equal(t, slog.LevelDebug, level)
		assert.Equal(t, refengine.Config{
			KeyHash:          hash,
			PrevKeyHash:      strings.ToUpper(hash),
			PrevKeyExpiresAt: time.Date(2030, 1, 2, 2, 4, 5, 0, time.UTC),
			DBPath:           "/tmp/x/brain.sqlite",
			CatalogDir:       "/cat",
			ListenAddr:       "127.0.0.1:9001",
			Version:          "dev",
			BootDelay:        1500 * time.Millisecond,
			ForceUnhealthy:   true,
			UnhealthyAfter:   2500 * time.Millisecond,
			TokenDelay:       20 * time.Millisecond,
		}, normalise(cfg))
	})
	t.Run("every problem at once", func(t *testing.T) {
		_, _, err := loadConfig(env(map[string]string{
			"ENGINE_KEY_HASH_PREVIOUS":       "nothex",
			"ENGINE_KEY_PREVIOUS_EXPIRES_AT": "tomorrow",
			"ENGINE_BOOT_DELAY_S":            "-1",
			"ENGINE_UNHEALTHY":               "maybe",
			"ENGINE_UNHEALTHY_AFTER_S":       "0",
			"ENGINE_TOKEN_DELAY_MS":          "x",
			"ENGINE_LOG_LEVEL":               "loud",
		}))
		require.Error(t, err)
		for _, want := range []string{
			"ENGINE_KEY_HASH is required", "ENGINE_KEY_HASH_PREVIOUS", "ENGINE_KEY_PREVIOUS_EXPIRES_AT",
			"ENGINE_BOOT_DELAY_S", "ENGINE_UNHEALTHY", "ENGINE_UNHEALTHY_AFTER_S", "ENGINE_TOKEN_DELAY_MS", "ENGINE_LOG_LEVEL",
		} {
			assert.Contains(t, err.Error(), want)
		}
	})
}

// normalise makes times comparable with ==.
func normalise(c refengine.Config) refengine.Config {
	c.PrevKeyExpiresAt = c.PrevKeyExpiresAt.UTC()
	return c
}
