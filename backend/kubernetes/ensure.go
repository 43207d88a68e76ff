package kubernetes

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"

	orchestrator "github.com/enginefleet/orchestrator"
)

// specHashVersion changes whenever the way the pod is built changes, so
// pods made by an older build are replaced.
const specHashVersion = 1

// Ensure writes the engine's Secret, brain claim, Service and
// NetworkPolicy. A pod made from another spec (image, environment, port,
// limits, placement) is deleted, with ReplaceGrace to shut down, and the
// engine is "created" again: Start makes the new pod. A pod of the same
// spec is adopted. The claim is never touched once it exists.
func (b *Backend) Ensure(ctx context.Context, spec orchestrator.EngineSpec) error {
	if err := b.validSpec(spec); err != nil {
		return fmt.Errorf("ensure engine: %w", err)
	}
	if err := b.connect(ctx); err != nil {
		return err
	}
	id := spec.EngineID
	log := b.log.With("engine_id", id)
	if err := b.ensureClaim(ctx, id, spec.ProductID); err != nil {
		return err
	}
	hash := b.specHash(spec)

	// A pod of another spec goes first: its container would pick up the
	// new Secret on its next restart. Read live: another process may have
	// made the pod a moment ago.
	pod, err := b.client.CoreV1().Pods(b.cfg.Namespace).Get(ctx, orchestrator.ContainerName(id), metav1.GetOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return classify("get pod", err)
	}
	if err == nil {
		if pod.Annotations[AnnotationSpecHash] != hash {
			log.Info("replacing pod", "reason", "spec changed")
			if err := b.deletePod(ctx, pod, b.cfg.ReplaceGrace); err != nil {
				return fmt.Errorf("replace pod: %w", err)
			}
		}
	}
	if err := b.ensureSecret(ctx, spec, hash); err != nil {
		return err
	}
	if err := b.ensureService(ctx, id, spec.ProductID); err != nil {
		return err
	}
	return b.ensureNetworkPolicy(ctx, id, spec.ProductID)
}

func (b *Backend) validSpec(spec orchestrator.EngineSpec) error {
	if err := validID(spec.EngineID); err != nil {
		return err
	}
	if spec.Image == "" {
		return errors.New("empty image")
	}
	if spec.HostPort <= 0 || spec.HostPort > 65535 {
		return fmt.Errorf("invalid host port %d", spec.HostPort)
	}
	if spec.Node != "" && spec.Node != b.cfg.Node {
		return fmt.Errorf("engine is on node %q, this backend serves %q", spec.Node, b.cfg.Node)
	}
	if spec.ProductID != "" {
		if errs := validation.IsValidLabelValue(spec.ProductID); len(errs) > 0 {
			return fmt.Errorf("product id %q is not a valid label value", spec.ProductID)
		}
	}
	for k := range spec.Env {
		if errs := validation.IsEnvVarName(k); len(errs) > 0 {
			return fmt.Errorf("environment variable name %q is not valid in a pod", k)
		}
	}
	return nil
}

// specHash summarises everything that goes into the pod, so that a change
// of any of it makes Ensure replace the pod. Env values enter only the
// hash.
func (b *Backend) specHash(spec orchestrator.EngineSpec) string {
	env := make([]string, 0, len(spec.Env))
	for k, v := range spec.Env {
		env = append(env, k+"="+v)
	}
	slices.Sort(env)
	c := b.cfg
	in := struct {
		V                                  int
		Image                              string
		Env                                []string
		HostPort                           int
		ProductID, Node, Namespace         string
		MemoryMB                           int64
		CPUs                               float64
		RequestCPU, RequestMemory, TmpSize string
		CatalogKind, CatalogName           string
		PullSecrets                        []string
		NodeSelector                       map[string]string
		Tolerations                        []Toleration
		Labels                             map[string]string
	}{
		V: specHashVersion, Image: spec.Image, Env: env, HostPort: spec.HostPort,
		ProductID: spec.ProductID, Node: c.Node, Namespace: c.Namespace,
		MemoryMB: c.MemoryMB, CPUs: c.CPUs, RequestCPU: c.RequestCPU, RequestMemory: c.RequestMemory, TmpSize: c.TmpSize,
		CatalogKind: c.CatalogKind, CatalogName: c.CatalogName,
		PullSecrets: c.ImagePullSecrets, NodeSelector: c.NodeSelector, Tolerations: c.Tolerations, Labels: c.Labels,
	}
	j, _ := json.Marshal(in) // plain types: cannot fail
	sum := sha256.Sum256(j)
	return hex.EncodeToString(sum[:16])
}

// ensureClaim creates the brain claim unless it exists.
func (b *Backend) ensureClaim(ctx context.Context, engineID, productID string) error {
	name := orchestrator.VolumeName(engineID)
	if _, err := b.claims.PersistentVolumeClaims(b.cfg.Namespace).Get(name); err == nil {
		return nil
	}
	size, _ := resource.ParseQuantity(b.cfg.BrainSize) // validated
	pvc := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: b.cfg.Namespace, Labels: b.baseLabels(engineID, productID)},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			Resources:   corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: size}},
		},
	}
	if b.cfg.StorageClass != "" {
		sc := b.cfg.StorageClass
		pvc.Spec.StorageClassName = &sc
	}
	created, err := b.client.CoreV1().PersistentVolumeClaims(b.cfg.Namespace).Create(ctx, pvc, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		// Another caller made it, or it exists without our labels (the
		// cache would have it otherwise): refuse a claim we do not own.
		cur, gerr := b.client.CoreV1().PersistentVolumeClaims(b.cfg.Namespace).Get(ctx, name, metav1.GetOptions{})
		if gerr != nil {
			return classify("get brain volume claim", gerr)
		}
		if cur.Labels[orchestrator.LabelEngineID] != engineID || cur.Labels[orchestrator.LabelNode] != b.cfg.Node {
			return fmt.Errorf("brain volume claim %s exists but is not managed for this engine on node %s", name, b.cfg.Node)
		}
		waitCache(ctx, b.pvcInf, b.key(name), seen(cur.ResourceVersion))
		return nil
	}
	if err != nil {
		return classify("create brain volume claim", err)
	}
	b.log.Info("created brain volume claim", "engine_id", engineID, "claim", name)
	waitCache(ctx, b.pvcInf, b.key(name), seen(created.ResourceVersion))
	return nil
}

// ensureSecret makes the engine's Secret hold spec's environment and hash.
// A changed hash resets the record to "created".
func (b *Backend) ensureSecret(ctx context.Context, spec orchestrator.EngineSpec, hash string) error {
	id := spec.EngineID
	name := orchestrator.ContainerName(id)
	data := make(map[string][]byte, len(spec.Env))
	for k, v := range spec.Env {
		data[k] = []byte(v)
	}
	labels := b.baseLabels(id, spec.ProductID)
	labels[LabelRole] = RoleRecord
	secrets := b.client.CoreV1().Secrets(b.cfg.Namespace)
	for range 5 {
		cur, err := secrets.Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			s := &corev1.Secret{
				ObjectMeta: metav1.ObjectMeta{
					Name: name, Namespace: b.cfg.Namespace, Labels: labels,
					Annotations: map[string]string{
						AnnotationSpecHash: hash, AnnotationImage: spec.Image,
						AnnotationHostPort: strconv.Itoa(spec.HostPort), AnnotationState: "created",
					},
				},
				Type: corev1.SecretTypeOpaque,
				Data: data,
			}
			created, err := secrets.Create(ctx, s, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				continue
			}
			if err != nil {
				return classify("create engine secret", err)
			}
			b.log.Info("created engine", "engine_id", id, "image", spec.Image)
			waitCache(ctx, b.secInf, b.key(name), seen(created.ResourceVersion))
			return nil
		}
		if err != nil {
			return classify("get engine secret", err)
		}
		if cur.Labels[orchestrator.LabelManaged] != "true" || cur.Labels[orchestrator.LabelEngineID] != id {
			return fmt.Errorf("secret %s exists but is not managed for this engine", name)
		}
		if cur.Annotations[AnnotationSpecHash] == hash && maps.EqualFunc(cur.Data, data, func(a, b []byte) bool { return string(a) == string(b) }) {
			waitCache(ctx, b.secInf, b.key(name), seen(cur.ResourceVersion))
			return nil // adopted
		}
		cur.Labels = labels
		if cur.Annotations == nil {
			cur.Annotations = map[string]string{}
		}
		cur.Annotations[AnnotationSpecHash] = hash
		cur.Annotations[AnnotationImage] = spec.Image
		cur.Annotations[AnnotationHostPort] = strconv.Itoa(spec.HostPort)
		cur.Annotations[AnnotationState] = "created"
		delete(cur.Annotations, AnnotationExitCode)
		cur.Data, cur.StringData = data, nil
		updated, err := secrets.Update(ctx, cur, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) {
			continue
		}
		if err != nil {
			return classify("update engine secret", err)
		}
		b.log.Info("replaced engine spec", "engine_id", id, "image", spec.Image)
		waitCache(ctx, b.secInf, b.key(name), seen(updated.ResourceVersion))
		return nil
	}
	return fmt.Errorf("update engine secret %s: still conflicting", name)
}

func (b *Backend) ensureService(ctx context.Context, engineID, productID string) error {
	name := orchestrator.ContainerName(engineID)
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: b.cfg.Namespace, Labels: b.baseLabels(engineID, productID)},
		Spec: corev1.ServiceSpec{
			Type:     corev1.ServiceTypeClusterIP,
			Selector: b.engineSelector(engineID),
			Ports: []corev1.ServicePort{{
				Name: "http", Protocol: corev1.ProtocolTCP, Port: EnginePort, TargetPort: intstr.FromInt32(EnginePort),
			}},
		},
	}
	_, err := b.client.CoreV1().Services(b.cfg.Namespace).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return classify("create service", err)
	}
	return nil
}

// engineSelector selects the engine's pod.
func (b *Backend) engineSelector(engineID string) map[string]string {
	return map[string]string{
		orchestrator.LabelManaged:  "true",
		orchestrator.LabelNode:     b.cfg.Node,
		orchestrator.LabelEngineID: engineID,
		LabelRole:                  RoleEngine,
	}
}

// ensureNetworkPolicy creates, or brings up to date, the policy letting
// only the orchestrator and the product peers reach the engine.
func (b *Backend) ensureNetworkPolicy(ctx context.Context, engineID, productID string) error {
	name := orchestrator.ContainerName(engineID)
	tcp := corev1.ProtocolTCP
	port := intstr.FromInt32(EnginePort)
	var from []networkingv1.NetworkPolicyPeer
	for _, p := range append([]Peer{b.cfg.Orchestrator}, b.cfg.Products...) {
		peer := networkingv1.NetworkPolicyPeer{}
		if len(p.PodLabels) > 0 || p.NamespaceLabels == nil {
			peer.PodSelector = &metav1.LabelSelector{MatchLabels: p.PodLabels}
		}
		if p.NamespaceLabels != nil {
			peer.NamespaceSelector = &metav1.LabelSelector{MatchLabels: p.NamespaceLabels}
		}
		from = append(from, peer)
	}
	want := networkingv1.NetworkPolicySpec{
		PodSelector: metav1.LabelSelector{MatchLabels: b.engineSelector(engineID)},
		PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
		Ingress: []networkingv1.NetworkPolicyIngressRule{{
			From:  from,
			Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &port}},
		}},
	}
	j, _ := json.Marshal(want)
	sum := sha256.Sum256(j)
	hash := hex.EncodeToString(sum[:16])
	np := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{
			Name: name, Namespace: b.cfg.Namespace, Labels: b.baseLabels(engineID, productID),
			Annotations: map[string]string{AnnotationSpecHash: hash},
		},
		Spec: want,
	}
	api := b.client.NetworkingV1().NetworkPolicies(b.cfg.Namespace)
	cur, err := api.Get(ctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		if _, err := api.Create(ctx, np, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return classify("create network policy", err)
		}
		return nil
	case err != nil:
		return classify("get network policy", err)
	case cur.Annotations[AnnotationSpecHash] == hash:
		return nil
	}
	cur.Spec, cur.Labels, cur.Annotations = want, np.Labels, np.Annotations
	if _, err := api.Update(ctx, cur, metav1.UpdateOptions{}); err != nil && !apierrors.IsConflict(err) {
		return classify("update network policy", err)
	}
	return nil
}

// podFor builds the engine's pod from its record (the Secret Ensure wrote).
func (b *Backend) podFor(rec *corev1.Secret) *corev1.Pod {
	id := rec.Labels[orchestrator.LabelEngineID]
	name := orchestrator.ContainerName(id)
	labels := b.baseLabels(id, rec.Labels[orchestrator.LabelProductID])
	labels[LabelRole] = RoleEngine
	yes, no := true, false
	uid := int64(EngineUID)
	grace := int64(stopGraceLimit)
	runtimeDefault := &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault}
	health := corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/health", Port: intstr.FromInt32(EnginePort)}}
	tmpSize := resource.MustParse(b.cfg.TmpSize)

	volumes := []corev1.Volume{
		{Name: "data", VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: orchestrator.VolumeName(id)}}},
		{Name: "tmp", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{Medium: corev1.StorageMediumMemory, SizeLimit: &tmpSize}}},
	}
	mounts := []corev1.VolumeMount{{Name: "data", MountPath: DataDir}, {Name: "tmp", MountPath: "/tmp"}}
	switch b.cfg.CatalogKind {
	case CatalogPVC:
		volumes = append(volumes, corev1.Volume{Name: "catalog", VolumeSource: corev1.VolumeSource{
			PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: b.cfg.CatalogName, ReadOnly: true}}})
	case CatalogConfigMap:
		volumes = append(volumes, corev1.Volume{Name: "catalog", VolumeSource: corev1.VolumeSource{
			ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: b.cfg.CatalogName}}}})
	}
	if b.cfg.CatalogKind != CatalogNone {
		mounts = append(mounts, corev1.VolumeMount{Name: "catalog", MountPath: CatalogDir, ReadOnly: true})
	}

	var pullSecrets []corev1.LocalObjectReference
	for _, s := range b.cfg.ImagePullSecrets {
		pullSecrets = append(pullSecrets, corev1.LocalObjectReference{Name: s})
	}
	var tolerations []corev1.Toleration
	for _, t := range b.cfg.Tolerations {
		tolerations = append(tolerations, corev1.Toleration{
			Key: t.Key, Operator: corev1.TolerationOperator(t.Operator), Value: t.Value,
			Effect: corev1.TaintEffect(t.Effect), TolerationSeconds: t.Seconds,
		})
	}

	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: name, Namespace: b.cfg.Namespace, Labels: labels,
			Annotations: map[string]string{
				AnnotationSpecHash: rec.Annotations[AnnotationSpecHash],
				AnnotationImage:    rec.Annotations[AnnotationImage],
				AnnotationHostPort: rec.Annotations[AnnotationHostPort],
			},
		},
		Spec: corev1.PodSpec{
			RestartPolicy:                 corev1.RestartPolicyAlways,
			TerminationGracePeriodSeconds: &grace,
			AutomountServiceAccountToken:  &no,
			EnableServiceLinks:            &no,
			ImagePullSecrets:              pullSecrets,
			NodeSelector:                  b.cfg.NodeSelector,
			Tolerations:                   tolerations,
			SecurityContext: &corev1.PodSecurityContext{
				RunAsNonRoot: &yes, RunAsUser: &uid, RunAsGroup: &uid, FSGroup: &uid,
				SeccompProfile: runtimeDefault,
			},
			Volumes: volumes,
			Containers: []corev1.Container{{
				Name:            ContainerName,
				Image:           rec.Annotations[AnnotationImage],
				ImagePullPolicy: corev1.PullIfNotPresent,
				Ports:           []corev1.ContainerPort{{Name: "http", ContainerPort: EnginePort, Protocol: corev1.ProtocolTCP}},
				EnvFrom:         []corev1.EnvFromSource{{SecretRef: &corev1.SecretEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: name}}}},
				VolumeMounts:    mounts,
				Resources:       b.resources(),
				SecurityContext: &corev1.SecurityContext{
					AllowPrivilegeEscalation: &no,
					Privileged:               &no,
					ReadOnlyRootFilesystem:   &yes,
					RunAsNonRoot:             &yes,
					Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
					SeccompProfile:           runtimeDefault,
				},
				StartupProbe:   &corev1.Probe{ProbeHandler: health, PeriodSeconds: 2, TimeoutSeconds: 2, FailureThreshold: 30},
				ReadinessProbe: &corev1.Probe{ProbeHandler: health, PeriodSeconds: 5, TimeoutSeconds: 2, FailureThreshold: 2},
				LivenessProbe:  &corev1.Probe{ProbeHandler: health, PeriodSeconds: 10, TimeoutSeconds: 3, FailureThreshold: 3},
			}},
		},
	}
}

func (b *Backend) resources() corev1.ResourceRequirements {
	r := corev1.ResourceRequirements{
		Requests: corev1.ResourceList{
			corev1.ResourceCPU:    resource.MustParse(b.cfg.RequestCPU),
			corev1.ResourceMemory: resource.MustParse(b.cfg.RequestMemory),
		},
	}
	if b.cfg.MemoryMB > 0 || b.cfg.CPUs > 0 {
		r.Limits = corev1.ResourceList{}
	}
	if b.cfg.MemoryMB > 0 {
		mem := *resource.NewQuantity(b.cfg.MemoryMB<<20, resource.BinarySI)
		r.Limits[corev1.ResourceMemory] = mem
		r.Requests[corev1.ResourceMemory] = mem
	}
	if b.cfg.CPUs > 0 {
		cpu := *resource.NewMilliQuantity(int64(b.cfg.CPUs*1000), resource.DecimalSI)
		r.Limits[corev1.ResourceCPU] = cpu
		if r.Requests.Cpu().Cmp(cpu) > 0 {
			r.Requests[corev1.ResourceCPU] = cpu
		}
	}
	return r
}

// deletePod deletes pod (this uid only) with grace and waits until it is
// gone from the API (grace plus half a minute at most).
func (b *Backend) deletePod(ctx context.Context, pod *corev1.Pod, grace time.Duration) error {
	secs := int64((grace + time.Second - 1) / time.Second)
	uid := pod.UID
	err := b.client.CoreV1().Pods(b.cfg.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: &secs,
		Preconditions:      &metav1.Preconditions{UID: &uid},
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		return classify("delete pod", err)
	}
	wctx, cancel := context.WithTimeout(ctx, grace+30*time.Second)
	defer cancel()
	for {
		cur, err := b.client.CoreV1().Pods(b.cfg.Namespace).Get(wctx, pod.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) || (err == nil && cur.UID != uid) {
			waitCache(ctx, b.podInf, b.key(pod.Name), gone(string(uid)))
			return nil
		}
		if err != nil && wctx.Err() == nil {
			return classify("wait for pod deletion", err)
		}
		select {
		case <-wctx.Done():
			return fmt.Errorf("pod %s still terminating after %s", pod.Name, grace+30*time.Second)
		case <-time.After(100 * time.Millisecond):
		}
	}
}
