// Package kubeenv runs a real Kubernetes control plane for tests: etcd,
// kube-apiserver, kube-scheduler, kube-controller-manager and kwok (fake
// nodes), built from the Go module proxy by scripts/kube.sh and cached
// between runs.
//
// A test package shares one control plane per process (startup takes about
// 15 s and 600 MB):
//
//	func TestMain(m *testing.M) { os.Exit(kubeenv.Run(m)) }
//
//	func TestX(t *testing.T) {
//		env := kubeenv.Require(t)  // started on first use
//		ns := env.Namespace(t)     // a namespace of the test's own
//		...
//	}
//
// Every process listens on a free loopback port with certificates made
// here; state lives in a temporary directory removed by Close (and, if a
// run was killed, by the next run, which also kills its leftover
// processes). The API server runs with RBAC, the default admission plugins
// (ResourceQuota, PodSecurity, ServiceAccount, ...) and a service-account
// token signer, so quotas, forbidden requests and restricted service
// accounts behave as on a real cluster.
//
// Nodes: kwok manages FakeNodes (kwok-node-0..N-1, tainted
// kwok.x-k8s.io/node=fake:NoSchedule): their pods become Running and Ready
// without running anything. The test node agent (see Agent) is a fake
// kubelet for one more node that really runs the engine binary.
//
// Storage: the StorageClass StorageClass (WaitForFirstConsumer) is served by
// a small provisioner in this package: once the scheduler has picked a node
// for a pod's claim, it creates a hostPath PersistentVolume (a directory
// under the environment's temporary directory) pinned to that node and
// pre-bound to the claim; the controller-manager's PV controller does the
// binding, as with any external provisioner. Released volumes are deleted
// with their directory.
package kubeenv

import (
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// Names of what the environment sets up.
const (
	// StorageClass is served by the environment's provisioner.
	StorageClass = "kubeenv-hostpath"
	// Provisioner is StorageClass's provisioner name.
	Provisioner = "kubeenv.enginefleet.test/hostpath"
	// KwokTaintKey taints the kwok nodes (value "fake", NoSchedule).
	KwokTaintKey = "kwok.x-k8s.io/node"
	// LabelNodeKind is "kwok" on kwok nodes and "agent" on the agent's.
	LabelNodeKind = "kubeenv.enginefleet.test/node-kind"
	// FakeNodes is how many kwok nodes the environment has.
	FakeNodes = 3
)

//go:embed kwok-stages.yaml
var kwokStages []byte

// Env is a running control plane.
type Env struct {
	// Config is an admin (system:masters) client configuration.
	Config *rest.Config
	// Client is a clientset for Config.
	Client kubernetes.Interface
	// Kubeconfig is the path of an admin kubeconfig file.
	Kubeconfig string
	// Dir is the environment's temporary directory (removed by Close).
	Dir string
	// BinDir holds the control plane binaries.
	BinDir string
	// Nodes are the kwok nodes' names.
	Nodes []string

	ctx    context.Context
	cancel context.CancelFunc
	procs  []*proc
	wg     sync.WaitGroup

	agentMu sync.Mutex
	agent   *Agent
}

// Options tune Start.
type Options struct {
	// BinDir holds etcd, kube-apiserver, kube-scheduler,
	// kube-controller-manager and kwok; "" asks scripts/kube.sh (building
	// the binaries when they are missing).
	BinDir string
	// Logf receives progress lines; nil discards them.
	Logf func(format string, args ...any)
}

// Start builds (when needed) and starts a control plane. Close it.
func Start(ctx context.Context, opts Options) (*Env, error) {
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	began := time.Now()
	bin := opts.BinDir
	if bin == "" {
		var err error
		if bin, err = EnsureBinaries(ctx, logf); err != nil {
			return nil, err
		}
	}
	root := filepath.Join(os.TempDir(), "enginefleet-kubeenv")
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, err
	}
	reapStale(root, logf)
	dir, err := os.MkdirTemp(root, "run-")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "owner"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return nil, err
	}
	ectx, cancel := context.WithCancel(context.Background())
	e := &Env{Dir: dir, BinDir: bin, ctx: ectx, cancel: cancel}
	if err := e.start(ctx, logf); err != nil {
		e.Close()
		return nil, err
	}
	logf("kubeenv: control plane up in %s (%s)", time.Since(began).Round(100*time.Millisecond), dir)
	return e, nil
}

func (e *Env) start(ctx context.Context, logf func(string, ...any)) error {
	p, err := newPKI(filepath.Join(e.Dir, "pki"))
	if err != nil {
		return fmt.Errorf("certificates: %w", err)
	}
	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	etcdClient, etcdPeer, apiPort := ports[0], ports[1], ports[2]

	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", etcdClient)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", etcdPeer)
	if _, err := e.spawn("etcd", "etcd",
		"--name=kubeenv",
		"--data-dir="+filepath.Join(e.Dir, "etcd"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=kubeenv="+peerURL,
		"--unsafe-no-fsync", "--log-level=warn",
	); err != nil {
		return err
	}
	if err := e.waitHTTP(ctx, "etcd", etcdURL+"/health"); err != nil {
		return err
	}

	if _, err := e.spawn("kube-apiserver", "kube-apiserver",
		"--etcd-servers="+etcdURL,
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(apiPort),
		"--cert-dir="+filepath.Join(e.Dir, "apiserver"),
		"--tls-cert-file="+p.ServingCert, "--tls-private-key-file="+p.ServingKey,
		"--client-ca-file="+p.CACert,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+p.SAPub,
		"--service-account-signing-key-file="+p.SAKey,
		"--authorization-mode=RBAC",
		"--service-cluster-ip-range=10.96.0.0/16",
		"--endpoint-reconciler-type=none",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
		"--allow-privileged=false",
		// New nodes would be tainted not-ready until the node lifecycle
		// controller (not run: kwok and the agent register nodes Ready and
		// nothing here watches heartbeats) lifts it.
		"--disable-admission-plugins=TaintNodesByCondition",
	); err != nil {
		return err
	}
	host := fmt.Sprintf("https://127.0.0.1:%d", apiPort)
	e.Config = &rest.Config{
		Host: host,
		TLSClientConfig: rest.TLSClientConfig{
			CAData: p.caPEM, CertData: p.adminCertPEM, KeyData: p.adminKeyPEM,
		},
		QPS: 200, Burst: 400,
	}
	if e.Client, err = kubernetes.NewForConfig(e.Config); err != nil {
		return err
	}
	if err := e.waitReady(ctx); err != nil {
		return err
	}
	e.Kubeconfig = filepath.Join(e.Dir, "admin.kubeconfig")
	if err := writeKubeconfig(e.Kubeconfig, host, p); err != nil {
		return err
	}

	controllers := strings.Join([]string{
		"serviceaccount-controller", "namespace-controller", "garbage-collector-controller",
		"resourcequota-controller", "persistentvolume-binder-controller",
		"persistentvolumeclaim-protection-controller", "persistentvolume-protection-controller",
		"pod-garbage-collector-controller", "root-ca-certificate-publisher-controller",
	}, ",")
	if _, err := e.spawn("kube-controller-manager", "kube-controller-manager",
		"--kubeconfig="+e.Kubeconfig,
		"--secure-port=0", "--leader-elect=false",
		"--service-account-private-key-file="+p.SAKey,
		"--root-ca-file="+p.CACert,
		"--controllers="+controllers,
		"--pvclaimbinder-sync-period=2s",
	); err != nil {
		return err
	}
	if _, err := e.spawn("kube-scheduler", "kube-scheduler",
		"--kubeconfig="+e.Kubeconfig, "--secure-port=0", "--leader-elect=false",
	); err != nil {
		return err
	}

	stages := filepath.Join(e.Dir, "kwok-stages.yaml")
	if err := os.WriteFile(stages, kwokStages, 0o644); err != nil {
		return err
	}
	if _, err := e.spawn("kwok", "kwok",
		"--kubeconfig="+e.Kubeconfig, "--config="+stages,
		"--manage-all-nodes=false",
		"--manage-nodes-with-annotation-selector="+KwokTaintKey+"=fake",
		// Fictitious addresses, never dialled; no kubelet server
		// (--server-address and --node-port unset).
		"--cidr=10.244.0.1/16", "--node-ip=10.0.0.1",
	); err != nil {
		return err
	}

	if err := e.setupCluster(ctx); err != nil {
		return err
	}
	e.wg.Go(func() { e.runProvisioner(logf) })
	return e.waitNodesReady(ctx)
}

// setupCluster creates the storage class and the kwok nodes.
func (e *Env) setupCluster(ctx context.Context) error {
	mode := storagev1.VolumeBindingWaitForFirstConsumer
	reclaim := corev1.PersistentVolumeReclaimDelete
	if _, err := e.Client.StorageV1().StorageClasses().Create(ctx, &storagev1.StorageClass{
		ObjectMeta:        metav1.ObjectMeta{Name: StorageClass},
		Provisioner:       Provisioner,
		VolumeBindingMode: &mode,
		ReclaimPolicy:     &reclaim,
	}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create storage class: %w", err)
	}
	for i := range FakeNodes {
		name := fmt.Sprintf("kwok-node-%d", i)
		e.Nodes = append(e.Nodes, name)
		node := &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{
				Name:        name,
				Annotations: map[string]string{KwokTaintKey: "fake", "node.alpha.kubernetes.io/ttl": "0"},
				Labels: map[string]string{
					"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
					"kubernetes.io/arch": "amd64", "type": "kwok", LabelNodeKind: "kwok",
				},
			},
			Spec: corev1.NodeSpec{Taints: []corev1.Taint{{Key: KwokTaintKey, Value: "fake", Effect: corev1.TaintEffectNoSchedule}}},
			Status: corev1.NodeStatus{
				Allocatable: corev1.ResourceList{
					corev1.ResourceCPU: resource.MustParse("8"), corev1.ResourceMemory: resource.MustParse("32Gi"),
					corev1.ResourcePods: resource.MustParse("110"),
				},
				Capacity: corev1.ResourceList{
					corev1.ResourceCPU: resource.MustParse("8"), corev1.ResourceMemory: resource.MustParse("32Gi"),
					corev1.ResourcePods: resource.MustParse("110"),
				},
			},
		}
		if _, err := e.Client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create node %s: %w", name, err)
		}
	}
	return nil
}

func (e *Env) waitNodesReady(ctx context.Context) error {
	return e.poll(ctx, time.Minute, "kwok nodes Ready", func() (bool, error) {
		for _, n := range e.Nodes {
			node, err := e.Client.CoreV1().Nodes().Get(ctx, n, metav1.GetOptions{})
			if err != nil || !nodeReady(node) {
				return false, nil
			}
		}
		return true, nil
	})
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// waitReady waits for the API server's /readyz and the default namespace.
func (e *Env) waitReady(ctx context.Context) error {
	return e.poll(ctx, 90*time.Second, "kube-apiserver ready", func() (bool, error) {
		if _, err := e.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx); err != nil {
			return false, nil
		}
		_, err := e.Client.CoreV1().Namespaces().Get(ctx, "default", metav1.GetOptions{})
		return err == nil, nil
	})
}

// poll calls f until it says done, fails, timeout passes, ctx ends or a
// control plane process dies.
func (e *Env) poll(ctx context.Context, timeout time.Duration, what string, f func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		done, err := f()
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		if done {
			return nil
		}
		if p := e.deadProc(); p != nil {
			return fmt.Errorf("%s: %s exited: %v\n%s", what, p.name, p.err, p.tail())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not after %s", what, timeout)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", what, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (e *Env) waitHTTP(ctx context.Context, what, url string) error {
	c := &http.Client{Timeout: 2 * time.Second}
	return e.poll(ctx, time.Minute, what+" ready", func() (bool, error) {
		resp, err := c.Get(url)
		if err != nil {
			return false, nil
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	})
}

// Close stops every process (agent engines included) and removes Dir.
func (e *Env) Close() {
	e.agentMu.Lock()
	if e.agent != nil {
		e.agent.stop()
	}
	e.agentMu.Unlock()
	e.cancel()
	e.wg.Wait()
	// Reverse order: clients before the API server, etcd last.
	for i := len(e.procs) - 1; i >= 0; i-- {
		e.procs[i].stop(5 * time.Second)
	}
	if e.Dir != "" {
		os.RemoveAll(e.Dir)
	}
}

// Namespace creates a namespace for t (deleted when t ends) in which the
// restricted Pod Security Standard is enforced, and waits for its default
// service account (pods cannot be created before it exists).
func (e *Env) Namespace(t testingT) string {
	t.Helper()
	ctx := context.Background()
	ns, err := e.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{
			GenerateName: "t-",
			Labels: map[string]string{
				"pod-security.kubernetes.io/enforce": "restricted",
				"kubeenv.enginefleet.test/test":      sanitizeLabel(t.Name()),
			},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create namespace: %v", err)
	}
	t.Cleanup(func() {
		_ = e.Client.CoreV1().Namespaces().Delete(context.Background(), ns.Name, metav1.DeleteOptions{})
	})
	err = e.poll(ctx, 30*time.Second, "default service account of "+ns.Name, func() (bool, error) {
		_, err := e.Client.CoreV1().ServiceAccounts(ns.Name).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, nil
	})
	if err != nil {
		t.Fatalf("%v", err)
	}
	return ns.Name
}

// testingT is the part of testing.TB Namespace needs.
type testingT interface {
	Helper()
	Name() string
	Fatalf(format string, args ...any)
	Cleanup(func())
}

func sanitizeLabel(s string) string {
	b := []byte(s)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
			b[i] = '_'
		}
	}
	s = strings.Trim(string(b), "-._")
	if len(s) > 63 {
		s = strings.TrimRight(s[:63], "-._")
	}
	return s
}

func writeKubeconfig(path, host string, p *pki) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["kubeenv"] = &clientcmdapi.Cluster{Server: host, CertificateAuthorityData: p.caPEM}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{ClientCertificateData: p.adminCertPEM, ClientKeyData: p.adminKeyPEM}
	cfg.Contexts["kubeenv"] = &clientcmdapi.Context{Cluster: "kubeenv", AuthInfo: "admin"}
	cfg.CurrentContext = "kubeenv"
	return clientcmd.WriteToFile(*cfg, path)
}

// freePorts returns n loopback ports the kernel says are free now.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var out []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("free port: %w", err)
		}
		ls = append(ls, l)
		out = append(out, l.Addr().(*net.TCPAddr).Port)
	}
	return out, nil
}

// proc is a process of the environment.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error // valid after done
}

// spawn starts binary (from BinDir when not absolute) with args, output to
// Dir/logs/name.log. The process dies with this one (Pdeathsig) and its pid
// is recorded for reapStale.
func (e *Env) spawn(name, binary string, args ...string) (*proc, error) {
	path := binary
	if !filepath.IsAbs(path) {
		path = filepath.Join(e.BinDir, binary)
	}
	p, err := startProc(e.Dir, name, path, args, nil, "")
	if err != nil {
		return nil, err
	}
	e.procs = append(e.procs, p)
	return p, nil
}

func startProc(dir, name, path string, args, env []string, workDir string) (*proc, error) {
	logs := filepath.Join(dir, "logs")
	if err := os.MkdirAll(logs, 0o755); err != nil {
		return nil, err
	}
	logPath := filepath.Join(logs, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(path, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = env
	cmd.Dir = workDir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := spawnOnLockedThread(cmd); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	recordPid(dir, cmd.Process.Pid)
	p := &proc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	return p, nil
}

// stop sends SIGTERM to the process group, then SIGKILL after grace.
func (p *proc) stop(grace time.Duration) {
	select {
	case <-p.done:
		return
	default:
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.done:
		return
	case <-time.After(grace):
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// tail is the end of the process's log.
func (p *proc) tail() string {
	b, _ := os.ReadFile(p.log)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

func (e *Env) deadProc() *proc {
	for _, p := range e.procs {
		if p.exited() {
			return p
		}
	}
	return nil
}

// Pdeathsig fires when the thread that started the child exits, not the
// process (golang/go#27505), so every child is started from one goroutine
// locked to its thread for the life of the process.
var (
	spawnOnce sync.Once
	spawnReq  chan spawnCall
)

type spawnCall struct {
	cmd  *exec.Cmd
	done chan error
}

func spawnOnLockedThread(cmd *exec.Cmd) error {
	spawnOnce.Do(func() {
		spawnReq = make(chan spawnCall)
		go func() {
			runtime.LockOSThread() // never unlocked: the thread lives as long as the process
			for c := range spawnReq {
				c.done <- c.cmd.Start()
			}
		}()
	})
	done := make(chan error, 1)
	spawnReq <- spawnCall{cmd, done}
	return <-done
}

var pidMu sync.Mutex

func recordPid(dir string, pid int) {
	pidMu.Lock()
	defer pidMu.Unlock()
	f, err := os.OpenFile(filepath.Join(dir, "pids"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return
	}
	fmt.Fprintln(f, pid)
	f.Close()
}

// reapStale removes the directories of environments whose test process is
// gone, killing what is left of their processes (Pdeathsig normally did).
func reapStale(root string, logf func(string, ...any)) {
	entries, err := os.ReadDir(root)
	if err != nil {
		return
	}
	for _, ent := range entries {
		dir := filepath.Join(root, ent.Name())
		owner, err := os.ReadFile(filepath.Join(dir, "owner"))
		if err != nil {
			if info, err := ent.Info(); err == nil && time.Since(info.ModTime()) > time.Hour {
				os.RemoveAll(dir)
			}
			continue
		}
		pid, _ := strconv.Atoi(strings.TrimSpace(string(owner)))
		if pid > 0 && (syscall.Kill(pid, 0) == nil || errors.Is(syscall.Kill(pid, 0), syscall.EPERM)) {
			continue // its test process is still running
		}
		pids, _ := os.ReadFile(filepath.Join(dir, "pids"))
		for _, line := range strings.Fields(string(pids)) {
			p, _ := strconv.Atoi(line)
			if p <= 0 {
				continue
			}
			// Only a process started for that directory (pids are reused).
			// (engines of the agent carry the directory in their environment).
			cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p))
			environ, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", p))
			if bytes.Contains(cmdline, []byte(dir)) || bytes.Contains(environ, []byte(dir)) {
				_ = syscall.Kill(p, syscall.SIGKILL)
			}
		}
		logf("kubeenv: removing %s left by an earlier run", dir)
		os.RemoveAll(dir)
	}
}

// RSS is the resident memory of the control plane's processes (not the
// agent's engines), in bytes.
func (e *Env) RSS() int64 {
	var total int64
	for _, p := range e.procs {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
				kb, _ := strconv.ParseInt(f[1], 10, 64)
				total += kb << 10
			}
		}
	}
	return total
}
