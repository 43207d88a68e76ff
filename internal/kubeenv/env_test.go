package kubeenv_test

import (
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/enginefleet/orchestrator/internal/kubeenv"
	"github.com/enginefleet/orchestrator/internal/testenv"
)

func TestMain(m *testing.M) { os.Exit(kubeenv.Run(m)) }

// The control plane answers through its kubeconfig, its kwok nodes are
// Ready, the scheduler places a pod on one and kwok runs it, and the PV
// controller binds the pod's claim to the provisioner's volume on that
// node.
func TestControlPlane(t *testing.T) {
	env := kubeenv.Require(t)
	ctx := t.Context()
	rc, err := clientcmd.BuildConfigFromFlags("", env.Kubeconfig)
	require.NoError(t, err)
	cli, err := kubernetes.NewForConfig(rc)
	require.NoError(t, err)
	v, err := cli.Discovery().ServerVersion()
	require.NoError(t, err)
	assert.Equal(t, "v1.37.2", v.GitVersion)
	nodes, err := cli.CoreV1().Nodes().List(ctx, metav1.ListOptions{LabelSelector: kubeenv.LabelNodeKind + "=kwok"})
	require.NoError(t, err)
	assert.Len(t, nodes.Items, kubeenv.FakeNodes)

	ns := env.Namespace(t)
	sc := kubeenv.StorageClass
	_, err = cli.CoreV1().PersistentVolumeClaims(ns).Create(ctx, &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: "data"},
		Spec: corev1.PersistentVolumeClaimSpec{
			StorageClassName: &sc,
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			Resources:        corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}},
		},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	yes, no := true, false
	_, err = cli.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "p"},
		Spec: corev1.PodSpec{
			Tolerations:     []corev1.Toleration{{Key: kubeenv.KwokTaintKey, Operator: corev1.TolerationOpExists}},
			NodeSelector:    map[string]string{kubeenv.LabelNodeKind: "kwok"},
			SecurityContext: &corev1.PodSecurityContext{RunAsNonRoot: &yes, SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault}},
			Containers: []corev1.Container{{
				Name: "c", Image: "example/none:1",
				SecurityContext: &corev1.SecurityContext{AllowPrivilegeEscalation: &no, Capabilities: &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}}},
				VolumeMounts:    []corev1.VolumeMount{{Name: "data", MountPath: "/data"}},
			}},
			Volumes: []corev1.Volume{{Name: "data", VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "data"}}}},
		},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	var pod *corev1.Pod
	testenv.Await(t, 30*time.Second, "pod running", func() error {
		pod, err = cli.CoreV1().Pods(ns).Get(ctx, "p", metav1.GetOptions{})
		require.NoError(t, err)
		return testenv.Check(pod.Status.Phase == corev1.PodRunning, "%+v", pod.Status)
	})
	assert.True(t, strings.HasPrefix(pod.Spec.NodeName, "kwok-node-"))
	claim, err := cli.CoreV1().PersistentVolumeClaims(ns).Get(ctx, "data", metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, corev1.ClaimBound, claim.Status.Phase)
	pv, err := cli.CoreV1().PersistentVolumes().Get(ctx, claim.Spec.VolumeName, metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, []string{pod.Spec.NodeName}, pv.Spec.NodeAffinity.Required.NodeSelectorTerms[0].MatchExpressions[0].Values)
	dir, err := env.VolumeDir(ctx, ns, "data")
	require.NoError(t, err)
	assert.DirExists(t, dir)

	t.Logf("control plane resident memory: %d MB", env.RSS()>>20)
}

// The agent runs a plain pod: env from a secretKeyRef and an envFrom
// secretRef, a claim's directory as its data, a loopback podIP, Ready from
// the readiness probe; deleting the pod stops the process.
func TestAgentPod(t *testing.T) {
	env := kubeenv.Require(t)
	agent := kubeenv.RequireAgent(t)
	ctx := t.Context()
	cli := env.Client
	ns := env.Namespace(t)
	keyHash := strings.Repeat("cd", 32)
	_, err := cli.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "keys"},
		Data:       map[string][]byte{"hash": []byte(keyHash), "ENGINE_LOG_LEVEL": []byte("warn")},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	sc := kubeenv.StorageClass
	_, err = cli.CoreV1().PersistentVolumeClaims(ns).Create(ctx, &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: "brain"},
		Spec: corev1.PersistentVolumeClaimSpec{
			StorageClassName: &sc,
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			Resources:        corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}},
		},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	yes, no := true, false
	health := &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/health", Port: intstr.FromInt32(8000)}}}
	_, err = cli.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "engine"},
		Spec: corev1.PodSpec{
			Tolerations:     []corev1.Toleration{{Key: kubeenv.AgentTaintKey, Operator: corev1.TolerationOpExists}},
			NodeSelector:    map[string]string{kubeenv.LabelNodeKind: "agent"},
			SecurityContext: &corev1.PodSecurityContext{RunAsNonRoot: &yes, SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault}},
			Containers: []corev1.Container{{
				Name: "engine", Image: kubeenv.AgentImage,
				SecurityContext: &corev1.SecurityContext{AllowPrivilegeEscalation: &no, Capabilities: &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}}},
				Ports:           []corev1.ContainerPort{{ContainerPort: 8000}},
				Env: []corev1.EnvVar{
					{Name: "ENGINE_KEY_HASH", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{
						LocalObjectReference: corev1.LocalObjectReference{Name: "keys"}, Key: "hash"}}},
					{Name: "SQLITE_DB_PATH", Value: "/data/brain.sqlite"},
				},
				EnvFrom:        []corev1.EnvFromSource{{SecretRef: &corev1.SecretEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "keys"}}}},
				VolumeMounts:   []corev1.VolumeMount{{Name: "data", MountPath: "/data"}},
				ReadinessProbe: health,
			}},
			Volumes: []corev1.Volume{{Name: "data", VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "brain"}}}},
		},
	}, metav1.CreateOptions{})
	require.NoError(t, err)

	var pod *corev1.Pod
	testenv.Await(t, 30*time.Second, "pod ready", func() error {
		pod, err = cli.CoreV1().Pods(ns).Get(ctx, "engine", metav1.GetOptions{})
		require.NoError(t, err)
		return testenv.Check(ready(pod), "%+v", pod.Status)
	})
	assert.Equal(t, agent.Node(), pod.Spec.NodeName)
	require.True(t, strings.HasPrefix(pod.Status.PodIP, "127."), "loopback podIP, got %q", pod.Status.PodIP)
	resp, err := http.Get("http://" + pod.Status.PodIP + ":8000/health")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	// The key hash came from the secret: the engine accepts no other key.
	req, _ := http.NewRequest(http.MethodGet, "http://"+pod.Status.PodIP+":8000/memories", nil)
	req.Header.Set("X-Engine-Key", "wrong")
	resp, err = http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	dir, err := env.VolumeDir(ctx, ns, "brain")
	require.NoError(t, err)
	assert.FileExists(t, filepath.Join(dir, "brain.sqlite"), "the brain is in the claim's volume")

	pid := agent.Pid(ns, "engine")
	require.NotZero(t, pid)
	require.NoError(t, cli.CoreV1().Pods(ns).Delete(ctx, "engine", metav1.DeleteOptions{}))
	testenv.Await(t, 30*time.Second, "pod removed", func() error {
		_, err := cli.CoreV1().Pods(ns).Get(ctx, "engine", metav1.GetOptions{})
		return testenv.Check(apierrors.IsNotFound(err), "get: %v", err)
	})
	assert.Error(t, syscall.Kill(pid, 0), "the engine process is gone with its pod")
}

func ready(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
