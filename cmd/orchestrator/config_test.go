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

func TestConfigEngineSafety(t *testing.T) {
	base := map[string]string{
		"ORCH_DATABASE_URL": "postgresql://u:p@localhost:5432/db",
		"ORCH_MASTER_KEY":   keys.GenerateMasterKey(),
		"ORCH_ADMIN_KEY":    keys.Generate(),
		"ORCH_ENGINE_IMAGE": "reg.example.com/engine:1.0",
	}
	c, err := loadConfig(envOf(base))
	require.NoError(t, err)
	require.Empty(t, c.Warnings)
	require.True(t, c.Images.Allows("reg.example.com/engine:2.0"), "the default image's repository")
	require.False(t, c.Images.Allows("evil/engine:1"))

	with := func(k, v string) map[string]string {
		m := map[string]string{}
		for a, b := range base {
			m[a] = b
		}
		m[k] = v
		return m
	}
	for _, n := range []string{"ORCH_MASTER_KEY", "ORCH_DATABASE_URL", "DOCKER_HOST", "BAD-NAME"} {
		_, err := loadConfig(envOf(with("ORCH_ENGINE_ENV_PASSTHROUGH", "OPENAI_API_KEY,"+n)))
		require.Error(t, err, n)
		require.Contains(t, err.Error(), "ORCH_ENGINE_ENV_PASSTHROUGH", n)
	}
	c, err = loadConfig(envOf(with("ORCH_ENGINE_ENV_PASSTHROUGH", "OPENAI_API_KEY,LLM_API_KEY")))
	require.NoError(t, err)
	require.Equal(t, []string{"OPENAI_API_KEY", "LLM_API_KEY"}, c.EnvPassthrough)

	_, err = loadConfig(envOf(with("ORCH_ENGINE_IMAGE_ALLOWLIST", "team/*")))
	require.ErrorContains(t, err, "ORCH_ENGINE_IMAGE_ALLOWLIST")
	c, err = loadConfig(envOf(with("ORCH_ENGINE_IMAGE_ALLOWLIST", "enginefleet/canary")))
	require.NoError(t, err)
	require.True(t, c.Images.Allows("enginefleet/canary:3"))
	require.True(t, c.Images.Allows("reg.example.com/engine:1.0"), "the default image itself")
	require.False(t, c.Images.Allows("reg.example.com/engine:2.0"), "an explicit list replaces the default repository")
}

func TestRedactURL(t *testing.T) {
	require.Equal(t, "dial u:***@h failed", redactURL("dial u:s3cret@h failed", "postgresql://u:s3cret@h/db"))
	require.Equal(t, "dial failed", redactURL("dial failed", "postgresql://u:@h/db"), "an empty password leaves the text alone")
	require.Equal(t, "dial failed", redactURL("dial failed", "postgresql://u@h/db"))
}

func TestHelp(t *testing.T) {
	for _, arg := range []string{"help", "-h", "--help"} {
		var stdout, stderr strings.Builder
		require.NoError(t, run([]string{arg}, &stdout, &stderr, envOf(nil)), arg)
		require.Contains(t, stdout.String(), "usage: orchestrator", arg)
	}
	var stdout, stderr strings.Builder
	require.Error(t, run([]string{"frobnicate"}, &stdout, &stderr, envOf(nil)))
}

// A guessable admin key is refused at start, as a placeholder master key
// is, with one message that does not echo it.
func TestConfigRefusesWeakAdminKey(t *testing.T) {
	env := func(admin string) map[string]string {
		return map[string]string{"ORCH_DATABASE_URL": "postgresql://u:p@localhost:5432/db",
			"ORCH_MASTER_KEY": keys.GenerateMasterKey(), "ORCH_ADMIN_KEY": admin}
	}
	for _, weak := range []string{"tiny-k3y", "replace-me", "0123456789abcde", "REPLACE-ME-with-a-real-key", "changeme-changeme-changeme",
		"my-placeholder-admin-key"} {
		_, err := loadConfig(envOf(env(weak)))
		require.Error(t, err, weak)
		require.Contains(t, err.Error(), "ORCH_ADMIN_KEY: is a placeholder or shorter than 16 characters", weak)
		require.NotContains(t, err.Error(), weak, "the error must not echo the key")
	}
	for _, strong := range []string{keys.Generate(), "0123456789abcdef", strings.Repeat("k", 32), "e2e-admin-key-0123456789"} {
		_, err := loadConfig(envOf(env(strong)))
		require.NoError(t, err, strong)
	}
	// deploy/secrets.example, copied as is.
	example, err := os.ReadFile("../../deploy/secrets.example/admin_key")
	require.NoError(t, err)
	path := t.TempDir() + "/admin_key"
	require.NoError(t, os.WriteFile(path, example, 0o600))
	e := env("")
	delete(e, "ORCH_ADMIN_KEY")
	e["ORCH_ADMIN_KEY_FILE"] = path
	_, err = loadConfig(envOf(e))
	require.ErrorContains(t, err, "ORCH_ADMIN_KEY: is a placeholder")
}

func TestConfigAuthAndProxies(t *testing.T) {
	base := map[string]string{"ORCH_DATABASE_URL": "postgresql://u:p@localhost:5432/db",
		"ORCH_MASTER_KEY": keys.GenerateMasterKey(), "ORCH_ADMIN_KEY": keys.Generate()}
	c, err := loadConfig(envOf(base))
	require.NoError(t, err)
	require.Equal(t, 5, c.AuthFailuresPerSecond)
	require.Empty(t, c.TrustedProxies)
	require.Equal(t, float64(5), apiConfig(c).AuthFailuresPerSecond)

	base["ORCH_AUTH_FAILURES_PER_S"] = "0"
	base["ORCH_TRUSTED_PROXIES"] = "10.0.0.0/8, 192.168.1.7 ,::1, fd00::/8"
	c, err = loadConfig(envOf(base))
	require.NoError(t, err)
	require.Less(t, apiConfig(c).AuthFailuresPerSecond, float64(0), "0 = no limit")
	var got []string
	for _, p := range c.TrustedProxies {
		got = append(got, p.String())
	}
	require.Equal(t, []string{"10.0.0.0/8", "192.168.1.7/32", "::1/128", "fd00::/8"}, got)

	base["ORCH_TRUSTED_PROXIES"] = "10.0.0.0/8,proxy.internal"
	base["ORCH_AUTH_FAILURES_PER_S"] = "-1"
	_, err = loadConfig(envOf(base))
	require.ErrorContains(t, err, `ORCH_TRUSTED_PROXIES: "proxy.internal" is neither an address nor a CIDR`)
	require.ErrorContains(t, err, "ORCH_AUTH_FAILURES_PER_S")
}

// Engines are limited and run as a non-root user unless the operator says
// otherwise; 0 lifts a limit, root is never accepted.
func TestConfigEngineLimitsAndUser(t *testing.T) {
	base := map[string]string{
		"ORCH_DATABASE_URL": "postgresql://u:p@localhost:5432/db",
		"ORCH_MASTER_KEY":   keys.GenerateMasterKey(),
		"ORCH_ADMIN_KEY":    strings.Repeat("a", 32),
	}
	c, err := loadConfig(envOf(base))
	require.NoError(t, err)
	require.EqualValues(t, 512, c.MemoryMB)
	require.Equal(t, 1.0, c.CPUs)
	require.EqualValues(t, 256, c.Pids)
	require.Equal(t, "65532:65532", c.EngineUser)

	with := func(kv ...string) map[string]string {
		m := map[string]string{}
		for k, v := range base {
			m[k] = v
		}
		for i := 0; i+1 < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	c, err = loadConfig(envOf(with("ORCH_ENGINE_MEMORY_MB", "0", "ORCH_ENGINE_CPUS", "0", "ORCH_ENGINE_PIDS", "0", "ORCH_ENGINE_USER", "1000:1001")))
	require.NoError(t, err)
	require.Zero(t, c.MemoryMB)
	require.Zero(t, c.CPUs)
	require.Zero(t, c.Pids)
	require.Equal(t, "1000:1001", c.EngineUser)

	for _, user := range []string{"0", "0:0", "root", "nonroot", "1000:staff", "-1"} {
		_, err := loadConfig(envOf(with("ORCH_ENGINE_USER", user)))
		require.Error(t, err, user)
		require.Contains(t, err.Error(), "ORCH_ENGINE_USER", user)
	}
}

func kubeEnv(extra map[string]string) map[string]string {
	m := map[string]string{
		"ORCH_DATABASE_URL":   "postgresql://u:p@localhost:5432/db",
		"ORCH_MASTER_KEY":     keys.GenerateMasterKey(),
		"ORCH_ADMIN_KEY":      strings.Repeat("a", 32),
		"ORCH_ENGINE_BACKEND": "kubernetes",
	}
	for k, v := range extra {
		m[k] = v
	}
	return m
}

// On kubernetes the URL handed to products is the engine's Service by
// default, and the backend's settings are read and parsed.
func TestConfigKubernetes(t *testing.T) {
	c, err := loadConfig(envOf(kubeEnv(map[string]string{
		"KUBECONFIG":                         "/etc/orch/kubeconfig",
		"ORCH_NODE":                          "cluster-a",
		"ORCH_KUBE_NAMESPACE":                "engines",
		"ORCH_KUBE_STORAGE_CLASS":            "fast-ssd",
		"ORCH_KUBE_IMAGE_PULL_SECRETS":       "regcred, other",
		"ORCH_KUBE_NODE_SELECTOR":            "pool=engines,topology.kubernetes.io/zone=a",
		"ORCH_KUBE_TOLERATIONS":              "dedicated=engines:NoSchedule,spot:NoExecute,gpu",
		"ORCH_KUBE_CATALOG":                  "pvc:catalog",
		"ORCH_KUBE_PRODUCT_NAMESPACE_LABELS": "team=product",
	})))
	require.NoError(t, err)
	require.Equal(t, "http://{service}.{namespace}.svc:8000", c.URLTemplate)
	require.Equal(t, c.URLTemplate, c.ProbeURLTemplate)
	k := c.Kube
	require.Equal(t, "/etc/orch/kubeconfig", k.Kubeconfig)
	require.Equal(t, "engines", k.Namespace)
	require.Equal(t, "cluster-a", k.Node)
	require.Equal(t, "fast-ssd", k.StorageClass)
	require.Equal(t, "1Gi", k.BrainSize)
	require.Equal(t, []string{"regcred", "other"}, k.ImagePullSecrets)
	require.Equal(t, map[string]string{"pool": "engines", "topology.kubernetes.io/zone": "a"}, k.NodeSelector)
	require.Len(t, k.Tolerations, 3)
	require.Equal(t, "Equal", k.Tolerations[0].Operator)
	require.Equal(t, "engines", k.Tolerations[0].Value)
	require.Equal(t, "NoSchedule", k.Tolerations[0].Effect)
	require.Equal(t, "Exists", k.Tolerations[1].Operator)
	require.Equal(t, "NoExecute", k.Tolerations[1].Effect)
	require.Equal(t, "", k.Tolerations[2].Effect)
	require.Equal(t, "pvc", k.CatalogKind)
	require.Equal(t, map[string]string{"app.kubernetes.io/name": "enginefleet-orchestrator"}, k.Orchestrator.PodLabels)
	require.Len(t, k.Products, 1)
	require.Equal(t, map[string]string{"team": "product"}, k.Products[0].NamespaceLabels)

	// The request side allocates no host port; workers never move one.
	require.True(t, coreConfig(c).NoHostPorts)
	require.Equal(t, "engines", coreConfig(c).Namespace)
	require.Zero(t, workerConfig(c).Engines.PortMax)

	// An explicit template is kept.
	c, err = loadConfig(envOf(kubeEnv(map[string]string{"ORCH_ENGINE_URL_TEMPLATE": "https://engines.example.com/{engine_id}"})))
	require.NoError(t, err)
	require.Equal(t, "https://engines.example.com/{engine_id}", c.URLTemplate)
	require.Equal(t, "http://{service}.{namespace}.svc:8000", c.ProbeURLTemplate)
}

// Every bad kubernetes setting is named in the one error, with the rest.
func TestConfigKubernetesProblems(t *testing.T) {
	_, err := loadConfig(envOf(kubeEnv(map[string]string{
		"ORCH_KUBE_NAMESPACE":               "Not_A_Namespace",
		"ORCH_KUBE_BRAIN_SIZE":              "lots",
		"ORCH_KUBE_NODE_SELECTOR":           "pool",
		"ORCH_KUBE_TOLERATIONS":             "dedicated=engines:Sometimes",
		"ORCH_KUBE_CATALOG":                 "nfs:catalog",
		"ORCH_KUBE_ORCHESTRATOR_POD_LABELS": ",",
		"ORCH_KUBE_IMAGE_PULL_SECRETS":      "Bad Secret",
		"ORCH_ENGINE_URL_TEMPLATE":          "http://127.0.0.1:{port}",
		"ORCH_CATALOG_MOUNT_PATH":           "/srv/catalog",
		"ORCH_ENGINE_USER":                  "1000:1000",
		"ORCH_SLEEP_MODE":                   "hibernate",
	})))
	require.Error(t, err)
	for _, want := range []string{"ORCH_KUBE_NAMESPACE", "ORCH_KUBE_BRAIN_SIZE", "ORCH_KUBE_NODE_SELECTOR: \"pool\"",
		"ORCH_KUBE_TOLERATIONS", "ORCH_KUBE_CATALOG", "ORCH_KUBE_ORCHESTRATOR_POD_LABELS", "ORCH_KUBE_IMAGE_PULL_SECRETS",
		"ORCH_ENGINE_URL_TEMPLATE: {port} has no value on the kubernetes backend", "ORCH_CATALOG_MOUNT_PATH",
		"ORCH_ENGINE_USER", "ORCH_SLEEP_MODE"} {
		require.Contains(t, err.Error(), want)
	}

	// {namespace} means nothing off kubernetes.
	env := kubeEnv(map[string]string{"ORCH_ENGINE_URL_TEMPLATE": "http://{service}.{namespace}.svc:8000"})
	delete(env, "ORCH_ENGINE_BACKEND")
	_, err = loadConfig(envOf(env))
	require.ErrorContains(t, err, "ORCH_ENGINE_URL_TEMPLATE: {namespace} has a value only on the kubernetes backend")
}
