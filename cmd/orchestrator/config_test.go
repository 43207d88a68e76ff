package main

import (
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/keys"
)

func envOf(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestConfigListsEveryProblem(t *testing.T) {
	_, err := loadConfig(envOf(map[string]string{
		"ORCH_MASTER_KEY":     "not-a-fernet-key",
		"ORCH_PORT_MIN":       "9500",
		"ORCH_PORT_MAX":       "9100",
		"ORCH_SLEEP_MODE":     "hibernate",
		"ORCH_ENGINE_BACKEND": "k8s",
		"ORCH_BACKUP_CRON":    "every night",
	}))
	require.Error(t, err)
	msg := err.Error()
	for _, want := range []string{"ORCH_DATABASE_URL: is required", "ORCH_ADMIN_KEY: is required",
		"ORCH_MASTER_KEY must be URL-safe base64 of 32 bytes", "ORCH_PORT_MIN: (9500) must not exceed ORCH_PORT_MAX",
		"ORCH_SLEEP_MODE", "ORCH_ENGINE_BACKEND", "ORCH_BACKUP_CRON"} {
		require.Contains(t, msg, want)
	}
	require.NotContains(t, msg, "not-a-fernet-key", "the error must not echo the key")
}

func TestConfigDefaults(t *testing.T) {
	c, err := loadConfig(envOf(map[string]string{
		"ORCH_DATABASE_URL": "postgresql://u:p@localhost:5432/db",
		"ORCH_MASTER_KEY":   keys.GenerateMasterKey(),
		"ORCH_ADMIN_KEY":    strings.Repeat("a", 32),
	}))
	require.NoError(t, err)
	require.Equal(t, ":8000", c.ListenAddr)
	require.Equal(t, 9001, c.PortMin)
	require.Equal(t, 3, c.HealthMaxFailures)
	require.Equal(t, "mark", c.SleepMode)
	require.Equal(t, "engine_net", c.Network)
	require.Equal(t, 60, int(c.BootTimeout.Seconds()))
}

func TestConfigSecretsFromFiles(t *testing.T) {
	dir := t.TempDir()
	mk := keys.GenerateMasterKey()
	write := func(name, v string) string {
		p := dir + "/" + name
		require.NoError(t, os.WriteFile(p, []byte(v+"\n"), 0o600))
		return p
	}
	c, err := loadConfig(envOf(map[string]string{
		"ORCH_DATABASE_URL_FILE": write("db", "postgresql://u:p@db:5432/orch"),
		"ORCH_MASTER_KEY_FILE":   write("mk", mk),
		"ORCH_ADMIN_KEY_FILE":    write("ak", strings.Repeat("b", 32)),
	}))
	require.NoError(t, err)
	require.Equal(t, mk, c.MasterKey)
	require.Equal(t, strings.Repeat("b", 32), c.AdminKey)
	require.Equal(t, "postgresql://u:p@db:5432/orch", c.DatabaseURL)
}
