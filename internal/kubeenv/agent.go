package kubeenv

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/retry"

	"github.com/enginefleet/orchestrator/internal/testenv"
)

// AgentNode is the name of the node the test node agent serves; it is
// tainted AgentTaintKey=true:NoSchedule so only pods that ask for it (a
// toleration and, to avoid the kwok nodes, a node selector on
// LabelNodeKind=agent) run there.
const (
	AgentNode     = "agent-0"
	AgentTaintKey = "kubeenv.enginefleet.test/agent"
)

// Agent is the test node agent: a fake kubelet for AgentNode that kwok does
// not manage. For every pod bound to the node it runs the engine binary as
// a local process, the way a kubelet would run the pod's one container:
//
//   - environment: env values, valueFrom secretKeyRef / configMapKeyRef /
//     fieldRef, envFrom secretRef / configMapRef, read from the API;
//   - volumes: a claim's mount is the host directory of its bound volume
//     (see VolumeDir), an emptyDir a directory of the pod's own; an env
//     value naming a path under a mount path (SQLITE_DB_PATH=/data/...) is
//     rewritten to the host directory, as the process has no mount
//     namespace;
//   - network: every pod gets an address of its own on the loopback range,
//     127.A.B.N (A, B random per agent), reported as the pod's podIP, and
//     the engine listens there on its container port (ENGINE_LISTEN_ADDR).
//     The API server accepts a loopback podIP (only Endpoints refuse
//     loopback addresses, and the environment runs no endpoint
//     controllers), so a client reaches the pod at podIP:8000 as it would
//     on a cluster network;
//   - status: phase Running, containerStatuses (started, ready,
//     restartCount, state, lastState), the Ready condition from the
//     readiness probe's GET (probed every half second), liveness probes
//     that restart the container;
//   - exits: restartPolicy Always, with a back-off (1 s doubling to 10 s,
//     CrashLoopBackOff while waiting); the last state says the exit code
//     and the reason: OOMKilled when the process was SIGKILLed by someone
//     else (that is how tests stand in for the kernel's OOM killer: the
//     agent sets no memory cgroup), Error or Completed otherwise;
//   - images: when Images is set, a pod whose image is not in it waits
//     with ErrImagePull, then ImagePullBackOff, as with a missing image;
//   - deletion: SIGTERM to the process group, SIGKILL after the pod's
//     grace period, then the pod is removed (delete with grace 0).
type Agent struct {
	env  *Env
	opts AgentOptions
	ipA  int
	ipB  int

	mu     sync.Mutex
	pods   map[types.UID]*agentPod
	nextIP int
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// AgentOptions configure StartAgent.
type AgentOptions struct {
	// EngineBinary is what every pod's container runs (required).
	EngineBinary string
	// Images, when not nil, are the images the node "has"; others fail to
	// pull.
	Images []string
}

// AgentImage and AgentImageNext are the images the shared agent
// (RequireAgent) has, both the engine binary (the second one is what
// upgrade tests move to): pods with any other image fail to pull.
const (
	AgentImage     = "enginefleet/engine:kubeenv"
	AgentImageNext = "enginefleet/engine:kubeenv-2"
)

// RequireAgent returns the shared control plane's agent, starting it on
// first use with the engine binary built from this checkout as AgentImage.
func RequireAgent(t testing.TB) *Agent {
	t.Helper()
	env := Require(t)
	bin := testenv.EngineBinary(t)
	a, err := env.StartAgent(AgentOptions{EngineBinary: bin, Images: []string{AgentImage, AgentImageNext}})
	if err != nil {
		t.Fatalf("start node agent: %v", err)
	}
	return a
}

// StartAgent starts the agent, registering its node; a second call returns
// the running agent.
func (e *Env) StartAgent(opts AgentOptions) (*Agent, error) {
	e.agentMu.Lock()
	defer e.agentMu.Unlock()
	if e.agent != nil {
		return e.agent, nil
	}
	if opts.EngineBinary == "" {
		return nil, errors.New("no engine binary")
	}
	ctx, cancel := context.WithCancel(e.ctx)
	a := &Agent{
		env: e, opts: opts,
		ipA: 100 + rand.IntN(150), ipB: rand.IntN(256), nextIP: 2,
		pods: map[types.UID]*agentPod{}, ctx: ctx, cancel: cancel,
	}
	if err := a.register(ctx); err != nil {
		cancel()
		return nil, err
	}
	f := informers.NewSharedInformerFactoryWithOptions(e.Client, 30*time.Second,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", AgentNode).String()
		}))
	inf := f.Core().V1().Pods().Informer()
	_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { a.sync(obj) },
		UpdateFunc: func(_, obj any) { a.sync(obj) },
		DeleteFunc: func(obj any) {
			if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = d.Obj
			}
			if p, ok := obj.(*corev1.Pod); ok {
				a.forget(p.UID)
			}
		},
	})
	f.Start(ctx.Done())
	a.wg.Go(func() { <-ctx.Done(); f.Shutdown() })
	e.agent = a
	return a, nil
}

// Node is the agent's node name.
func (a *Agent) Node() string { return AgentNode }

func (a *Agent) register(ctx context.Context) error {
	nodes := a.env.Client.CoreV1().Nodes()
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: AgentNode,
			Labels: map[string]string{
				"kubernetes.io/hostname": AgentNode, "kubernetes.io/os": "linux",
				"kubernetes.io/arch": "amd64", LabelNodeKind: "agent",
			},
		},
		Spec: corev1.NodeSpec{Taints: []corev1.Taint{{Key: AgentTaintKey, Value: "true", Effect: corev1.TaintEffectNoSchedule}}},
	}
	if _, err := nodes.Create(ctx, node, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("register node: %w", err)
	}
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := nodes.Get(ctx, AgentNode, metav1.GetOptions{})
		if err != nil {
			return err
		}
		now := metav1.Now()
		res := corev1.ResourceList{
			corev1.ResourceCPU: resource.MustParse("4"), corev1.ResourceMemory: resource.MustParse("8Gi"),
			corev1.ResourcePods: resource.MustParse("50"),
		}
		n.Status = corev1.NodeStatus{
			Capacity: res, Allocatable: res, Phase: corev1.NodeRunning,
			Conditions: []corev1.NodeCondition{{
				Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
				Message: "kubeenv test node agent", LastHeartbeatTime: now, LastTransitionTime: now,
			}},
			Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "127.0.0.1"}, {Type: corev1.NodeHostName, Address: AgentNode}},
			NodeInfo:  corev1.NodeSystemInfo{KubeletVersion: "v1.37.2", OperatingSystem: "linux", Architecture: "amd64", ContainerRuntimeVersion: "kubeenv-agent://1"},
		}
		_, err = nodes.UpdateStatus(ctx, n, metav1.UpdateOptions{})
		return err
	})
}

// agentPod is the agent's record of one pod.
type agentPod struct {
	uid       types.UID
	namespace string
	name      string
	ip        string
	dir       string

	mu         sync.Mutex
	proc       *proc
	killedByUs bool
	started    time.Time
	ready      bool
	restarts   int32
	lastTerm   *corev1.ContainerStateTerminated
	waiting    string // reason while not running
	waitMsg    string
	terminated *corev1.ContainerStateTerminated // final, once deleting
	deleting   bool
	done       chan struct{} // closed when the pod's goroutine ends
	stop       chan struct{} // closed to stop the container (deletion)
	stopGrace  time.Duration
}

func (a *Agent) sync(obj any) {
	pod, ok := obj.(*corev1.Pod)
	if !ok || pod.Spec.NodeName != AgentNode {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.ctx.Err() != nil {
		return
	}
	ap := a.pods[pod.UID]
	if ap == nil {
		if pod.DeletionTimestamp != nil {
			// Never started here (or the agent restarted): just finish it.
			a.wg.Go(func() { a.finalize(pod.Namespace, pod.Name, pod.UID) })
			return
		}
		ip, err := a.allocIP()
		if err != nil {
			return
		}
		ap = &agentPod{
			uid: pod.UID, namespace: pod.Namespace, name: pod.Name, ip: ip,
			dir:  filepath.Join(a.env.Dir, "pods", string(pod.UID)),
			done: make(chan struct{}), stop: make(chan struct{}),
			waiting: "ContainerCreating",
		}
		a.pods[pod.UID] = ap
		a.wg.Go(func() { a.run(ap, pod.DeepCopy()) })
		return
	}
	if pod.DeletionTimestamp != nil {
		ap.mu.Lock()
		if !ap.deleting {
			ap.deleting = true
			ap.stopGrace = 30 * time.Second
			if pod.DeletionGracePeriodSeconds != nil {
				ap.stopGrace = time.Duration(*pod.DeletionGracePeriodSeconds) * time.Second
			}
			close(ap.stop)
		}
		ap.mu.Unlock()
	}
}

// forget handles a pod gone from the API (deleted by someone with grace
// 0, or finalized by the agent): its process must not outlive it.
func (a *Agent) forget(uid types.UID) {
	a.mu.Lock()
	ap := a.pods[uid]
	a.mu.Unlock()
	if ap == nil {
		return
	}
	ap.mu.Lock()
	if !ap.deleting {
		ap.deleting = true
		ap.stopGrace = 0
		close(ap.stop)
	}
	ap.mu.Unlock()
}

// allocIP picks a loopback address whose port 8000 is free (a leftover
// engine of a killed run may still hold one).
func (a *Agent) allocIP() (string, error) {
	for range 250 {
		n := a.nextIP
		a.nextIP++
		if a.nextIP > 254 {
			a.nextIP = 2
		}
		ip := fmt.Sprintf("127.%d.%d.%d", a.ipA, a.ipB, n)
		inUse := false
		for _, p := range a.pods {
			if p.ip == ip {
				inUse = true
			}
		}
		if inUse {
			continue
		}
		l, err := net.Listen("tcp", ip+":8000")
		if err != nil {
			continue
		}
		l.Close()
		return ip, nil
	}
	return "", errors.New("no free loopback address")
}

// run is the life of one pod on the node: start the container, probe it,
// restart it when it exits, stop it when the pod is deleted.
func (a *Agent) run(ap *agentPod, pod *corev1.Pod) {
	defer close(ap.done)
	defer func() {
		a.mu.Lock()
		delete(a.pods, ap.uid)
		a.mu.Unlock()
		os.RemoveAll(ap.dir)
	}()
	if len(pod.Spec.Containers) == 0 {
		return
	}
	c := pod.Spec.Containers[0]
	backoff := time.Second
	pulls := 0
	for {
		if a.stopping(ap) {
			if a.ctx.Err() == nil {
				a.finalize(ap.namespace, ap.name, ap.uid)
			}
			return
		}
		if a.opts.Images != nil && !slices.Contains(a.opts.Images, c.Image) {
			pulls++
			ap.mu.Lock()
			ap.waiting, ap.waitMsg = "ErrImagePull", fmt.Sprintf("failed to pull image %q: not found", c.Image)
			if pulls > 1 {
				ap.waiting, ap.waitMsg = "ImagePullBackOff", fmt.Sprintf("Back-off pulling image %q", c.Image)
			}
			ap.mu.Unlock()
			a.report(ap, pod)
			a.sleep(ap, 2*time.Second)
			continue
		}
		env, err := a.containerEnv(pod, c, ap)
		if err != nil {
			ap.mu.Lock()
			ap.waiting, ap.waitMsg = "CreateContainerConfigError", err.Error()
			ap.mu.Unlock()
			a.report(ap, pod)
			a.sleep(ap, time.Second)
			continue
		}
		p, err := startProc(a.env.Dir, "pod-"+ap.namespace+"-"+ap.name, a.opts.EngineBinary, nil, env, ap.dir)
		if err != nil {
			ap.mu.Lock()
			ap.waiting, ap.waitMsg = "RunContainerError", err.Error()
			ap.mu.Unlock()
			a.report(ap, pod)
			a.sleep(ap, backoff)
			continue
		}
		ap.mu.Lock()
		ap.proc, ap.killedByUs, ap.started, ap.ready, ap.waiting, ap.waitMsg = p, false, time.Now(), false, "", ""
		ap.mu.Unlock()
		a.report(ap, pod)
		a.supervise(ap, pod, c, p)

		term := a.exitState(ap, p)
		ap.mu.Lock()
		ap.proc, ap.ready = nil, false
		deleting := ap.deleting
		if deleting {
			ap.terminated = term
		} else {
			ap.restarts++
			ap.lastTerm = term
			ap.waiting, ap.waitMsg = "CrashLoopBackOff", fmt.Sprintf("back-off %s restarting failed container", backoff)
		}
		ran := time.Since(ap.started)
		ap.mu.Unlock()
		if deleting || a.ctx.Err() != nil {
			if a.ctx.Err() == nil {
				a.report(ap, pod) // the final state, exit code included
				a.finalize(ap.namespace, ap.name, ap.uid)
			}
			return
		}
		a.report(ap, pod)
		if ran > 10*time.Second {
			backoff = time.Second
		}
		a.sleep(ap, backoff)
		backoff = min(2*backoff, 10*time.Second)
	}
}

func (a *Agent) stopping(ap *agentPod) bool {
	ap.mu.Lock()
	defer ap.mu.Unlock()
	return ap.deleting || a.ctx.Err() != nil
}

// sleep waits d unless the pod is being stopped; false when it is.
func (a *Agent) sleep(ap *agentPod, d time.Duration) bool {
	select {
	case <-ap.stop:
		return false
	case <-a.ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}

// supervise probes a running container until it exits, is deleted or fails
// its liveness probe.
func (a *Agent) supervise(ap *agentPod, pod *corev1.Pod, c corev1.Container, p *proc) {
	client := &http.Client{Timeout: time.Second}
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	liveFailures := 0
	for {
		select {
		case <-p.done:
			return
		case <-a.ctx.Done():
			ap.mu.Lock()
			ap.killedByUs = true
			ap.mu.Unlock()
			p.stop(2 * time.Second)
			return
		case <-ap.stop:
			ap.mu.Lock()
			ap.killedByUs = true
			grace := ap.stopGrace
			ap.mu.Unlock()
			p.stop(grace)
			return
		case <-tick.C:
		}
		ready := probe(client, ap.ip, c.ReadinessProbe, true)
		ap.mu.Lock()
		changed := ready != ap.ready
		ap.ready = ready
		since := time.Since(ap.started)
		ap.mu.Unlock()
		if changed {
			a.report(ap, pod)
		}
		if lp := c.LivenessProbe; lp != nil && since > time.Duration(lp.InitialDelaySeconds)*time.Second {
			if probe(client, ap.ip, lp, true) {
				liveFailures = 0
			} else if liveFailures++; liveFailures >= int(max(lp.FailureThreshold, 1))*2 { // probed twice per period
				ap.mu.Lock()
				ap.killedByUs = true
				ap.mu.Unlock()
				p.stop(2 * time.Second)
				return
			}
		}
	}
}

// probe runs an HTTP GET probe against the pod; no probe means def.
func probe(c *http.Client, ip string, p *corev1.Probe, def bool) bool {
	if p == nil || p.HTTPGet == nil {
		return def
	}
	port := p.HTTPGet.Port.IntValue()
	if port == 0 {
		port = 8000
	}
	resp, err := c.Get("http://" + net.JoinHostPort(ip, strconv.Itoa(port)) + p.HTTPGet.Path)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode >= 200 && resp.StatusCode < 400
}

// exitState is the terminated state of a finished container process.
func (a *Agent) exitState(ap *agentPod, p *proc) *corev1.ContainerStateTerminated {
	ap.mu.Lock()
	byUs, started := ap.killedByUs, ap.started
	ap.mu.Unlock()
	code, reason := 0, "Completed"
	if ps := p.cmd.ProcessState; ps != nil {
		if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			code = 128 + int(ws.Signal())
			if ws.Signal() == syscall.SIGKILL && !byUs {
				reason = "OOMKilled"
			}
		} else {
			code = ps.ExitCode()
		}
	}
	if code != 0 && reason == "Completed" {
		reason = "Error"
	}
	return &corev1.ContainerStateTerminated{
		ExitCode: int32(code), Reason: reason,
		StartedAt: metav1.NewTime(started), FinishedAt: metav1.Now(),
		ContainerID: fmt.Sprintf("kubeenv-agent://%d", p.cmd.Process.Pid),
	}
}

// report writes the pod's status as the agent sees it.
func (a *Agent) report(ap *agentPod, pod *corev1.Pod) {
	c := pod.Spec.Containers[0]
	ap.mu.Lock()
	cs := corev1.ContainerStatus{
		Name: c.Name, Image: c.Image, ImageID: "kubeenv-agent://" + c.Image,
		RestartCount: ap.restarts, Ready: ap.ready,
	}
	if ap.lastTerm != nil {
		cs.LastTerminationState.Terminated = ap.lastTerm.DeepCopy()
	}
	running := ap.proc != nil
	switch {
	case running:
		cs.State.Running = &corev1.ContainerStateRunning{StartedAt: metav1.NewTime(ap.started)}
		cs.ContainerID = fmt.Sprintf("kubeenv-agent://%d", ap.proc.cmd.Process.Pid)
		t := true
		cs.Started = &t
	case ap.terminated != nil:
		cs.State.Terminated = ap.terminated.DeepCopy()
	default:
		cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: ap.waiting, Message: ap.waitMsg}
	}
	ready := ap.ready && running
	ap.mu.Unlock()

	cond := func(t corev1.PodConditionType, ok bool) corev1.PodCondition {
		s := corev1.ConditionFalse
		if ok {
			s = corev1.ConditionTrue
		}
		return corev1.PodCondition{Type: t, Status: s}
	}
	ctx, cancel := context.WithTimeout(a.ctx, 10*time.Second)
	defer cancel()
	pods := a.env.Client.CoreV1().Pods(ap.namespace)
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := pods.Get(ctx, ap.name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if cur.UID != ap.uid {
			return nil
		}
		st := cur.Status.DeepCopy()
		st.Phase = corev1.PodRunning
		if !running && ap.restarts == 0 {
			st.Phase = corev1.PodPending
		}
		st.HostIP, st.HostIPs = "127.0.0.1", []corev1.HostIP{{IP: "127.0.0.1"}}
		st.PodIP, st.PodIPs = ap.ip, []corev1.PodIP{{IP: ap.ip}}
		if st.StartTime == nil {
			now := metav1.Now()
			st.StartTime = &now
		}
		st.ContainerStatuses = []corev1.ContainerStatus{cs}
		want := []corev1.PodCondition{
			cond(corev1.PodReadyToStartContainers, true), cond(corev1.PodInitialized, true),
			cond(corev1.ContainersReady, ready), cond(corev1.PodReady, ready),
		}
		for _, w := range want {
			setCondition(st, w)
		}
		cur.Status = *st
		_, err = pods.UpdateStatus(ctx, cur, metav1.UpdateOptions{})
		return err
	})
	if err != nil && !apierrors.IsNotFound(err) && a.ctx.Err() == nil {
		fmt.Fprintf(os.Stderr, "kubeenv agent: status of %s/%s: %v\n", ap.namespace, ap.name, err)
	}
}

func setCondition(st *corev1.PodStatus, c corev1.PodCondition) {
	now := metav1.Now()
	for i := range st.Conditions {
		if st.Conditions[i].Type == c.Type {
			if st.Conditions[i].Status != c.Status {
				st.Conditions[i].Status = c.Status
				st.Conditions[i].LastTransitionTime = now
			}
			return
		}
	}
	c.LastTransitionTime = now
	st.Conditions = append(st.Conditions, c)
}

// finalize removes a deleted pod from the API once its container is gone,
// as the kubelet does.
func (a *Agent) finalize(namespace, name string, uid types.UID) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(a.ctx), 10*time.Second)
	defer cancel()
	zero := int64(0)
	err := a.env.Client.CoreV1().Pods(namespace).Delete(ctx, name, metav1.DeleteOptions{
		GracePeriodSeconds: &zero,
		Preconditions:      &metav1.Preconditions{UID: &uid},
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) && a.env.ctx.Err() == nil {
		fmt.Fprintf(os.Stderr, "kubeenv agent: finalize %s/%s: %v\n", namespace, name, err)
	}
}

// containerEnv is the process environment of c in pod.
func (a *Agent) containerEnv(pod *corev1.Pod, c corev1.Container, ap *agentPod) ([]string, error) {
	ctx, cancel := context.WithTimeout(a.ctx, 10*time.Second)
	defer cancel()
	core := a.env.Client.CoreV1()
	vars := map[string]string{}
	for _, from := range c.EnvFrom {
		switch {
		case from.SecretRef != nil:
			s, err := core.Secrets(pod.Namespace).Get(ctx, from.SecretRef.Name, metav1.GetOptions{})
			if err != nil {
				if apierrors.IsNotFound(err) && from.SecretRef.Optional != nil && *from.SecretRef.Optional {
					continue
				}
				return nil, fmt.Errorf("secret %q: %w", from.SecretRef.Name, err)
			}
			for k, v := range s.Data {
				vars[from.Prefix+k] = string(v)
			}
		case from.ConfigMapRef != nil:
			cm, err := core.ConfigMaps(pod.Namespace).Get(ctx, from.ConfigMapRef.Name, metav1.GetOptions{})
			if err != nil {
				if apierrors.IsNotFound(err) && from.ConfigMapRef.Optional != nil && *from.ConfigMapRef.Optional {
					continue
				}
				return nil, fmt.Errorf("configmap %q: %w", from.ConfigMapRef.Name, err)
			}
			for k, v := range cm.Data {
				vars[from.Prefix+k] = v
			}
		}
	}
	for _, ev := range c.Env {
		if ev.ValueFrom == nil {
			vars[ev.Name] = ev.Value
			continue
		}
		switch vf := ev.ValueFrom; {
		case vf.SecretKeyRef != nil:
			s, err := core.Secrets(pod.Namespace).Get(ctx, vf.SecretKeyRef.Name, metav1.GetOptions{})
			if err != nil {
				if apierrors.IsNotFound(err) && vf.SecretKeyRef.Optional != nil && *vf.SecretKeyRef.Optional {
					continue
				}
				return nil, fmt.Errorf("secret %q: %w", vf.SecretKeyRef.Name, err)
			}
			v, ok := s.Data[vf.SecretKeyRef.Key]
			if !ok && (vf.SecretKeyRef.Optional == nil || !*vf.SecretKeyRef.Optional) {
				return nil, fmt.Errorf("secret %q has no key %q", vf.SecretKeyRef.Name, vf.SecretKeyRef.Key)
			}
			if ok {
				vars[ev.Name] = string(v)
			}
		case vf.ConfigMapKeyRef != nil:
			cm, err := core.ConfigMaps(pod.Namespace).Get(ctx, vf.ConfigMapKeyRef.Name, metav1.GetOptions{})
			if err != nil {
				return nil, fmt.Errorf("configmap %q: %w", vf.ConfigMapKeyRef.Name, err)
			}
			vars[ev.Name] = cm.Data[vf.ConfigMapKeyRef.Key]
		case vf.FieldRef != nil:
			switch vf.FieldRef.FieldPath {
			case "metadata.name":
				vars[ev.Name] = pod.Name
			case "metadata.namespace":
				vars[ev.Name] = pod.Namespace
			case "metadata.uid":
				vars[ev.Name] = string(pod.UID)
			case "spec.nodeName":
				vars[ev.Name] = pod.Spec.NodeName
			case "status.podIP":
				vars[ev.Name] = ap.ip
			}
		}
	}

	mounts, err := a.mounts(ctx, pod, c, ap)
	if err != nil {
		return nil, err
	}
	// Paths under a mount point are rewritten to the host directory,
	// longest mount path first.
	paths := make([]string, 0, len(mounts))
	for p := range mounts {
		paths = append(paths, p)
	}
	sort.Slice(paths, func(i, j int) bool { return len(paths[i]) > len(paths[j]) })
	for k, v := range vars {
		for _, mp := range paths {
			if v == mp || strings.HasPrefix(v, strings.TrimRight(mp, "/")+"/") {
				vars[k] = mounts[mp] + strings.TrimPrefix(v, mp)
				break
			}
		}
	}
	port := 8000
	if len(c.Ports) > 0 {
		port = int(c.Ports[0].ContainerPort)
	}
	vars["ENGINE_LISTEN_ADDR"] = net.JoinHostPort(ap.ip, strconv.Itoa(port))
	if tmp, ok := mounts["/tmp"]; ok {
		vars["TMPDIR"] = tmp
	} else {
		vars["TMPDIR"] = filepath.Join(ap.dir, "tmp")
		_ = os.MkdirAll(vars["TMPDIR"], 0o755)
	}
	vars["KUBEENV_DIR"] = a.env.Dir // lets reapStale find leftovers
	out := make([]string, 0, len(vars))
	for k, v := range vars {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out, nil
}

// mounts maps c's mount paths to host directories.
func (a *Agent) mounts(ctx context.Context, pod *corev1.Pod, c corev1.Container, ap *agentPod) (map[string]string, error) {
	out := map[string]string{}
	for _, m := range c.VolumeMounts {
		var vol *corev1.Volume
		for i := range pod.Spec.Volumes {
			if pod.Spec.Volumes[i].Name == m.Name {
				vol = &pod.Spec.Volumes[i]
			}
		}
		if vol == nil {
			return nil, fmt.Errorf("volume %q not in the pod", m.Name)
		}
		switch {
		case vol.PersistentVolumeClaim != nil:
			dir, err := a.env.VolumeDir(ctx, pod.Namespace, vol.PersistentVolumeClaim.ClaimName)
			if err != nil {
				return nil, fmt.Errorf("claim %q: %w", vol.PersistentVolumeClaim.ClaimName, err)
			}
			if dir == "" {
				return nil, fmt.Errorf("claim %q is not bound to a kubeenv volume", vol.PersistentVolumeClaim.ClaimName)
			}
			out[m.MountPath] = filepath.Join(dir, m.SubPath)
		case vol.EmptyDir != nil:
			dir := filepath.Join(ap.dir, "volumes", m.Name)
			if err := os.MkdirAll(dir, 0o777); err != nil {
				return nil, err
			}
			out[m.MountPath] = dir
		case vol.ConfigMap != nil:
			dir := filepath.Join(ap.dir, "volumes", m.Name)
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return nil, err
			}
			cm, err := a.env.Client.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, vol.ConfigMap.Name, metav1.GetOptions{})
			if err != nil && !(apierrors.IsNotFound(err) && vol.ConfigMap.Optional != nil && *vol.ConfigMap.Optional) {
				return nil, fmt.Errorf("configmap %q: %w", vol.ConfigMap.Name, err)
			}
			if cm != nil {
				for k, v := range cm.Data {
					if err := os.WriteFile(filepath.Join(dir, k), []byte(v), 0o644); err != nil {
						return nil, err
					}
				}
			}
			out[m.MountPath] = dir
		}
	}
	return out, nil
}

// Pid is the pid of the engine process the agent runs for a pod (0 when
// none runs), for tests that kill one behind the agent's back.
func (a *Agent) Pid(namespace, name string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, ap := range a.pods {
		if ap.namespace == namespace && ap.name == name {
			ap.mu.Lock()
			defer ap.mu.Unlock()
			if ap.proc != nil {
				return ap.proc.cmd.Process.Pid
			}
		}
	}
	return 0
}

// stop kills every engine and stops the agent.
func (a *Agent) stop() {
	a.cancel()
	a.wg.Wait()
}
