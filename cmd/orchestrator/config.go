package main

import (
	"fmt"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/go-co-op/gocron/v2"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/backend/docker"
	"github.com/enginefleet/orchestrator/backend/kubernetes"
	"github.com/enginefleet/orchestrator/keys"
)

// Config is every setting of the orchestrator, read from the environment.
// Only this package reads the environment.
type Config struct {
	DatabaseURL      string
	DatabaseMaxConns int // 0 = computed from the roles (pool.go)
	MasterKey        string
	MasterKeyPrev    []string
	AdminKey         string
	ListenAddr       string
	MetricsAddr      string
	LogLevel         string
	LogFormat        string
	Node             string
	EngineImage      string
	Images           orch.Images // ORCH_ENGINE_IMAGE_ALLOWLIST
	Backend          string
	EngineBinary     string
	EnvPassthrough   []string
	Network          string
	PortMin, PortMax int
	CatalogMountPath string
	DataRootPath     string
	URLTemplate      string
	ProbeURLTemplate string
	MemoryMB         int64
	CPUs             float64
	Pids             int64
	EngineUser       string
	DockerHost       string
	// Kube is the kubernetes backend's configuration (ORCH_KUBE_*,
	// KUBECONFIG), read only with ORCH_ENGINE_BACKEND=kubernetes.
	Kube kubernetes.Config

	HealthInterval     time.Duration
	HealthTimeout      time.Duration
	HealthMaxFailures  int
	RestartBackoffBase time.Duration
	RestartBackoffMax  time.Duration
	RestartMaxAttempts int
	BootTimeout        time.Duration
	IdleAfter          time.Duration
	SleepMode          string
	KeyOverlap         time.Duration

	BackupDir           string
	BackupCron          string
	BackupRetentionDays int
	AuditExportDir      string
	AuditExportCron     string
	AuditRetentionDays  int

	WorkerConcurrency int
	ShutdownTimeout   time.Duration

	AuthFailuresPerSecond int            // 0 = no throttle
	TrustedProxies        []netip.Prefix // whose X-Forwarded-For names the client

	WebhookAllowNetworks      []netip.Prefix // private destinations webhooks may reach
	WebhookAllowHTTP          bool
	WebhookConcurrency        int
	WebhookProductConcurrency int
	WebhookTimeout            time.Duration
	WebhookRetryFor           time.Duration

	// Warnings are logged at start: settings that work but should not.
	Warnings []string
}

var envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// envVar documents one variable; .env.example and the README are written from this list.
type envVar struct {
	name, def, help string
}

var envVars = []envVar{
	{"ORCH_DATABASE_URL", "", "required: postgresql://user:pass@host:port/db (or ORCH_DATABASE_URL_FILE: a file holding it; same for the three keys)"},
	{"ORCH_DATABASE_MAX_CONNS", "", "connections this process's pool may open; empty = what its roles need: api 21, worker ORCH_WORKER_CONCURRENCY + 37, scheduler 2 (all three by default: 110); refused below their minimum (api 5, worker and scheduler as above). Budget the sum over every process under Postgres's max_connections"},
	{"ORCH_MASTER_KEY", "", "required: Fernet key (URL-safe base64 of 32 bytes) encrypting engine keys at rest; `orchestrator keys generate` prints one"},
	{"ORCH_MASTER_KEY_PREVIOUS", "", "comma-separated previous master keys, decrypt-only, during a rotation"},
	{"ORCH_ADMIN_KEY", "", "required: the admin key checked against X-Admin-Key; at least 16 characters and not a placeholder (`orchestrator keys generate` prints one)"},
	{"ORCH_LISTEN_ADDR", ":8000", "API listen address"},
	{"ORCH_METRICS_ADDR", "127.0.0.1:9464", "Prometheus listener (never public by default); off disables it"},
	{"ORCH_AUTH_FAILURES_PER_S", "5", "failed authentications (missing or wrong key) a client may make per second, in bursts of 4x that, before it is answered 429 RATE_LIMITED with Retry-After (platform keys known valid are never held back, the admin key is); 0 = no limit"},
	{"ORCH_TRUSTED_PROXIES", "", "comma-separated addresses or CIDRs of reverse proxies whose X-Forwarded-For names the client (the rightmost address that is not one of them); empty = the connection's peer is the client"},
	{"ORCH_LOG_LEVEL", "info", "debug, info, warn or error"},
	{"ORCH_LOG_FORMAT", "json", "json (production) or text (a terminal)"},
	{"ORCH_NODE", "local", "name of the engine host this process provisions on / works for"},
	{"ORCH_ENGINE_IMAGE", "enginefleet/engine:dev", "default engine image (pin a version, not latest)"},
	{"ORCH_ENGINE_IMAGE_ALLOWLIST", "", "images products may ask for as engine_version: comma-separated repositories (any pinned tag) or exact references; empty = ORCH_ENGINE_IMAGE's repository; * = any (trusted products only)"},
	{"ORCH_ENGINE_BACKEND", "docker", "docker (one host), kubernetes (a cluster: ORCH_KUBE_*) or subprocess (development, no Docker)"},
	{"ORCH_ENGINE_BINARY", "", "subprocess backend: path of the engine binary"},
	{"ORCH_ENGINE_ENV_PASSTHROUGH", "", "comma-separated variable names copied from this process's environment into every engine"},
	{"ORCH_ENGINE_NETWORK", "engine_net", "Docker bridge engines join; created if missing with inter-container traffic off (engines cannot reach each other)"},
	{"ORCH_PORT_MIN", "9001", "first host port for engines (not used by the kubernetes backend)"},
	{"ORCH_PORT_MAX", "9999", "last host port for engines (not used by the kubernetes backend)"},
	{"ORCH_CATALOG_MOUNT_PATH", "", "host directory mounted read-only at /catalog in every engine"},
	{"ORCH_DATA_ROOT_PATH", ".data/engines", "where every brain lives, on the engine host: <path>/engines/<engine_id>/data (docker: each engine's volume is bound there; the path is the Docker host's, the orchestrator needs no access to it). Snapshot or tar it to back every brain up; relative paths are resolved against the working directory. Not used by the kubernetes backend (brains are claims)"},
	{"ORCH_ENGINE_URL_TEMPLATE", "http://127.0.0.1:{port}", "URL handed to products; {port}, {container}, {engine_id}, {node}, and on kubernetes {service} and {namespace} are replaced. Kubernetes default: " + kubeURLTemplate + " ({port} refused there: no host ports)"},
	{"ORCH_ENGINE_PROBE_URL_TEMPLATE", "http://127.0.0.1:{port}", "how workers reach an engine's /health: engines answer on the engine host's 127.0.0.1 only, so workers run in its network namespace. Kubernetes default: " + kubeURLTemplate},
	{"ORCH_ENGINE_MEMORY_MB", strconv.Itoa(docker.DefaultMemoryMB), "per-engine memory limit in MB, /tmp's tmpfs included; swap off (0 = none)"},
	{"ORCH_ENGINE_CPUS", strconv.FormatFloat(docker.DefaultCPUs, 'f', -1, 64), "per-engine CPU limit, in CPUs (0 = none)"},
	{"ORCH_ENGINE_PIDS", strconv.Itoa(docker.DefaultPids), "per-engine limit of processes and threads (0 = none)"},
	{"ORCH_ENGINE_USER", docker.DefaultUser, "numeric uid:gid engines run as, whatever the image says (never root); brain volumes are made theirs"},
	{"DOCKER_HOST", "", "Docker daemon address (default: the local socket)"},
	{"KUBECONFIG", "", "kubernetes backend: kubeconfig file of the cluster; empty = the pod's service account (in-cluster), else ~/.kube/config"},
	{"ORCH_KUBE_NAMESPACE", kubernetes.DefaultNamespace, "kubernetes backend: namespace of every engine object (must exist; the orchestrator's Role is granted there)"},
	{"ORCH_KUBE_STORAGE_CLASS", "", "kubernetes backend: storage class of brain claims; empty = the cluster's default class"},
	{"ORCH_KUBE_BRAIN_SIZE", kubernetes.DefaultBrainSize, "kubernetes backend: size each brain claim requests"},
	{"ORCH_KUBE_IMAGE_PULL_SECRETS", "", "kubernetes backend: comma-separated Secret names (in the namespace) for a private registry"},
	{"ORCH_KUBE_NODE_SELECTOR", "", "kubernetes backend: k=v,k2=v2 labels a node must have to run engines"},
	{"ORCH_KUBE_TOLERATIONS", "", "kubernetes backend: comma-separated taints engines tolerate: key=value:Effect, key:Effect or key"},
	{"ORCH_KUBE_CATALOG", "", "kubernetes backend: catalog mounted read-only at /catalog: pvc:<claim> or configmap:<name>"},
	{"ORCH_KUBE_ORCHESTRATOR_POD_LABELS", "app.kubernetes.io/name=enginefleet-orchestrator", "kubernetes backend: labels of the orchestrator's pods, which the engines' NetworkPolicy admits"},
	{"ORCH_KUBE_PRODUCT_POD_LABELS", "", "kubernetes backend: labels of the product pods the NetworkPolicy admits (with no namespace labels: pods of the engines' namespace); empty = none"},
	{"ORCH_KUBE_PRODUCT_NAMESPACE_LABELS", "", "kubernetes backend: labels of the namespaces whose pods (those matching ORCH_KUBE_PRODUCT_POD_LABELS, or all) the NetworkPolicy admits"},
	{"ORCH_HEALTH_CHECK_INTERVAL_S", "30", "health sweep period"},
	{"ORCH_HEALTH_CHECK_TIMEOUT_S", "10", "per-probe timeout"},
	{"ORCH_HEALTH_MAX_FAILURES", "3", "consecutive failures before failed"},
	{"ORCH_RESTART_BACKOFF_BASE_S", "5", "first auto-restart delay; doubles per attempt"},
	{"ORCH_RESTART_BACKOFF_MAX_S", "300", "auto-restart backoff cap"},
	{"ORCH_RESTART_MAX_ATTEMPTS", "8", "auto-restart attempts before giving up"},
	{"ORCH_BOOT_TIMEOUT_S", "60", "boot deadline for provision, start, restart"},
	{"ORCH_IDLE_AFTER_S", "1800", "idle time before an engine sleeps (0 = never)"},
	{"ORCH_SLEEP_MODE", "mark", "mark (container keeps running) or stop (scale to zero)"},
	{"ORCH_ENGINE_KEY_OVERLAP_S", "300", "after rotate-key, how long the previous engine key keeps working"},
	{"ORCH_BACKUP_DIR", ".data/backups", "where brain backups are written"},
	{"ORCH_BACKUP_CRON", "0 3 * * *", "nightly backup schedule (cron)"},
	{"ORCH_BACKUP_RETENTION_DAYS", "7", "backups older than this are pruned"},
	{"ORCH_AUDIT_EXPORT_DIR", ".data/audit-exports", "where audit exports are written"},
	{"ORCH_AUDIT_EXPORT_CRON", "30 0 * * *", "daily audit export schedule (cron)"},
	{"ORCH_AUDIT_RETENTION_DAYS", "0", "purge audit rows older than this once exported (0 = keep forever)"},
	{"ORCH_WORKER_CONCURRENCY", "50", "lifecycle jobs one worker process runs at once"},
	{"ORCH_SHUTDOWN_TIMEOUT_S", "55", "graceful drain budget on SIGTERM (fits docker stop --time 60)"},
	{"ORCH_WEBHOOK_ALLOW_NETWORKS", "", "comma-separated CIDRs or addresses webhook deliveries may reach although private, loopback or link-local (checked on the address dialed); empty = public addresses only"},
	{"ORCH_WEBHOOK_ALLOW_HTTP", "false", "true = endpoints may use plain http to any allowed host; false = https, except to a loopback host"},
	{"ORCH_WEBHOOK_CONCURRENCY", "20", "webhook deliveries one worker process attempts at once (their own queue)"},
	{"ORCH_WEBHOOK_PRODUCT_CONCURRENCY", "4", "one product's delivery attempts in flight per worker process: a product's slow endpoint holds no more"},
	{"ORCH_WEBHOOK_TIMEOUT_S", "10", "one delivery attempt's timeout"},
	{"ORCH_WEBHOOK_RETRY_FOR_S", "86400", "how long a delivery is retried (exponential backoff with jitter, 10 s doubling to 1 h) before it fails and its endpoint is marked failing"},
}

// loadConfig reads and validates the environment, reporting every problem
// at once. getenv is os.Getenv in production.
func loadConfig(getenv func(string) string) (Config, error) {
	defaults := map[string]string{}
	for _, v := range envVars {
		defaults[v.name] = v.def
	}
	var problems []string
	get := func(name string) string {
		if v, ok := lookup(getenv, name); ok {
			return v
		}
		return defaults[name]
	}
	bad := func(name, format string, args ...any) {
		problems = append(problems, name+": "+fmt.Sprintf(format, args...))
	}
	required := func(name string) string {
		v := get(name)
		if v == "" {
			bad(name, "is required")
		}
		return v
	}
	intv := func(name string, min, max int) int {
		s := get(name)
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil {
			bad(name, "must be an integer, got %q", s)
			return 0
		}
		if n < min || n > max {
			bad(name, "must be between %d and %d, got %d", min, max, n)
		}
		return n
	}
	secs := func(name string, min int) time.Duration {
		return time.Duration(intv(name, min, 1<<30)) * time.Second
	}
	var c Config
	c.DatabaseURL = required("ORCH_DATABASE_URL")
	if c.DatabaseURL != "" {
		if u, err := url.Parse(c.DatabaseURL); err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") || u.Host == "" {
			bad("ORCH_DATABASE_URL", "must look like postgresql://user:pass@host:port/db")
		}
	}
	c.MasterKey = required("ORCH_MASTER_KEY")
	c.MasterKeyPrev = splitList(get("ORCH_MASTER_KEY_PREVIOUS"))
	if c.MasterKey != "" {
		if _, err := keys.NewKeyring(c.MasterKey, c.MasterKeyPrev); err != nil {
			problems = append(problems, err.Error())
		}
	}
	c.AdminKey = required("ORCH_ADMIN_KEY")
	if c.AdminKey != "" && weakAdminKey(c.AdminKey) {
		// Refused like a placeholder master key: a guessable admin key
		// opens every product. Never echo it.
		bad("ORCH_ADMIN_KEY", "is a placeholder or shorter than 16 characters: anyone could guess it; `orchestrator keys generate` prints a strong one")
	}
	c.ListenAddr = get("ORCH_LISTEN_ADDR")
	c.MetricsAddr = get("ORCH_METRICS_ADDR")
	if strings.EqualFold(c.MetricsAddr, "off") {
		c.MetricsAddr = ""
	}
	c.LogLevel = strings.ToLower(get("ORCH_LOG_LEVEL"))
	if !oneOf(c.LogLevel, "debug", "info", "warn", "error") {
		bad("ORCH_LOG_LEVEL", "must be debug, info, warn or error")
	}
	c.LogFormat = strings.ToLower(get("ORCH_LOG_FORMAT"))
	if !oneOf(c.LogFormat, "json", "text") {
		bad("ORCH_LOG_FORMAT", "must be json or text")
	}
	c.Node = get("ORCH_NODE")
	if c.Node == "" {
		bad("ORCH_NODE", "must not be empty")
	}
	c.EngineImage = get("ORCH_ENGINE_IMAGE")
	if c.EngineImage == "" {
		bad("ORCH_ENGINE_IMAGE", "must not be empty")
	}
	if im, err := orch.ParseImages(c.EngineImage, get("ORCH_ENGINE_IMAGE_ALLOWLIST")); err != nil {
		bad("ORCH_ENGINE_IMAGE_ALLOWLIST", "%v", err)
	} else {
		c.Images = im
	}
	c.Backend = get("ORCH_ENGINE_BACKEND")
	if !oneOf(c.Backend, "docker", "kubernetes", "subprocess") {
		bad("ORCH_ENGINE_BACKEND", "must be docker, kubernetes or subprocess, got %q", c.Backend)
	}
	kube := c.Backend == "kubernetes"
	c.EngineBinary = get("ORCH_ENGINE_BINARY")
	if c.Backend == "subprocess" && c.EngineBinary == "" {
		bad("ORCH_ENGINE_BINARY", "is required with the subprocess backend")
	}
	c.EnvPassthrough = splitList(get("ORCH_ENGINE_ENV_PASSTHROUGH"))
	for _, n := range c.EnvPassthrough {
		// The orchestrator's own settings (its keys, the database URL)
		// must never reach an engine.
		if strings.HasPrefix(n, "ORCH_") || strings.HasPrefix(n, "DOCKER_") || !envName.MatchString(n) {
			bad("ORCH_ENGINE_ENV_PASSTHROUGH", "%q cannot be passed to engines (not a variable name, or the orchestrator's own)", n)
		}
	}
	c.Network = get("ORCH_ENGINE_NETWORK")
	c.PortMin = intv("ORCH_PORT_MIN", 1024, 65535)
	c.PortMax = intv("ORCH_PORT_MAX", 1024, 65535)
	if c.PortMin > c.PortMax {
		bad("ORCH_PORT_MIN", "(%d) must not exceed ORCH_PORT_MAX (%d)", c.PortMin, c.PortMax)
	}
	c.CatalogMountPath = get("ORCH_CATALOG_MOUNT_PATH")
	c.DataRootPath = get("ORCH_DATA_ROOT_PATH")
	switch {
	case c.DataRootPath == "":
		bad("ORCH_DATA_ROOT_PATH", "is required: brains live under it")
	case strings.Contains(c.DataRootPath, ":"):
		bad("ORCH_DATA_ROOT_PATH", "must not contain ':'")
	case !filepath.IsAbs(c.DataRootPath):
		// Relative to where the process runs: meaningful when that is the
		// Docker host (make run); production sets an absolute path.
		if abs, err := filepath.Abs(c.DataRootPath); err == nil {
			c.DataRootPath = abs
		}
	}
	c.URLTemplate = get("ORCH_ENGINE_URL_TEMPLATE")
	c.ProbeURLTemplate = get("ORCH_ENGINE_PROBE_URL_TEMPLATE")
	for _, name := range []string{"ORCH_ENGINE_URL_TEMPLATE", "ORCH_ENGINE_PROBE_URL_TEMPLATE"} {
		tmpl := &c.URLTemplate
		if name == "ORCH_ENGINE_PROBE_URL_TEMPLATE" {
			tmpl = &c.ProbeURLTemplate
		}
		if _, set := lookup(getenv, name); kube && !set {
			*tmpl = kubeURLTemplate
		}
		switch {
		case !strings.Contains(*tmpl, "{"):
			bad(name, "must contain {port}, {container}, {service} or {engine_id}")
		case kube && strings.Contains(*tmpl, "{port}"):
			bad(name, "{port} has no value on the kubernetes backend (no host ports): use {service} and {namespace}")
		case !kube && strings.Contains(*tmpl, "{namespace}"):
			bad(name, "{namespace} has a value only on the kubernetes backend")
		}
	}
	c.MemoryMB = int64(intv("ORCH_ENGINE_MEMORY_MB", 0, 1<<20))
	if s := get("ORCH_ENGINE_CPUS"); s != "" {
		f, err := strconv.ParseFloat(s, 64)
		if err != nil || f < 0 {
			bad("ORCH_ENGINE_CPUS", "must be a non-negative number, got %q", s)
		}
		c.CPUs = f
	}
	c.Pids = int64(intv("ORCH_ENGINE_PIDS", 0, 1<<22))
	c.EngineUser = get("ORCH_ENGINE_USER")
	if _, _, err := docker.ParseUser(c.EngineUser); err != nil {
		bad("ORCH_ENGINE_USER", "%v", err)
	}
	c.DockerHost = get("DOCKER_HOST")
	if kube {
		c.Kube = kubeConfig(get, bad)
		c.Kube.Node = c.Node
		if c.CatalogMountPath != "" {
			bad("ORCH_CATALOG_MOUNT_PATH", "is a host directory, which the kubernetes backend cannot mount: use ORCH_KUBE_CATALOG")
		}
		if c.EngineUser != docker.DefaultUser {
			bad("ORCH_ENGINE_USER", "the kubernetes backend runs engines as %s (the restricted Pod Security profile's non-root user); other users are not supported", docker.DefaultUser)
		}
		if c.Pids != docker.DefaultPids && c.Pids != 0 {
			c.Warnings = append(c.Warnings, "ORCH_ENGINE_PIDS is ignored on kubernetes: the kubelet's podPidsLimit bounds a pod's processes")
		}
	}

	c.HealthInterval = secs("ORCH_HEALTH_CHECK_INTERVAL_S", 1)
	c.HealthTimeout = secs("ORCH_HEALTH_CHECK_TIMEOUT_S", 1)
	c.HealthMaxFailures = intv("ORCH_HEALTH_MAX_FAILURES", 1, 1000)
	c.RestartBackoffBase = secs("ORCH_RESTART_BACKOFF_BASE_S", 0)
	c.RestartBackoffMax = secs("ORCH_RESTART_BACKOFF_MAX_S", 0)
	c.RestartMaxAttempts = intv("ORCH_RESTART_MAX_ATTEMPTS", 0, 1000)
	c.BootTimeout = secs("ORCH_BOOT_TIMEOUT_S", 1)
	c.IdleAfter = secs("ORCH_IDLE_AFTER_S", 0)
	c.SleepMode = get("ORCH_SLEEP_MODE")
	if !oneOf(c.SleepMode, "mark", "stop") {
		bad("ORCH_SLEEP_MODE", "must be mark or stop, got %q", c.SleepMode)
	}
	c.KeyOverlap = secs("ORCH_ENGINE_KEY_OVERLAP_S", 0)

	c.BackupDir = get("ORCH_BACKUP_DIR")
	c.BackupCron = get("ORCH_BACKUP_CRON")
	c.BackupRetentionDays = intv("ORCH_BACKUP_RETENTION_DAYS", 1, 36500)
	c.AuditExportDir = get("ORCH_AUDIT_EXPORT_DIR")
	c.AuditExportCron = get("ORCH_AUDIT_EXPORT_CRON")
	c.AuditRetentionDays = intv("ORCH_AUDIT_RETENTION_DAYS", 0, 36500)
	for _, name := range []string{"ORCH_BACKUP_CRON", "ORCH_AUDIT_EXPORT_CRON"} {
		if err := validCron(get(name)); err != nil {
			bad(name, "invalid cron expression %q: %v", get(name), err)
		}
	}
	c.WorkerConcurrency = intv("ORCH_WORKER_CONCURRENCY", 1, 10000)
	c.ShutdownTimeout = secs("ORCH_SHUTDOWN_TIMEOUT_S", 1)
	if get("ORCH_DATABASE_MAX_CONNS") != "" {
		c.DatabaseMaxConns = intv("ORCH_DATABASE_MAX_CONNS", 1, 100000)
	}
	c.AuthFailuresPerSecond = intv("ORCH_AUTH_FAILURES_PER_S", 0, 1000000)
	for _, p := range splitList(get("ORCH_TRUSTED_PROXIES")) {
		pfx, err := parsePrefix(p)
		if err != nil {
			bad("ORCH_TRUSTED_PROXIES", "%q is neither an address nor a CIDR", p)
			continue
		}
		c.TrustedProxies = append(c.TrustedProxies, pfx)
	}

	for _, p := range splitList(get("ORCH_WEBHOOK_ALLOW_NETWORKS")) {
		pfx, err := parsePrefix(p)
		if err != nil {
			bad("ORCH_WEBHOOK_ALLOW_NETWORKS", "%q is neither an address nor a CIDR", p)
			continue
		}
		c.WebhookAllowNetworks = append(c.WebhookAllowNetworks, pfx)
	}
	switch get("ORCH_WEBHOOK_ALLOW_HTTP") {
	case "true":
		c.WebhookAllowHTTP = true
	case "false", "":
	default:
		bad("ORCH_WEBHOOK_ALLOW_HTTP", "must be true or false")
	}
	c.WebhookConcurrency = intv("ORCH_WEBHOOK_CONCURRENCY", 1, 1000)
	c.WebhookProductConcurrency = intv("ORCH_WEBHOOK_PRODUCT_CONCURRENCY", 1, 1000)
	c.WebhookTimeout = secs("ORCH_WEBHOOK_TIMEOUT_S", 1)
	c.WebhookRetryFor = secs("ORCH_WEBHOOK_RETRY_FOR_S", 1)

	if len(problems) > 0 {
		sort.Strings(problems)
		return c, fmt.Errorf("invalid configuration (%d problems):\n  - %s", len(problems), strings.Join(problems, "\n  - "))
	}
	return c, nil
}

// weakAdminKey: shorter than 16 characters, or a placeholder left from
// an example (deploy/secrets.example holds "replace-me").
func weakAdminKey(k string) bool {
	if len(k) < 16 {
		return true
	}
	l := strings.ToLower(k)
	for _, p := range []string{"replace-me", "replace_me", "replaceme", "change-me", "change_me", "changeme", "placeholder"} {
		if strings.Contains(l, p) {
			return true
		}
	}
	return false
}

// parsePrefix reads a CIDR, or an address as its own /32 or /128.
func parsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		return p.Masked(), err
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// secretVars may also be given as a file: NAME_FILE=/run/secrets/name
// (Docker and Kubernetes secrets), so secrets never sit in an env listing.
var secretVars = map[string]bool{"ORCH_DATABASE_URL": true, "ORCH_MASTER_KEY": true,
	"ORCH_MASTER_KEY_PREVIOUS": true, "ORCH_ADMIN_KEY": true}

// readFile is os.ReadFile; tests replace it.
var readFile = os.ReadFile

func lookup(getenv func(string) string, name string) (string, bool) {
	v := getenv(name)
	if v == "" && secretVars[name] {
		if path := getenv(name + "_FILE"); path != "" {
			b, err := readFile(path)
			if err != nil {
				return "", false // reported as missing: "is required"
			}
			v = strings.TrimSpace(string(b))
		}
	}
	if v == "" {
		return "", false
	}
	return v, true
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func oneOf(s string, options ...string) bool {
	for _, o := range options {
		if s == o {
			return true
		}
	}
	return false
}

func validCron(expr string) error {
	s, err := gocron.NewScheduler()
	if err != nil {
		return err
	}
	defer s.Shutdown() //nolint:errcheck
	_, err = s.NewJob(gocron.CronJob(expr, false), gocron.NewTask(func() {}))
	return err
}

// passthroughEnv copies the named variables from the process environment.
func passthroughEnv(names []string) map[string]string {
	out := map[string]string{}
	for _, n := range names {
		if v, ok := os.LookupEnv(n); ok {
			out[n] = v
		}
	}
	return out
}
