package kubernetes

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/informers"
	clientset "k8s.io/client-go/kubernetes"
	listerscorev1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"

	orchestrator "github.com/enginefleet/orchestrator"
)

// Labels and annotations this backend adds next to the orchestrator's own.
const (
	// LabelRole is "engine" on engine pods (what Services and
	// NetworkPolicies select) and "record" on engine Secrets.
	LabelRole = "orchestrator.role"
	// AnnotationSpecHash is a hash of everything Ensure put into the
	// engine: a pod whose hash differs from the wanted spec is replaced.
	AnnotationSpecHash = "orchestrator.spec_hash"
	// AnnotationImage, AnnotationHostPort: the spec's image and port.
	AnnotationImage    = "orchestrator.image"
	AnnotationHostPort = "orchestrator.host_port"
	// AnnotationState on the Secret is "created" (never started since
	// Ensure made or replaced it), "started" or "stopped".
	AnnotationState = "orchestrator.state"
	// AnnotationExitCode on the Secret is the last exit code Stop saw.
	AnnotationExitCode = "orchestrator.exit_code"
)

// Roles (LabelRole).
const (
	RoleEngine = "engine"
	RoleRecord = "record"
)

// Paths and ports of the engine contract.
const (
	DataDir        = "/data"
	CatalogDir     = "/catalog"
	EnginePort     = 8000
	EngineUID      = 65532
	ContainerName  = "engine"
	stopGraceLimit = 30 // seconds a pod gets on SIGTERM when deleted without a grace
)

// Defaults applied by New.
const (
	DefaultNamespace    = "enginefleet"
	DefaultNode         = "local"
	DefaultBrainSize    = "1Gi"
	DefaultTmpSize      = "64Mi"
	DefaultReplaceGrace = 10 * time.Second
	DefaultStartTimeout = 2 * time.Minute
	DefaultRequestCPU   = "50m"
	DefaultRequestMem   = "64Mi"
)

// Errors in the chain of this backend's errors.
var (
	// ErrNotSupported: the operation has no Kubernetes equivalent
	// (Pause, Unpause, CopyDataOut, CopyDataIn).
	ErrNotSupported = errors.New("not supported by the kubernetes backend")
	// ErrNotFound: the engine has no record (Start of an engine never
	// ensured).
	ErrNotFound = errors.New("not found")
	// ErrUnreachable: the API server did not answer.
	ErrUnreachable = errors.New("kubernetes API server unreachable")
	// ErrForbidden: the API server refused the orchestrator's credentials
	// (RBAC, or not authenticated).
	ErrForbidden = errors.New("forbidden by the kubernetes API server")
	// ErrQuotaExceeded: a ResourceQuota of the namespace refused an object.
	ErrQuotaExceeded = errors.New("namespace resource quota exceeded")
	// ErrVolumeNotBound: the brain's claim stayed pending.
	ErrVolumeNotBound = errors.New("brain volume claim not bound")
)

// Toleration is a pod toleration (the fields of Kubernetes' own).
type Toleration struct {
	Key      string
	Operator string // "Equal" (default) or "Exists"
	Value    string
	Effect   string // "", NoSchedule, PreferNoSchedule or NoExecute
	Seconds  *int64 // NoExecute only
}

// Peer is one source allowed to reach engines: pods matching PodLabels in
// namespaces matching NamespaceLabels. A nil NamespaceLabels means the
// engines' own namespace; an empty (non-nil) one every namespace.
type Peer struct {
	NamespaceLabels map[string]string
	PodLabels       map[string]string
}

// Catalog sources (Config.CatalogKind).
const (
	CatalogNone      = ""
	CatalogPVC       = "pvc"
	CatalogConfigMap = "configmap"
)

// Config configures the Kubernetes backend; zero values take the defaults
// listed per field.
type Config struct {
	// RESTConfig is the API server to use; nil loads Kubeconfig, or the
	// in-cluster configuration when that is "" too (KUBECONFIG and
	// ~/.kube/config are tried outside a cluster).
	RESTConfig *rest.Config
	Kubeconfig string
	// Namespace holds every engine object; default "enginefleet". It must
	// exist.
	Namespace string
	// Node is the orchestrator node these engines belong to (the
	// orchestrator.node label; List and Events see only it); default
	// "local". The cluster decides which Kubernetes node runs a pod.
	Node string
	// Fleet is the id of the fleet (one per database) whose engines these
	// are: every object carries it as orchestrator.fleet and List sees only
	// it, so two deployments sharing a namespace and a node name never
	// take each other's engines for orphans. "" labels nothing (tests).
	Fleet string
	// StorageClass of brain claims; "" takes the cluster's default class.
	StorageClass string
	// BrainSize is the brain claim's requested size; default 1Gi.
	BrainSize string
	// TmpSize limits the memory-backed /tmp; default 64Mi.
	TmpSize string
	// ImagePullSecrets are Secret names in Namespace for private registries.
	ImagePullSecrets []string
	// NodeSelector and Tolerations place engine pods.
	NodeSelector map[string]string
	Tolerations  []Toleration
	// MemoryMB and CPUs are each engine's limits when > 0 (requests equal
	// the memory limit; the CPU request is RequestCPU). Without limits the
	// requests are RequestCPU and RequestMemory (defaults 50m, 64Mi).
	MemoryMB      int64
	CPUs          float64
	RequestCPU    string
	RequestMemory string
	// CatalogKind ("", "pvc" or "configmap") and CatalogName mount a
	// read-only catalog at /catalog.
	CatalogKind string
	CatalogName string
	// Orchestrator selects the orchestrator's pods, which may reach every
	// engine; default pods labelled app.kubernetes.io/name=enginefleet-orchestrator
	// in Namespace. Products are the product side's peers (none by
	// default).
	Orchestrator Peer
	Products     []Peer
	// ReplaceGrace is how long Ensure lets a pod it replaces shut down on
	// SIGTERM; default 10s.
	ReplaceGrace time.Duration
	// StartTimeout bounds how long Start waits for the pod to be scheduled
	// (its claim bound) and its container to run; default 2m.
	StartTimeout time.Duration
	// Labels are extra labels put on every object (tests mark theirs).
	// They cannot override the orchestrator's own.
	Labels map[string]string
}

func (c Config) withDefaults() Config {
	if c.Namespace == "" {
		c.Namespace = DefaultNamespace
	}
	if c.Node == "" {
		c.Node = DefaultNode
	}
	if c.BrainSize == "" {
		c.BrainSize = DefaultBrainSize
	}
	if c.TmpSize == "" {
		c.TmpSize = DefaultTmpSize
	}
	if c.RequestCPU == "" {
		c.RequestCPU = DefaultRequestCPU
	}
	if c.RequestMemory == "" {
		c.RequestMemory = DefaultRequestMem
	}
	if c.ReplaceGrace <= 0 {
		c.ReplaceGrace = DefaultReplaceGrace
	}
	if c.StartTimeout <= 0 {
		c.StartTimeout = DefaultStartTimeout
	}
	if c.Orchestrator.PodLabels == nil && c.Orchestrator.NamespaceLabels == nil {
		c.Orchestrator.PodLabels = map[string]string{"app.kubernetes.io/name": "enginefleet-orchestrator"}
	}
	return c
}

func (c Config) validate() error {
	var problems []string
	if errs := validation.IsDNS1123Label(c.Namespace); len(errs) > 0 {
		problems = append(problems, "namespace: "+strings.Join(errs, ", "))
	}
	if errs := validation.IsValidLabelValue(c.Node); len(errs) > 0 {
		problems = append(problems, "node is not a valid label value")
	}
	if errs := validation.IsValidLabelValue(c.Fleet); len(errs) > 0 {
		problems = append(problems, "fleet is not a valid label value")
	}
	for name, q := range map[string]string{"brain size": c.BrainSize, "tmp size": c.TmpSize, "cpu request": c.RequestCPU, "memory request": c.RequestMemory} {
		if _, err := resource.ParseQuantity(q); err != nil {
			problems = append(problems, fmt.Sprintf("%s %q is not a quantity", name, q))
		}
	}
	if c.MemoryMB < 0 {
		problems = append(problems, "memory limit is negative")
	}
	if c.CPUs < 0 {
		problems = append(problems, "cpu limit is negative")
	}
	switch c.CatalogKind {
	case CatalogNone:
		if c.CatalogName != "" {
			problems = append(problems, "catalog name without a catalog kind (pvc or configmap)")
		}
	case CatalogPVC, CatalogConfigMap:
		if c.CatalogName == "" {
			problems = append(problems, "catalog kind without a catalog name")
		}
	default:
		problems = append(problems, fmt.Sprintf("catalog kind %q is not pvc or configmap", c.CatalogKind))
	}
	peers := append([]Peer{c.Orchestrator}, c.Products...)
	for i, p := range peers {
		if len(p.PodLabels) == 0 && p.NamespaceLabels == nil {
			// Every pod of the engines' namespace: engines included.
			problems = append(problems, fmt.Sprintf("network peer %d selects every pod of the engines' namespace (engines could reach each other)", i))
		}
	}
	for _, t := range c.Tolerations {
		switch corev1.TolerationOperator(t.Operator) {
		case "", corev1.TolerationOpEqual, corev1.TolerationOpExists:
		default:
			problems = append(problems, fmt.Sprintf("toleration operator %q", t.Operator))
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("invalid kubernetes backend config: %s", strings.Join(problems, "; "))
	}
	return nil
}

// Backend is the Kubernetes implementation of orchestrator.Backend. It is
// safe for concurrent use, also by several processes against one cluster.
type Backend struct {
	cfg    Config
	client clientset.Interface
	log    *slog.Logger

	connMu  sync.Mutex
	synced  bool
	factory informers.SharedInformerFactory
	stopCh  chan struct{}
	pods    listerscorev1.PodLister
	secrets listerscorev1.SecretLister
	claims  listerscorev1.PersistentVolumeClaimLister
	podInf  cache.SharedIndexInformer
	secInf  cache.SharedIndexInformer
	pvcInf  cache.SharedIndexInformer

	subMu sync.Mutex
	subs  map[*subscriber]struct{}

	// exitMu guards lastExit: the last exit code the pod informer saw per
	// pod uid, for Stop to record (the pod is gone when Stop looks).
	exitMu   sync.Mutex
	lastExit map[string]int
}

var _ orchestrator.Backend = (*Backend)(nil)

// New returns a Kubernetes backend. It does not contact the API server:
// the first call that needs it does (Ping checks it).
func New(cfg Config, log *slog.Logger) (*Backend, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	rc := cfg.RESTConfig
	if rc == nil {
		var err error
		if rc, err = loadRESTConfig(cfg.Kubeconfig); err != nil {
			return nil, fmt.Errorf("kubernetes client configuration: %w", err)
		}
	} else {
		rc = rest.CopyConfig(rc)
	}
	if rc.Timeout == 0 {
		rc.Timeout = 30 * time.Second
	}
	if rc.UserAgent == "" {
		rc.UserAgent = "enginefleet-orchestrator"
	}
	cli, err := clientset.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return &Backend{
		cfg:      cfg,
		client:   cli,
		log:      log.With("backend", "kubernetes", "node", cfg.Node, "namespace", cfg.Namespace),
		subs:     map[*subscriber]struct{}{},
		lastExit: map[string]int{},
	}, nil
}

func loadRESTConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" {
		if rc, err := rest.InClusterConfig(); err == nil {
			return rc, nil
		}
	}
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	if kubeconfig != "" {
		rules.ExplicitPath = kubeconfig
	}
	return clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
}

// Name is "kubernetes".
func (b *Backend) Name() string { return "kubernetes" }

// Config returns the effective configuration (defaults applied).
func (b *Backend) Config() Config { return b.cfg }

// Close stops the informers. Event channels close.
func (b *Backend) Close() error {
	b.connMu.Lock()
	defer b.connMu.Unlock()
	if b.stopCh != nil {
		close(b.stopCh)
		b.factory.Shutdown()
		b.stopCh = nil
		b.synced = false
	}
	b.subMu.Lock()
	for s := range b.subs {
		s.close()
		delete(b.subs, s)
	}
	b.subMu.Unlock()
	return nil
}

// Ping checks that the API server answers and that the orchestrator may
// read what it manages in the namespace.
func (b *Backend) Ping(ctx context.Context) error {
	return b.connect(ctx)
}

// connect checks access to the namespace's pods, secrets and claims (so
// that an unreachable server or a missing RBAC rule is reported at once,
// not as an informer that never syncs) and starts the informers.
func (b *Backend) connect(ctx context.Context) error {
	b.connMu.Lock()
	defer b.connMu.Unlock()
	if b.synced {
		return nil
	}
	ns, sel := b.cfg.Namespace, b.nodeSelector().String()
	opts := metav1.ListOptions{LabelSelector: sel, Limit: 1}
	core := b.client.CoreV1()
	if _, err := core.Pods(ns).List(ctx, opts); err != nil {
		return classify("list pods", err)
	}
	if _, err := core.Secrets(ns).List(ctx, opts); err != nil {
		return classify("list secrets", err)
	}
	if _, err := core.PersistentVolumeClaims(ns).List(ctx, opts); err != nil {
		return classify("list persistent volume claims", err)
	}
	f := informers.NewSharedInformerFactoryWithOptions(b.client, 0,
		informers.WithNamespace(ns),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = sel }))
	podInf := f.Core().V1().Pods()
	secInf := f.Core().V1().Secrets()
	pvcInf := f.Core().V1().PersistentVolumeClaims()
	b.podInf, b.secInf, b.pvcInf = podInf.Informer(), secInf.Informer(), pvcInf.Informer()
	b.pods, b.secrets, b.claims = podInf.Lister(), secInf.Lister(), pvcInf.Lister()
	if _, err := b.podInf.AddEventHandler(b.podEventHandler()); err != nil {
		return fmt.Errorf("watch pods: %w", err)
	}
	stop := make(chan struct{})
	f.Start(stop)
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for typ, ok := range f.WaitForCacheSync(sctx.Done()) {
		if !ok {
			close(stop)
			f.Shutdown()
			return fmt.Errorf("sync %v cache: %w", typ, errors.Join(ErrUnreachable, sctx.Err()))
		}
	}
	b.factory, b.stopCh, b.synced = f, stop, true
	return nil
}

// nodeSelector selects this node's (and this fleet's) managed objects.
func (b *Backend) nodeSelector() labels.Selector {
	set := labels.Set{
		orchestrator.LabelManaged: "true",
		orchestrator.LabelNode:    b.cfg.Node,
	}
	if b.cfg.Fleet != "" {
		set[orchestrator.LabelFleet] = b.cfg.Fleet
	}
	return labels.SelectorFromSet(set)
}

// baseLabels are the labels on every object made for engineID.
func (b *Backend) baseLabels(engineID, productID string) map[string]string {
	l := make(map[string]string, len(b.cfg.Labels)+5)
	for k, v := range b.cfg.Labels {
		l[k] = v
	}
	l[orchestrator.LabelManaged] = "true"
	l[orchestrator.LabelNode] = b.cfg.Node
	if b.cfg.Fleet != "" {
		l[orchestrator.LabelFleet] = b.cfg.Fleet
	}
	l[orchestrator.LabelEngineID] = engineID
	if productID != "" {
		l[orchestrator.LabelProductID] = productID
	}
	return l
}

// validID accepts ids that make valid object names: engine-<id> must be a
// DNS-1035 label (Services) and engine-data-<id> a DNS-1123 subdomain.
func validID(engineID string) error {
	if engineID == "" {
		return errors.New("empty engine id")
	}
	if errs := validation.IsDNS1035Label(orchestrator.ContainerName(engineID)); len(errs) > 0 {
		return fmt.Errorf("invalid engine id %q: lowercase letters, digits and '-' only, at most %d characters", engineID, validation.DNS1035LabelMaxLength-len("engine-"))
	}
	if errs := validation.IsValidLabelValue(engineID); len(errs) > 0 {
		return fmt.Errorf("invalid engine id %q", engineID)
	}
	return nil
}

// classify wraps a client error with what was being done and the
// backend's sentinel for its kind.
func classify(op string, err error) error {
	if err == nil {
		return nil
	}
	var ne net.Error
	switch {
	case apierrors.IsForbidden(err) && strings.Contains(err.Error(), "exceeded quota"):
		return fmt.Errorf("%s: %w: %w", op, ErrQuotaExceeded, err)
	case apierrors.IsForbidden(err) || apierrors.IsUnauthorized(err):
		return fmt.Errorf("%s: %w (check the orchestrator's RBAC role in the namespace): %w", op, ErrForbidden, err)
	case apierrors.IsServiceUnavailable(err) || apierrors.IsTimeout(err) || apierrors.IsServerTimeout(err) ||
		errors.As(err, &ne) || isConnRefused(err):
		return fmt.Errorf("%s: %w: %w", op, ErrUnreachable, err)
	}
	return fmt.Errorf("%s: %w", op, err)
}

func isConnRefused(err error) bool {
	s := err.Error()
	return strings.Contains(s, "connection refused") || strings.Contains(s, "no such host") ||
		strings.Contains(s, "i/o timeout") || strings.Contains(s, "connection reset")
}

// waitCache waits until the informer's store satisfies cond for key (a
// write of ours has arrived), at most 10 s: past that the cache lags and
// the caller goes on with what it has.
func waitCache(ctx context.Context, inf cache.SharedIndexInformer, key string, cond func(obj metav1.Object, exists bool) bool) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		obj, exists, err := inf.GetStore().GetByKey(key)
		var m metav1.Object
		if err == nil && exists {
			m, _ = obj.(metav1.Object)
		}
		if err == nil && cond(m, exists && m != nil) {
			return
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// seen is a waitCache condition: the object at least at resourceVersion rv.
func seen(rv string) func(metav1.Object, bool) bool {
	want, werr := strconv.ParseUint(rv, 10, 64)
	return func(m metav1.Object, exists bool) bool {
		if !exists {
			return false
		}
		if m.GetResourceVersion() == rv {
			return true
		}
		got, err := strconv.ParseUint(m.GetResourceVersion(), 10, 64)
		return werr == nil && err == nil && got >= want
	}
}

// gone is a waitCache condition: no object, or another one (another uid).
func gone(uid string) func(metav1.Object, bool) bool {
	return func(m metav1.Object, exists bool) bool {
		return !exists || string(m.GetUID()) != uid
	}
}

func (b *Backend) key(name string) string { return b.cfg.Namespace + "/" + name }

// cleanupCtx is a context for undoing what an operation did, even when
// the operation's own context is done.
func cleanupCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
}
