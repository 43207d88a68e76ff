package kubernetes_test

import (
	"context"
	"encoding/json"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"

	orchestrator "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/backend/kubernetes"
	"github.com/enginefleet/orchestrator/internal/kubeenv"
)

const kwokImage = "enginefleet/engine:kwok-test"

// The contract on kwok nodes (pods run nothing): Ensure, adopt, replace,
// Start, Stop, Inspect, List, RemoveContainer, RemoveVolume.
func TestLifecycle(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newBackend(t)
	b, cli := f.b, f.env.Client
	e := newEngine(t, b, kwokImage)
	id := e.spec.EngineID
	name := orchestrator.ContainerName(id)

	info, err := b.Inspect(ctx, id)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimeMissing, info.State)

	require.NoError(t, b.Ensure(ctx, e.spec))
	info, err = b.Inspect(ctx, id)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimeInfo{
		EngineID: id, ProductID: e.spec.ProductID, Name: name,
		State: orchestrator.RuntimeCreated, Image: kwokImage, HostPort: e.spec.HostPort,
		CreatedAt: info.CreatedAt,
	}, info)
	assert.WithinDuration(t, time.Now(), info.CreatedAt, time.Minute)
	_, err = cli.CoreV1().Pods(f.ns).Get(ctx, name, metav1.GetOptions{})
	assert.True(t, isNotFound(err), "Ensure creates no pod")

	// Every object carries the orchestrator's labels.
	secret, err := cli.CoreV1().Secrets(f.ns).Get(ctx, name, metav1.GetOptions{})
	require.NoError(t, err)
	claim, err := cli.CoreV1().PersistentVolumeClaims(f.ns).Get(ctx, orchestrator.VolumeName(id), metav1.GetOptions{})
	require.NoError(t, err)
	svc, err := cli.CoreV1().Services(f.ns).Get(ctx, name, metav1.GetOptions{})
	require.NoError(t, err)
	np, err := cli.NetworkingV1().NetworkPolicies(f.ns).Get(ctx, name, metav1.GetOptions{})
	require.NoError(t, err)
	for kind, l := range map[string]map[string]string{"secret": secret.Labels, "claim": claim.Labels, "service": svc.Labels, "network policy": np.Labels} {
		assert.Equal(t, "true", l[orchestrator.LabelManaged], kind)
		assert.Equal(t, id, l[orchestrator.LabelEngineID], kind)
		assert.Equal(t, e.spec.ProductID, l[orchestrator.LabelProductID], kind)
		assert.Equal(t, b.Config().Node, l[orchestrator.LabelNode], kind)
	}
	// The Secret holds the environment, key hash and passthrough included.
	assert.Equal(t, e.spec.Env["ENGINE_KEY_HASH"], string(secret.Data["ENGINE_KEY_HASH"]))
	assert.Equal(t, e.spec.Env["PROVIDER_API_KEY"], string(secret.Data["PROVIDER_API_KEY"]))
	assert.Equal(t, resource.MustParse("1Gi"), claim.Spec.Resources.Requests[corev1.ResourceStorage])
	assert.Equal(t, kubeenv.StorageClass, *claim.Spec.StorageClassName)
	assert.Equal(t, int32(8000), svc.Spec.Ports[0].Port)
	assert.Equal(t, id, svc.Spec.Selector[orchestrator.LabelEngineID])

	// Same spec again: adopted, nothing rewritten.
	require.NoError(t, b.Ensure(ctx, e.spec))
	again, err := cli.CoreV1().Secrets(f.ns).Get(ctx, name, metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, secret.ResourceVersion, again.ResourceVersion, "second Ensure must adopt")

	require.NoError(t, b.Start(ctx, id))
	pod, err := cli.CoreV1().Pods(f.ns).Get(ctx, name, metav1.GetOptions{})
	require.NoError(t, err)
	require.NoError(t, b.Start(ctx, id), "starting a running engine is a no-op")
	same, err := cli.CoreV1().Pods(f.ns).Get(ctx, name, metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, pod.UID, same.UID)
	assertHardened(t, pod, e)
	eventually(t, 10*time.Second, "engine running", func() bool {
		info, err = b.Inspect(ctx, id)
		return err == nil && info.State == orchestrator.RuntimeRunning
	})
	firstNode := waitScheduled(t, f, name)
	assert.True(t, strings.HasPrefix(firstNode, "kwok-node-"), "on a kwok node, got %s", firstNode)
	claim, err = cli.CoreV1().PersistentVolumeClaims(f.ns).Get(ctx, orchestrator.VolumeName(id), metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, corev1.ClaimBound, claim.Status.Phase, "the PV controller bound the claim")

	// A changed env (a rotated key) replaces the pod and keeps the claim.
	changed := e.spec
	changed.Env = maps.Clone(e.spec.Env)
	changed.Env["ENGINE_KEY_HASH"] = strings.Repeat("ab", 32)
	require.NoError(t, b.Ensure(ctx, changed))
	_, err = cli.CoreV1().Pods(f.ns).Get(ctx, name, metav1.GetOptions{})
	assert.True(t, isNotFound(err), "changed env must remove the old pod")
	info, err = b.Inspect(ctx, id)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimeCreated, info.State)
	secret, err = cli.CoreV1().Secrets(f.ns).Get(ctx, name, metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, strings.Repeat("ab", 32), string(secret.Data["ENGINE_KEY_HASH"]))
	require.NoError(t, b.Start(ctx, id))

	// Stop: the pod goes, the claim (and its volume) stays.
	require.NoError(t, b.Stop(ctx, id, 5*time.Second))
	info, err = b.Inspect(ctx, id)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimeExited, info.State)
	assert.Equal(t, 0, info.ExitCode)
	assert.Equal(t, e.spec.HostPort, info.HostPort, "host port known while stopped")
	require.NoError(t, b.Stop(ctx, id, time.Second), "stopping a stopped engine is a no-op")
	kept, err := cli.CoreV1().PersistentVolumeClaims(f.ns).Get(ctx, orchestrator.VolumeName(id), metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, claim.UID, kept.UID, "the claim survives Stop")
	assert.Equal(t, claim.Spec.VolumeName, kept.Spec.VolumeName)

	// Ensure adopts the stopped engine; Start brings the pod back on the
	// node that holds its volume.
	require.NoError(t, b.Ensure(ctx, changed))
	info, err = b.Inspect(ctx, id)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimeExited, info.State, "adopting keeps the stopped state")
	require.NoError(t, b.Start(ctx, id))
	assert.Equal(t, firstNode, waitScheduled(t, f, name), "the volume's node affinity brings the pod back")

	require.NoError(t, b.RemoveContainer(ctx, id))
	require.NoError(t, b.RemoveContainer(ctx, id), "removing twice is a no-op")
	info, err = b.Inspect(ctx, id)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimeMissing, info.State)
	for _, get := range []func() error{
		func() error { _, err := cli.CoreV1().Services(f.ns).Get(ctx, name, metav1.GetOptions{}); return err },
		func() error {
			_, err := cli.NetworkingV1().NetworkPolicies(f.ns).Get(ctx, name, metav1.GetOptions{})
			return err
		},
		func() error { _, err := cli.CoreV1().Secrets(f.ns).Get(ctx, name, metav1.GetOptions{}); return err },
	} {
		assert.True(t, isNotFound(get()), "RemoveContainer removes the engine's objects")
	}
	require.NoError(t, b.Stop(ctx, id, time.Second), "stopping a missing engine is a no-op")
	err = b.Start(ctx, id)
	require.Error(t, err)
	assert.ErrorIs(t, err, kubernetes.ErrNotFound)

	_, vols, err := b.List(ctx)
	require.NoError(t, err)
	require.Len(t, vols, 1, "the claim survives RemoveContainer")
	assert.Equal(t, orchestrator.VolumeName(id), vols[0].Name)
	require.NoError(t, b.RemoveVolume(ctx, id))
	require.NoError(t, b.RemoveVolume(ctx, id), "removing twice is a no-op")
	runtimes, vols, err := b.List(ctx)
	require.NoError(t, err)
	assert.Empty(t, runtimes)
	assert.Empty(t, vols)
	eventually(t, 20*time.Second, "released volume deleted", func() bool {
		_, err := cli.CoreV1().PersistentVolumes().Get(ctx, claim.Spec.VolumeName, metav1.GetOptions{})
		return isNotFound(err)
	})
}

// assertHardened checks the pod is what the engine contract and the
// hardening ask for, and holds no environment value.
func assertHardened(t *testing.T, pod *corev1.Pod, e *testEngine) {
	t.Helper()
	spec := pod.Spec
	require.Len(t, spec.Containers, 1)
	c := spec.Containers[0]
	assert.Equal(t, corev1.RestartPolicyAlways, spec.RestartPolicy)
	require.NotNil(t, spec.AutomountServiceAccountToken)
	assert.False(t, *spec.AutomountServiceAccountToken)
	require.NotNil(t, spec.SecurityContext)
	assert.True(t, *spec.SecurityContext.RunAsNonRoot)
	assert.Equal(t, int64(65532), *spec.SecurityContext.RunAsUser)
	assert.Equal(t, corev1.SeccompProfileTypeRuntimeDefault, spec.SecurityContext.SeccompProfile.Type)
	sc := c.SecurityContext
	require.NotNil(t, sc)
	assert.True(t, *sc.ReadOnlyRootFilesystem)
	assert.False(t, *sc.AllowPrivilegeEscalation)
	assert.Equal(t, []corev1.Capability{"ALL"}, sc.Capabilities.Drop)
	for _, p := range []*corev1.Probe{c.ReadinessProbe, c.LivenessProbe} {
		require.NotNil(t, p)
		assert.Equal(t, "/health", p.HTTPGet.Path)
		assert.Equal(t, 8000, p.HTTPGet.Port.IntValue())
	}
	assert.NotEmpty(t, c.Resources.Requests)
	var dataClaim string
	for _, v := range spec.Volumes {
		if v.PersistentVolumeClaim != nil {
			dataClaim = v.PersistentVolumeClaim.ClaimName
		}
	}
	assert.Equal(t, orchestrator.VolumeName(e.spec.EngineID), dataClaim)
	assert.Contains(t, c.VolumeMounts, corev1.VolumeMount{Name: "data", MountPath: "/data"})
	// No environment value in the pod spec: only a reference to the Secret.
	assert.Empty(t, c.Env)
	require.Len(t, c.EnvFrom, 1)
	assert.Equal(t, orchestrator.ContainerName(e.spec.EngineID), c.EnvFrom[0].SecretRef.Name)
	j, err := json.Marshal(pod)
	require.NoError(t, err)
	for k, v := range e.spec.Env {
		if strings.HasPrefix(k, "ENGINE_KEY") || strings.HasPrefix(k, "PROVIDER") {
			assert.NotContains(t, string(j), v, "%s's value must not be in the pod", k)
		}
	}
}

func waitScheduled(t *testing.T, f *fixture, pod string) string {
	t.Helper()
	var node string
	eventually(t, 20*time.Second, "pod "+pod+" scheduled", func() bool {
		p, err := f.env.Client.CoreV1().Pods(f.ns).Get(t.Context(), pod, metav1.GetOptions{})
		if err == nil {
			node = p.Spec.NodeName
		}
		return node != ""
	})
	return node
}

func isNotFound(err error) bool {
	return err != nil && strings.Contains(err.Error(), "not found")
}

// The NetworkPolicy admits the orchestrator's pods and the product peers
// on port 8000, and nothing else: engines are never among the peers.
func TestNetworkPolicy(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newBackend(t, func(c *kubernetes.Config) {
		c.Products = []kubernetes.Peer{{NamespaceLabels: map[string]string{"team": "product"}, PodLabels: map[string]string{"app": "product-api"}}}
	})
	e := newEngine(t, f.b, kwokImage)
	require.NoError(t, f.b.Ensure(ctx, e.spec))
	np, err := f.env.Client.NetworkingV1().NetworkPolicies(f.ns).Get(ctx, orchestrator.ContainerName(e.spec.EngineID), metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, e.spec.EngineID, np.Spec.PodSelector.MatchLabels[orchestrator.LabelEngineID])
	require.Len(t, np.Spec.Ingress, 1)
	rule := np.Spec.Ingress[0]
	require.Len(t, rule.Ports, 1)
	assert.Equal(t, 8000, rule.Ports[0].Port.IntValue())
	require.Len(t, rule.From, 2)
	assert.Equal(t, map[string]string{"app.kubernetes.io/name": "enginefleet-orchestrator"}, rule.From[0].PodSelector.MatchLabels)
	assert.Nil(t, rule.From[0].NamespaceSelector, "the orchestrator in the engines' namespace")
	assert.Equal(t, map[string]string{"app": "product-api"}, rule.From[1].PodSelector.MatchLabels)
	assert.Equal(t, map[string]string{"team": "product"}, rule.From[1].NamespaceSelector.MatchLabels)
	for _, peer := range rule.From {
		assert.NotContains(t, peer.PodSelector.MatchLabels, orchestrator.LabelManaged, "engines must not be a peer")
	}

	// A peer selecting every pod of the namespace would let engines in.
	_, err = kubernetes.New(kubernetes.Config{RESTConfig: f.env.Config, Products: []kubernetes.Peer{{}}}, nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "engines could reach each other")
}

// The real scheduler spreads engines over the kwok nodes, and every claim
// is bound to a volume on its pod's node.
func TestSpreadOverNodes(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newBackend(t)
	nodes := map[string]int{}
	var ids []string
	for range 6 {
		e := newEngine(t, f.b, kwokImage)
		require.NoError(t, f.b.Ensure(ctx, e.spec))
		require.NoError(t, f.b.Start(ctx, e.spec.EngineID))
		ids = append(ids, e.spec.EngineID)
	}
	for _, id := range ids {
		node := waitScheduled(t, f, orchestrator.ContainerName(id))
		nodes[node]++
		claim, err := f.env.Client.CoreV1().PersistentVolumeClaims(f.ns).Get(ctx, orchestrator.VolumeName(id), metav1.GetOptions{})
		require.NoError(t, err)
		pv, err := f.env.Client.CoreV1().PersistentVolumes().Get(ctx, claim.Spec.VolumeName, metav1.GetOptions{})
		require.NoError(t, err)
		assert.Equal(t, node, pv.Spec.NodeAffinity.Required.NodeSelectorTerms[0].MatchExpressions[0].Values[0])
	}
	t.Logf("pods per node: %v", nodes)
	assert.GreaterOrEqual(t, len(nodes), 2, "6 engines on one node: %v", nodes)
	runtimes, vols, err := f.b.List(ctx)
	require.NoError(t, err)
	assert.Len(t, runtimes, 6)
	assert.Len(t, vols, 6)
	for _, r := range runtimes {
		assert.Equal(t, orchestrator.RuntimeRunning, r.State)
	}
}

// List and Events see only the backend's own node.
func TestListOwnNodeOnly(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newBackend(t)
	other := f.backend(t, onKwok)
	mine := newEngine(t, f.b, kwokImage)
	theirs := newEngine(t, other, kwokImage)
	require.NoError(t, f.b.Ensure(ctx, mine.spec))
	require.NoError(t, other.Ensure(ctx, theirs.spec))
	runtimes, vols, err := f.b.List(ctx)
	require.NoError(t, err)
	require.Len(t, runtimes, 1)
	assert.Equal(t, mine.spec.EngineID, runtimes[0].EngineID)
	assert.Equal(t, orchestrator.RuntimeCreated, runtimes[0].State)
	require.Len(t, vols, 1)
	assert.Equal(t, mine.spec.EngineID, vols[0].EngineID)
	assert.Error(t, f.b.Ensure(ctx, theirs.spec), "another node's engine")
}

// A ResourceQuota that leaves no room for another pod makes Start fail
// with ErrQuotaExceeded.
func TestQuotaExceeded(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newBackend(t)
	_, err := f.env.Client.CoreV1().ResourceQuotas(f.ns).Create(ctx, &corev1.ResourceQuota{
		ObjectMeta: metav1.ObjectMeta{Name: "one-pod"},
		Spec:       corev1.ResourceQuotaSpec{Hard: corev1.ResourceList{corev1.ResourcePods: resource.MustParse("1")}},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	eventually(t, 20*time.Second, "quota status computed", func() bool {
		q, err := f.env.Client.CoreV1().ResourceQuotas(f.ns).Get(ctx, "one-pod", metav1.GetOptions{})
		return err == nil && len(q.Status.Hard) > 0
	})
	first, second := newEngine(t, f.b, kwokImage), newEngine(t, f.b, kwokImage)
	require.NoError(t, f.b.Ensure(ctx, first.spec))
	require.NoError(t, f.b.Ensure(ctx, second.spec))
	require.NoError(t, f.b.Start(ctx, first.spec.EngineID))
	err = f.b.Start(ctx, second.spec.EngineID)
	require.Error(t, err)
	assert.ErrorIs(t, err, kubernetes.ErrQuotaExceeded)
	assert.Contains(t, err.Error(), "exceeded quota")
	t.Logf("quota error: %v", err)
}

// A service account without the RBAC rules the backend needs gets
// ErrForbidden, naming what was refused.
func TestForbidden(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newBackend(t)
	cli := f.env.Client
	_, err := cli.CoreV1().ServiceAccounts(f.ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "restricted"}}, metav1.CreateOptions{})
	require.NoError(t, err)
	// It may read, and create claims, but not secrets.
	_, err = cli.RbacV1().Roles(f.ns).Create(ctx, &rbacv1.Role{
		ObjectMeta: metav1.ObjectMeta{Name: "read-only"},
		Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{""}, Resources: []string{"pods", "secrets", "persistentvolumeclaims"}, Verbs: []string{"get", "list", "watch"}},
			{APIGroups: []string{""}, Resources: []string{"persistentvolumeclaims"}, Verbs: []string{"create"}},
		},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	tok, err := cli.CoreV1().ServiceAccounts(f.ns).CreateToken(ctx, "restricted", &authenticationv1.TokenRequest{}, metav1.CreateOptions{})
	require.NoError(t, err)
	restricted := &rest.Config{Host: f.env.Config.Host, BearerToken: tok.Status.Token,
		TLSClientConfig: rest.TLSClientConfig{CAData: f.env.Config.CAData}}

	// Without the role binding it may not even list.
	b := f.backend(t, onKwok, func(c *kubernetes.Config) { c.RESTConfig = restricted })
	err = b.Ping(ctx)
	require.Error(t, err)
	assert.ErrorIs(t, err, kubernetes.ErrForbidden)
	assert.Contains(t, err.Error(), "list pods")

	_, err = cli.RbacV1().RoleBindings(f.ns).Create(ctx, &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "read-only"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: "read-only"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Name: "restricted", Namespace: f.ns}},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	e := newEngine(t, b, kwokImage)
	eventually(t, 10*time.Second, "role binding effective", func() bool { return b.Ping(ctx) == nil })
	err = b.Ensure(ctx, e.spec)
	require.Error(t, err)
	assert.ErrorIs(t, err, kubernetes.ErrForbidden)
	assert.Contains(t, err.Error(), "create engine secret")
	assert.NotContains(t, err.Error(), e.spec.Env["ENGINE_KEY_HASH"])
}

// An API server that does not answer is ErrUnreachable, at once.
func TestUnreachable(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	l.Close() // nothing listens there now
	b, err := kubernetes.New(kubernetes.Config{RESTConfig: &rest.Config{Host: "https://" + addr, Timeout: 5 * time.Second}}, nil)
	require.NoError(t, err)
	defer b.Close()
	began := time.Now()
	err = b.Ping(t.Context())
	require.Error(t, err)
	assert.ErrorIs(t, err, kubernetes.ErrUnreachable)
	_, err = b.Events(t.Context())
	assert.ErrorIs(t, err, kubernetes.ErrUnreachable)
	err = b.Ensure(t.Context(), orchestrator.EngineSpec{EngineID: "e1", Image: "x", HostPort: 9000})
	assert.ErrorIs(t, err, kubernetes.ErrUnreachable)
	assert.Less(t, time.Since(began), 15*time.Second)
}

// A claim that never binds (no such storage class) fails Start within
// StartTimeout, naming the claim and the cause; the pod is cleaned up.
func TestVolumeNeverBinds(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newBackend(t, func(c *kubernetes.Config) {
		c.StorageClass = "no-such-class"
		c.StartTimeout = 4 * time.Second
	})
	e := newEngine(t, f.b, kwokImage)
	require.NoError(t, f.b.Ensure(ctx, e.spec))
	err := f.b.Start(ctx, e.spec.EngineID)
	require.Error(t, err)
	t.Logf("never binds: %v", err)
	assert.ErrorIs(t, err, kubernetes.ErrVolumeNotBound)
	assert.Contains(t, err.Error(), orchestrator.VolumeName(e.spec.EngineID))
	assert.Contains(t, err.Error(), "no-such-class")
	info, err := f.b.Inspect(ctx, e.spec.EngineID)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimeExited, info.State)
}

func TestNotSupported(t *testing.T) {
	t.Parallel()
	b, err := kubernetes.New(kubernetes.Config{RESTConfig: &rest.Config{Host: "https://127.0.0.1:1"}}, nil)
	require.NoError(t, err)
	ctx := t.Context()
	assert.ErrorIs(t, b.Pause(ctx, "e"), kubernetes.ErrNotSupported)
	assert.ErrorIs(t, b.Unpause(ctx, "e"), kubernetes.ErrNotSupported)
	assert.ErrorIs(t, b.CopyDataOut(ctx, "e", io.Discard), kubernetes.ErrNotSupported)
	assert.ErrorIs(t, b.CopyDataIn(ctx, "e", "img", strings.NewReader("")), kubernetes.ErrNotSupported)
	assert.Equal(t, "kubernetes", b.Name())
}

func TestEnsureRejectsBadSpec(t *testing.T) {
	t.Parallel()
	b, err := kubernetes.New(kubernetes.Config{RESTConfig: &rest.Config{Host: "https://127.0.0.1:1"}, Node: "n1"}, nil)
	require.NoError(t, err)
	good := orchestrator.EngineSpec{EngineID: "0b0e2f6c-1c55-4b6e-9a55-3f7a1c2f9e10", Image: "img", HostPort: 9000}
	for name, mod := range map[string]func(*orchestrator.EngineSpec){
		"no port":       func(s *orchestrator.EngineSpec) { s.HostPort = 0 },
		"no image":      func(s *orchestrator.EngineSpec) { s.Image = "" },
		"bad id":        func(s *orchestrator.EngineSpec) { s.EngineID = "a/b" },
		"uppercase id":  func(s *orchestrator.EngineSpec) { s.EngineID = "ABC" },
		"other node":    func(s *orchestrator.EngineSpec) { s.Node = "elsewhere" },
		"bad env name":  func(s *orchestrator.EngineSpec) { s.Env = map[string]string{"A=B": "x"} },
		"bad product":   func(s *orchestrator.EngineSpec) { s.ProductID = "not a label value" },
		"long id 60+ch": func(s *orchestrator.EngineSpec) { s.EngineID = strings.Repeat("a", 60) },
	} {
		spec := good
		mod(&spec)
		err := b.Ensure(t.Context(), spec)
		require.Error(t, err, name)
		assert.NotErrorIs(t, err, kubernetes.ErrUnreachable, "%s: rejected before any request", name)
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	_, err := kubernetes.New(kubernetes.Config{
		RESTConfig: &rest.Config{Host: "https://127.0.0.1:1"},
		Namespace:  "Bad_NS", MemoryMB: -1, BrainSize: "lots", CatalogKind: "nfs",
	}, nil)
	require.Error(t, err)
	for _, want := range []string{"namespace", "memory", "brain size", "catalog kind"} {
		assert.Contains(t, err.Error(), want)
	}
}

// The test node agent really runs the engine: /health answers at the
// address the backend reports, the brain survives Stop and Start, a crash
// (SIGKILL standing in for the OOM killer) is restarted by the "kubelet"
// and reported as oom and die events, and a missing image fails Start with
// ErrImageUnavailable.
func TestAgentRunsEngine(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	agent := kubeenv.RequireAgent(t)
	f := newBackend(t, onAgent, func(c *kubernetes.Config) { c.MemoryMB = 256; c.CPUs = 0.5 })
	b := f.b
	e := newEngine(t, b, kubeenv.AgentImage)
	id := e.spec.EngineID
	name := orchestrator.ContainerName(id)

	ectx, cancel := context.WithCancel(ctx)
	defer cancel()
	events, err := b.Events(ectx)
	require.NoError(t, err)

	require.NoError(t, b.Ensure(ctx, e.spec))
	require.NoError(t, b.Start(ctx, id))
	assert.Equal(t, agent.Node(), waitScheduled(t, f, name))
	e.waitHealthy(t, b)
	eventually(t, 10*time.Second, "pod Ready", func() bool {
		p, err := f.env.Client.CoreV1().Pods(f.ns).Get(ctx, name, metav1.GetOptions{})
		return err == nil && podReady(p)
	})
	e.do(t, http.MethodPost, "/memories", map[string]any{"content": "kept on the claim"})

	// Stop (SIGTERM: a clean exit) and Start again: same brain.
	drain(events)
	require.NoError(t, b.Stop(ctx, id, 10*time.Second))
	var stopKinds []string
	stopTimeout := time.After(10 * time.Second)
	for !contains(stopKinds, "stop") {
		select {
		case ev := <-events:
			require.Equal(t, id, ev.EngineID)
			stopKinds = append(stopKinds, ev.Kind)
			assert.Equal(t, 0, ev.ExitCode, "%s after SIGTERM", ev.Kind)
		case <-stopTimeout:
			t.Fatalf("no stop event; got %v", stopKinds)
		}
	}
	assert.Equal(t, []string{"die", "stop"}, stopKinds)
	info, err := b.Inspect(ctx, id)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimeExited, info.State)
	assert.Equal(t, 0, info.ExitCode, "the engine exits 0 on SIGTERM")
	require.NoError(t, b.Start(ctx, id))
	e.waitHealthy(t, b)
	found := e.do(t, http.MethodGet, "/memories?q=claim", nil)
	assert.Contains(t, string(found), "kept on the claim")

	// SIGKILL from outside the agent: reported OOMKilled, restarted.
	drain(events)
	pid := agent.Pid(f.ns, name)
	require.NotZero(t, pid)
	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	var kinds []string
	timeout := time.After(20 * time.Second)
	for !contains(kinds, "die") {
		select {
		case ev := <-events:
			require.Equal(t, id, ev.EngineID)
			kinds = append(kinds, ev.Kind)
			if ev.Kind == "die" || ev.Kind == "oom" {
				assert.Equal(t, 137, ev.ExitCode)
			}
		case <-timeout:
			t.Fatalf("no die event; got %v", kinds)
		}
	}
	assert.Equal(t, []string{"oom", "die"}, kinds[len(kinds)-2:])
	eventually(t, 20*time.Second, "engine restarted", func() bool {
		info, err = b.Inspect(ctx, id)
		return err == nil && info.State == orchestrator.RuntimeRunning
	})
	// Like Docker's, Inspect of a running engine reports the current run:
	// the crash is in the pod's status.
	assert.False(t, info.OOMKilled)
	p, err := f.env.Client.CoreV1().Pods(f.ns).Get(ctx, name, metav1.GetOptions{})
	require.NoError(t, err)
	require.Len(t, p.Status.ContainerStatuses, 1)
	assert.Equal(t, int32(1), p.Status.ContainerStatuses[0].RestartCount)
	assert.Equal(t, "OOMKilled", p.Status.ContainerStatuses[0].LastTerminationState.Terminated.Reason)
	e.waitHealthy(t, b)
	found = e.do(t, http.MethodGet, "/memories?q=claim", nil)
	assert.Contains(t, string(found), "kept on the claim")

	// An image the node cannot pull.
	missing := newEngine(t, b, "enginefleet/engine:not-published-"+randHex(3))
	require.NoError(t, b.Ensure(ctx, missing.spec))
	err = b.Start(ctx, missing.spec.EngineID)
	require.Error(t, err)
	t.Logf("missing image: %v", err)
	assert.ErrorIs(t, err, orchestrator.ErrImageUnavailable)
	info, err = b.Inspect(ctx, missing.spec.EngineID)
	require.NoError(t, err)
	assert.NotEqual(t, orchestrator.RuntimeRunning, info.State)
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func drain(ch <-chan orchestrator.RuntimeEvent) {
	for {
		select {
		case <-ch:
		default:
			return
		}
	}
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// Racing Ensures from several backends (worker processes) of one node end
// with one engine: one Secret, one claim, no error.
func TestEnsureConcurrent(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newBackend(t)
	backends := []*kubernetes.Backend{f.b}
	for range 3 {
		backends = append(backends, f.backend(t, onKwok, func(c *kubernetes.Config) { c.Node = f.b.Config().Node }))
	}
	e := newEngine(t, f.b, kwokImage)
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Go(func() { errs[i] = backends[i%len(backends)].Ensure(ctx, e.spec) })
	}
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}
	runtimes, vols, err := f.b.List(ctx)
	require.NoError(t, err)
	assert.Len(t, runtimes, 1)
	assert.Len(t, vols, 1)
	errs = make([]error, 4)
	for i := range errs {
		wg.Go(func() { errs[i] = backends[i].Start(ctx, e.spec.EngineID) })
	}
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}
	pods, err := f.env.Client.CoreV1().Pods(f.ns).List(ctx, metav1.ListOptions{})
	require.NoError(t, err)
	assert.Len(t, pods.Items, 1)
}

// The Role in deploy/kubernetes/orchestrator-rbac.yaml is enough for the
// whole lifecycle (and the doc stays true).
func TestDocumentedRoleSuffices(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newBackend(t)
	cli := f.env.Client
	raw, err := os.ReadFile("../../deploy/kubernetes/orchestrator-rbac.yaml")
	require.NoError(t, err)
	var role *rbacv1.Role
	for _, doc := range strings.Split(string(raw), "\n---\n") {
		obj, _, err := scheme.Codecs.UniversalDeserializer().Decode([]byte(doc), nil, nil)
		require.NoError(t, err)
		if r, ok := obj.(*rbacv1.Role); ok {
			role = r
		}
	}
	require.NotNil(t, role)
	role.Namespace = f.ns
	_, err = cli.RbacV1().Roles(f.ns).Create(ctx, role, metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = cli.CoreV1().ServiceAccounts(f.ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "orchestrator"}}, metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = cli.RbacV1().RoleBindings(f.ns).Create(ctx, &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "orchestrator"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: role.Name},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Name: "orchestrator", Namespace: f.ns}},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	tok, err := cli.CoreV1().ServiceAccounts(f.ns).CreateToken(ctx, "orchestrator", &authenticationv1.TokenRequest{}, metav1.CreateOptions{})
	require.NoError(t, err)
	b := f.backend(t, onKwok, func(c *kubernetes.Config) {
		c.RESTConfig = &rest.Config{Host: f.env.Config.Host, BearerToken: tok.Status.Token,
			TLSClientConfig: rest.TLSClientConfig{CAData: f.env.Config.CAData}}
	})
	eventually(t, 10*time.Second, "role binding effective", func() bool { return b.Ping(ctx) == nil })

	e := newEngine(t, b, kwokImage)
	id := e.spec.EngineID
	require.NoError(t, b.Ensure(ctx, e.spec))
	require.NoError(t, b.Start(ctx, id))
	changed := e.spec
	changed.Image = kwokImage + "-2"
	require.NoError(t, b.Ensure(ctx, changed))
	require.NoError(t, b.Start(ctx, id))
	require.NoError(t, b.Stop(ctx, id, time.Second))
	_, _, err = b.List(ctx)
	require.NoError(t, err)
	require.NoError(t, b.RemoveContainer(ctx, id))
	require.NoError(t, b.RemoveVolume(ctx, id))

	// Start's diagnosis of a claim that never binds reads events.
	nb := f.backend(t, onKwok, func(c *kubernetes.Config) {
		c.RESTConfig = b.Config().RESTConfig
		c.StorageClass = "no-such-class"
		c.StartTimeout = 3 * time.Second
	})
	stuck := newEngine(t, nb, kwokImage)
	require.NoError(t, nb.Ensure(ctx, stuck.spec))
	err = nb.Start(ctx, stuck.spec.EngineID)
	assert.ErrorIs(t, err, kubernetes.ErrVolumeNotBound)
	assert.NotErrorIs(t, err, kubernetes.ErrForbidden)
}

// Limits, pull secrets and the read-only catalog come from the Config; a
// change of them replaces the pod.
func TestPodFromConfig(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newBackend(t, func(c *kubernetes.Config) {
		c.MemoryMB, c.CPUs = 256, 0.5
		c.ImagePullSecrets = []string{"regcred"}
		c.CatalogKind, c.CatalogName = kubernetes.CatalogConfigMap, "catalog"
	})
	_, err := f.env.Client.CoreV1().ConfigMaps(f.ns).Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "catalog"}, Data: map[string]string{"items.json": "[]"},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	e := newEngine(t, f.b, kwokImage)
	require.NoError(t, f.b.Ensure(ctx, e.spec))
	require.NoError(t, f.b.Start(ctx, e.spec.EngineID))
	pod, err := f.env.Client.CoreV1().Pods(f.ns).Get(ctx, orchestrator.ContainerName(e.spec.EngineID), metav1.GetOptions{})
	require.NoError(t, err)
	c := pod.Spec.Containers[0]
	assert.Equal(t, resource.MustParse("256Mi"), c.Resources.Limits[corev1.ResourceMemory])
	assert.Equal(t, resource.MustParse("256Mi"), c.Resources.Requests[corev1.ResourceMemory])
	assert.Equal(t, resource.MustParse("500m"), c.Resources.Limits[corev1.ResourceCPU])
	assert.Equal(t, []corev1.LocalObjectReference{{Name: "regcred"}}, pod.Spec.ImagePullSecrets)
	assert.Contains(t, c.VolumeMounts, corev1.VolumeMount{Name: "catalog", MountPath: "/catalog", ReadOnly: true})
	var catalog *corev1.Volume
	for i := range pod.Spec.Volumes {
		if pod.Spec.Volumes[i].Name == "catalog" {
			catalog = &pod.Spec.Volumes[i]
		}
	}
	require.NotNil(t, catalog)
	require.NotNil(t, catalog.ConfigMap)
	assert.Equal(t, "catalog", catalog.ConfigMap.Name)

	// Another limit: the same engine's pod is replaced on the next Ensure.
	bigger := f.backend(t, onKwok, func(c *kubernetes.Config) {
		*c = f.b.Config()
		c.MemoryMB = 512
	})
	require.NoError(t, bigger.Ensure(ctx, e.spec))
	_, err = f.env.Client.CoreV1().Pods(f.ns).Get(ctx, pod.Name, metav1.GetOptions{})
	assert.True(t, isNotFound(err), "a changed limit replaces the pod")
	require.NoError(t, bigger.Start(ctx, e.spec.EngineID))
	pod, err = f.env.Client.CoreV1().Pods(f.ns).Get(ctx, pod.Name, metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, resource.MustParse("512Mi"), pod.Spec.Containers[0].Resources.Limits[corev1.ResourceMemory])
}
