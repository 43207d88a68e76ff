package kubernetes

import (
	"context"
	"fmt"
	"io"
	"net"
	"sort"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	orchestrator "github.com/enginefleet/orchestrator"
)

// Start creates the engine's pod from its record and waits, within
// StartTimeout, until the pod is scheduled and its container runs. A pod
// that exists already (running, starting, or restarting after a crash) is
// left alone. An engine never ensured is an error with ErrNotFound.
func (b *Backend) Start(ctx context.Context, engineID string) error {
	if err := validID(engineID); err != nil {
		return fmt.Errorf("start engine: %w", err)
	}
	if err := b.connect(ctx); err != nil {
		return err
	}
	// Live reads: another process may have just ensured or started it.
	name := orchestrator.ContainerName(engineID)
	rec, err := b.client.CoreV1().Secrets(b.cfg.Namespace).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return fmt.Errorf("start engine %s: %w", name, ErrNotFound)
	}
	if err != nil {
		return classify("start engine: get secret", err)
	}
	pod, err := b.client.CoreV1().Pods(b.cfg.Namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return classify("start engine: get pod", err)
	}
	if err == nil {
		switch {
		case pod.DeletionTimestamp != nil, pod.Status.Phase == corev1.PodSucceeded, pod.Status.Phase == corev1.PodFailed:
			// Going away or finished for good: make a new one.
			if err := b.deletePod(ctx, pod, 0); err != nil {
				return fmt.Errorf("start engine: %w", err)
			}
		case pod.Annotations[AnnotationSpecHash] != rec.Annotations[AnnotationSpecHash]:
			return fmt.Errorf("start engine %s: its pod is of another spec (Ensure first)", name)
		default:
			return nil
		}
	}
	created, err := b.client.CoreV1().Pods(b.cfg.Namespace).Create(ctx, b.podFor(rec), metav1.CreateOptions{})
	switch {
	case apierrors.IsAlreadyExists(err):
		// A concurrent Start won.
	case err != nil:
		return classify("create pod", err)
	default:
		b.log.Info("created pod", "engine_id", engineID, "image", rec.Annotations[AnnotationImage])
		waitCache(ctx, b.podInf, b.key(name), seen(created.ResourceVersion))
	}
	if err := b.setRecordState(ctx, engineID, "started", nil); err != nil {
		return err
	}
	return b.waitRunning(ctx, engineID)
}

// waitRunning waits until the engine's container runs (or has run: a
// crash loop is the health sweep's business), naming the cause when it
// does not within StartTimeout.
func (b *Backend) waitRunning(ctx context.Context, engineID string) error {
	name := orchestrator.ContainerName(engineID)
	deadline := time.Now().Add(b.cfg.StartTimeout)
	for {
		pod, err := b.pods.Pods(b.cfg.Namespace).Get(name)
		if err != nil {
			return fmt.Errorf("start engine %s: pod vanished while starting", name)
		}
		if cs := engineStatus(pod); cs != nil {
			if cs.State.Running != nil || cs.State.Terminated != nil || cs.RestartCount > 0 {
				return nil
			}
			if w := cs.State.Waiting; w != nil {
				switch w.Reason {
				case "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull":
					b.abandonPod(ctx, pod)
					return fmt.Errorf("start engine %s: image %s cannot be pulled (%s: %s): %w",
						name, pod.Spec.Containers[0].Image, w.Reason, w.Message, orchestrator.ErrImageUnavailable)
				case "CreateContainerConfigError", "CreateContainerError":
					b.abandonPod(ctx, pod)
					return fmt.Errorf("start engine %s: %s: %s", name, w.Reason, w.Message)
				}
			}
		}
		if time.Now().After(deadline) {
			cause := b.startBlocker(ctx, pod)
			b.abandonPod(ctx, pod)
			if strings.Contains(cause, "claim") {
				return fmt.Errorf("start engine %s: not running after %s: %s: %w", name, b.cfg.StartTimeout, cause, ErrVolumeNotBound)
			}
			return fmt.Errorf("start engine %s: not running after %s: %s", name, b.cfg.StartTimeout, cause)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("start engine %s: %w", name, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// abandonPod removes a pod that cannot start, so that nothing keeps
// pulling or waiting and Inspect says the engine is not running.
func (b *Backend) abandonPod(ctx context.Context, pod *corev1.Pod) {
	cctx, cancel := cleanupCtx(ctx)
	defer cancel()
	if err := b.deletePod(cctx, pod, 0); err != nil {
		b.log.Warn("remove pod that could not start", "pod", pod.Name, "error", err)
	}
	if err := b.setRecordState(cctx, pod.Labels[orchestrator.LabelEngineID], "stopped", nil); err != nil {
		b.log.Warn("record engine state", "pod", pod.Name, "error", err)
	}
}

// startBlocker says why pod is not running: an unbound claim (with the
// claim's last event), an unschedulable pod (the scheduler's message), or
// the container's waiting reason.
func (b *Backend) startBlocker(ctx context.Context, pod *corev1.Pod) string {
	claim := orchestrator.VolumeName(pod.Labels[orchestrator.LabelEngineID])
	var parts []string
	if pvc, err := b.claims.PersistentVolumeClaims(b.cfg.Namespace).Get(claim); err == nil && pvc.Status.Phase != corev1.ClaimBound {
		msg := fmt.Sprintf("brain volume claim %s is %s", claim, pvc.Status.Phase)
		if sc := pvc.Spec.StorageClassName; sc != nil {
			msg += fmt.Sprintf(" (storage class %q)", *sc)
		}
		if ev := b.lastEvent(ctx, "PersistentVolumeClaim", claim); ev != "" {
			msg += ": " + ev
		}
		parts = append(parts, msg)
	}
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodScheduled && c.Status != corev1.ConditionTrue {
			parts = append(parts, fmt.Sprintf("pod not scheduled (%s: %s)", c.Reason, c.Message))
		}
	}
	if pod.Spec.NodeName == "" && len(pod.Status.Conditions) == 0 {
		parts = append(parts, "pod not scheduled (no scheduler has looked at it)")
	}
	if cs := engineStatus(pod); cs != nil && cs.State.Waiting != nil {
		parts = append(parts, fmt.Sprintf("container waiting (%s: %s)", cs.State.Waiting.Reason, cs.State.Waiting.Message))
	}
	if len(parts) == 0 {
		return "pod " + string(pod.Status.Phase)
	}
	return strings.Join(parts, "; ")
}

// lastEvent is the message of the newest event about the named object
// ("" when events cannot be read).
func (b *Backend) lastEvent(ctx context.Context, kind, name string) string {
	evs, err := b.client.CoreV1().Events(b.cfg.Namespace).List(ctx, metav1.ListOptions{
		FieldSelector: "involvedObject.kind=" + kind + ",involvedObject.name=" + name,
	})
	if err != nil || len(evs.Items) == 0 {
		return ""
	}
	sort.Slice(evs.Items, func(i, j int) bool { return eventTime(evs.Items[i]).Before(eventTime(evs.Items[j])) })
	return evs.Items[len(evs.Items)-1].Message
}

func eventTime(e corev1.Event) time.Time {
	switch {
	case !e.LastTimestamp.IsZero():
		return e.LastTimestamp.Time
	case !e.EventTime.IsZero():
		return e.EventTime.Time
	}
	return e.CreationTimestamp.Time
}

// setRecordState writes the record's state (and exit code, when given).
func (b *Backend) setRecordState(ctx context.Context, engineID, state string, exitCode *int) error {
	name := orchestrator.ContainerName(engineID)
	secrets := b.client.CoreV1().Secrets(b.cfg.Namespace)
	for range 5 {
		cur, err := secrets.Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return nil
		}
		if err != nil {
			return classify("get engine secret", err)
		}
		if cur.Annotations[AnnotationState] == state && exitCode == nil {
			return nil
		}
		if cur.Annotations == nil {
			cur.Annotations = map[string]string{}
		}
		cur.Annotations[AnnotationState] = state
		if exitCode != nil {
			cur.Annotations[AnnotationExitCode] = strconv.Itoa(*exitCode)
		} else if state == "started" {
			delete(cur.Annotations, AnnotationExitCode)
		}
		updated, err := secrets.Update(ctx, cur, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) {
			continue
		}
		if err != nil {
			return classify("update engine secret", err)
		}
		waitCache(ctx, b.secInf, b.key(name), seen(updated.ResourceVersion))
		return nil
	}
	return fmt.Errorf("update engine secret %s: still conflicting", name)
}

// Stop deletes the engine's pod with grace to shut down (SIGTERM, then
// SIGKILL) and waits until it is gone; the claim, Secret, Service and
// NetworkPolicy stay. Stopping a stopped or missing engine is a no-op.
func (b *Backend) Stop(ctx context.Context, engineID string, grace time.Duration) error {
	if err := validID(engineID); err != nil {
		return fmt.Errorf("stop engine: %w", err)
	}
	if err := b.connect(ctx); err != nil {
		return err
	}
	name := orchestrator.ContainerName(engineID)
	pod, err := b.client.CoreV1().Pods(b.cfg.Namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return classify("stop engine: get pod", err)
	}
	if err != nil {
		if rec, rerr := b.secrets.Secrets(b.cfg.Namespace).Get(name); rerr == nil && rec.Annotations[AnnotationState] == "started" {
			return b.setRecordState(ctx, engineID, "stopped", nil)
		}
		return nil
	}
	if err := b.deletePod(ctx, pod, grace); err != nil {
		return fmt.Errorf("stop engine: %w", err)
	}
	code := b.lastExitCode(engineID, pod)
	b.log.Info("stopped engine", "engine_id", engineID, "exit_code", code)
	return b.setRecordState(ctx, engineID, "stopped", &code)
}

// lastExitCode is the exit code of the pod's container as last seen (the
// kubelet reports it before the pod goes); 0 when none was reported.
func (b *Backend) lastExitCode(engineID string, pod *corev1.Pod) int {
	// The informer's handlers may run a moment after its store changed.
	for range 6 {
		b.exitMu.Lock()
		code, ok := b.lastExit[string(pod.UID)]
		b.exitMu.Unlock()
		if ok {
			return code
		}
		if cs := engineStatus(pod); cs == nil || cs.State.Running == nil {
			break // nothing ran: nothing will report an exit
		}
		time.Sleep(50 * time.Millisecond)
	}
	if cs := engineStatus(pod); cs != nil && cs.State.Terminated != nil {
		return int(cs.State.Terminated.ExitCode)
	}
	return 0
}

// RemoveContainer deletes the engine's pod (1 s grace), Service,
// NetworkPolicy and Secret; the claim stays. Missing is a no-op.
func (b *Backend) RemoveContainer(ctx context.Context, engineID string) error {
	if err := validID(engineID); err != nil {
		return fmt.Errorf("remove engine: %w", err)
	}
	if err := b.connect(ctx); err != nil {
		return err
	}
	name := orchestrator.ContainerName(engineID)
	if pod, err := b.client.CoreV1().Pods(b.cfg.Namespace).Get(ctx, name, metav1.GetOptions{}); err == nil {
		if pod.Labels[orchestrator.LabelEngineID] != engineID {
			return fmt.Errorf("remove engine: pod %s is not managed for this engine", name)
		}
		if err := b.deletePod(ctx, pod, time.Second); err != nil {
			return fmt.Errorf("remove engine: %w", err)
		}
	} else if !apierrors.IsNotFound(err) {
		return classify("remove engine: get pod", err)
	}
	if err := b.client.CoreV1().Services(b.cfg.Namespace).Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return classify("remove engine: delete service", err)
	}
	if err := b.client.NetworkingV1().NetworkPolicies(b.cfg.Namespace).Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return classify("remove engine: delete network policy", err)
	}
	rec, err := b.client.CoreV1().Secrets(b.cfg.Namespace).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return classify("remove engine: get secret", err)
	}
	if err := b.client.CoreV1().Secrets(b.cfg.Namespace).Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return classify("remove engine: delete secret", err)
	}
	waitCache(ctx, b.secInf, b.key(name), gone(string(rec.UID)))
	b.log.Info("removed engine", "engine_id", engineID)
	return nil
}

// RemoveVolume deletes the brain claim (its volume goes with it under a
// Delete reclaim policy); missing is a no-op. The engine's pod, which
// would hold the claim, is removed first. It waits (30 s at most) until
// the claim is gone.
func (b *Backend) RemoveVolume(ctx context.Context, engineID string) error {
	if err := validID(engineID); err != nil {
		return fmt.Errorf("remove volume: %w", err)
	}
	if err := b.connect(ctx); err != nil {
		return err
	}
	name := orchestrator.VolumeName(engineID)
	claims := b.client.CoreV1().PersistentVolumeClaims(b.cfg.Namespace)
	cur, err := claims.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return classify("remove volume", err)
	}
	if cur.Labels[orchestrator.LabelEngineID] != engineID || cur.Labels[orchestrator.LabelManaged] != "true" {
		return fmt.Errorf("remove volume: claim %s is not managed for this engine", name)
	}
	if pod, err := b.client.CoreV1().Pods(b.cfg.Namespace).Get(ctx, orchestrator.ContainerName(engineID), metav1.GetOptions{}); err == nil {
		if err := b.deletePod(ctx, pod, time.Second); err != nil {
			return fmt.Errorf("remove volume: %w", err)
		}
	}
	if err := claims.Delete(ctx, name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &cur.UID}}); err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		return classify("remove volume", err)
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		c, err := claims.Get(wctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) || (err == nil && c.UID != cur.UID) {
			break
		}
		if wctx.Err() != nil {
			return fmt.Errorf("remove volume: claim %s still terminating after 30s (a pod outside the orchestrator may use it)", name)
		}
		time.Sleep(100 * time.Millisecond)
	}
	waitCache(ctx, b.pvcInf, b.key(name), gone(string(cur.UID)))
	b.log.Info("removed volume", "engine_id", engineID, "claim", name)
	return nil
}

// Inspect reports the engine from the caches: RuntimeMissing when it has
// neither a record nor a pod.
func (b *Backend) Inspect(ctx context.Context, engineID string) (orchestrator.RuntimeInfo, error) {
	info := orchestrator.RuntimeInfo{EngineID: engineID, Name: orchestrator.ContainerName(engineID), State: orchestrator.RuntimeMissing}
	if err := validID(engineID); err != nil {
		return info, fmt.Errorf("inspect engine: %w", err)
	}
	if err := b.connect(ctx); err != nil {
		return info, err
	}
	name := orchestrator.ContainerName(engineID)
	rec, _ := b.secrets.Secrets(b.cfg.Namespace).Get(name)
	pod, _ := b.pods.Pods(b.cfg.Namespace).Get(name)
	if rec == nil && pod == nil {
		return info, nil
	}
	return runtimeInfo(engineID, rec, pod), nil
}

// runtimeInfo merges an engine's record and pod (either may be nil).
func runtimeInfo(engineID string, rec *corev1.Secret, pod *corev1.Pod) orchestrator.RuntimeInfo {
	info := orchestrator.RuntimeInfo{EngineID: engineID, Name: orchestrator.ContainerName(engineID), State: orchestrator.RuntimeCreated}
	var meta metav1.Object
	if rec != nil {
		meta = rec
	} else {
		meta = pod
	}
	info.ProductID = meta.GetLabels()[orchestrator.LabelProductID]
	info.Image = meta.GetAnnotations()[AnnotationImage]
	info.HostPort, _ = strconv.Atoi(meta.GetAnnotations()[AnnotationHostPort])
	info.CreatedAt = meta.GetCreationTimestamp().Time
	if pod == nil {
		switch rec.Annotations[AnnotationState] {
		case "started", "stopped":
			info.State = orchestrator.RuntimeExited
			info.ExitCode, _ = strconv.Atoi(rec.Annotations[AnnotationExitCode])
		}
		return info
	}
	info.CreatedAt = pod.CreationTimestamp.Time
	if info.Image == "" && len(pod.Spec.Containers) > 0 {
		info.Image = pod.Spec.Containers[0].Image
	}
	cs := engineStatus(pod)
	switch {
	case pod.DeletionTimestamp != nil, pod.Status.Phase == corev1.PodSucceeded, pod.Status.Phase == corev1.PodFailed:
		info.State = orchestrator.RuntimeExited
	case cs == nil:
		info.State = orchestrator.RuntimeCreated // not yet scheduled or started
	case cs.State.Running != nil:
		info.State = orchestrator.RuntimeRunning
	case cs.State.Terminated != nil, cs.RestartCount > 0:
		info.State = orchestrator.RuntimeExited // crashed; the kubelet is backing off
	default:
		info.State = orchestrator.RuntimeCreated // waiting for its first start
	}
	if cs != nil {
		t := cs.State.Terminated
		if t == nil && info.State != orchestrator.RuntimeRunning {
			t = cs.LastTerminationState.Terminated
		}
		if t != nil {
			info.ExitCode = int(t.ExitCode)
			info.OOMKilled = t.Reason == "OOMKilled"
		}
	}
	return info
}

// engineStatus is the engine container's status (nil before the kubelet
// reported one).
func engineStatus(pod *corev1.Pod) *corev1.ContainerStatus {
	for i := range pod.Status.ContainerStatuses {
		if pod.Status.ContainerStatuses[i].Name == ContainerName {
			return &pod.Status.ContainerStatuses[i]
		}
	}
	return nil
}

// List returns this node's engines (from records and pods, any state) and
// brain claims (not those being deleted), from the caches.
func (b *Backend) List(ctx context.Context) ([]orchestrator.RuntimeInfo, []orchestrator.VolumeInfo, error) {
	if err := b.connect(ctx); err != nil {
		return nil, nil, err
	}
	ns := b.cfg.Namespace
	recs, err := b.secrets.Secrets(ns).List(labels.Everything())
	if err != nil {
		return nil, nil, fmt.Errorf("list engines: %w", err)
	}
	pods, err := b.pods.Pods(ns).List(labels.Everything())
	if err != nil {
		return nil, nil, fmt.Errorf("list engines: %w", err)
	}
	byID := map[string]*corev1.Secret{}
	for _, r := range recs {
		if id := r.Labels[orchestrator.LabelEngineID]; id != "" && r.Labels[LabelRole] == RoleRecord {
			byID[id] = r
		}
	}
	podByID := map[string]*corev1.Pod{}
	for _, p := range pods {
		if id := p.Labels[orchestrator.LabelEngineID]; id != "" && p.Labels[LabelRole] == RoleEngine {
			podByID[id] = p
		}
	}
	var runtimes []orchestrator.RuntimeInfo
	for id, r := range byID {
		runtimes = append(runtimes, runtimeInfo(id, r, podByID[id]))
	}
	for id, p := range podByID {
		if byID[id] == nil {
			runtimes = append(runtimes, runtimeInfo(id, nil, p))
		}
	}
	sort.Slice(runtimes, func(i, j int) bool { return runtimes[i].EngineID < runtimes[j].EngineID })

	claims, err := b.claims.PersistentVolumeClaims(ns).List(labels.Everything())
	if err != nil {
		return nil, nil, fmt.Errorf("list volumes: %w", err)
	}
	var volumes []orchestrator.VolumeInfo
	for _, c := range claims {
		id := c.Labels[orchestrator.LabelEngineID]
		if id == "" || c.DeletionTimestamp != nil || c.Name != orchestrator.VolumeName(id) {
			continue
		}
		volumes = append(volumes, orchestrator.VolumeInfo{EngineID: id, Name: c.Name, CreatedAt: c.CreationTimestamp.Time})
	}
	sort.Slice(volumes, func(i, j int) bool { return volumes[i].EngineID < volumes[j].EngineID })
	return runtimes, volumes, nil
}

// Address is where the engine's pod serves right now, "podIP:8000"
// (ready or not), or "" when it has no pod or no IP yet. On a cluster,
// products and the orchestrator use the Service (ServiceHost) instead; the
// pod address is for setups without cluster DNS, such as tests.
func (b *Backend) Address(ctx context.Context, engineID string) (string, error) {
	if err := validID(engineID); err != nil {
		return "", err
	}
	if err := b.connect(ctx); err != nil {
		return "", err
	}
	pod, err := b.pods.Pods(b.cfg.Namespace).Get(orchestrator.ContainerName(engineID))
	if err != nil || pod.Status.PodIP == "" || pod.DeletionTimestamp != nil {
		return "", nil
	}
	return net.JoinHostPort(pod.Status.PodIP, strconv.Itoa(EnginePort)), nil
}

// ServiceHost is the engine's stable in-cluster address,
// "engine-<id>.<namespace>.svc:8000".
func (b *Backend) ServiceHost(engineID string) string {
	return fmt.Sprintf("%s.%s.svc:%d", orchestrator.ContainerName(engineID), b.cfg.Namespace, EnginePort)
}

// CopiesData is false: the workers back brains up through the engine's
// HTTP API (orchestrator.DataCopier).
func (b *Backend) CopiesData() bool { return false }

var _ orchestrator.DataCopier = (*Backend)(nil)

// Pause is not available on Kubernetes (no freezer through the API).
func (b *Backend) Pause(context.Context, string) error {
	return fmt.Errorf("pause engine: %w", ErrNotSupported)
}

// Unpause is not available on Kubernetes.
func (b *Backend) Unpause(context.Context, string) error {
	return fmt.Errorf("unpause engine: %w", ErrNotSupported)
}

// CopyDataOut is not available on Kubernetes: back up through the
// engine's GET /memory/export.
func (b *Backend) CopyDataOut(context.Context, string, io.Writer) error {
	return fmt.Errorf("copy brain out: %w (use the engine's GET /memory/export)", ErrNotSupported)
}

// CopyDataIn is not available on Kubernetes: restore through the engine's
// POST /memory/import.
func (b *Backend) CopyDataIn(context.Context, string, string, io.Reader) error {
	return fmt.Errorf("copy brain in: %w (use the engine's POST /memory/import)", ErrNotSupported)
}
