package kubeenv

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"
)

// Annotations of the external-provisioner protocol.
const (
	annStorageProvisioner = "volume.kubernetes.io/storage-provisioner" // set on a claim by the PV controller
	annSelectedNode       = "volume.kubernetes.io/selected-node"       // set on a claim by the scheduler
	annProvisionedBy      = "pv.kubernetes.io/provisioned-by"
)

// runProvisioner serves StorageClass until the environment closes: for a
// pending claim the PV controller handed to Provisioner and the scheduler
// placed on a node, it creates a hostPath volume on that node, pre-bound to
// the claim; for a released volume of ours, it deletes the volume and its
// directory. The PV controller does the binding itself.
func (e *Env) runProvisioner(logf func(string, ...any)) {
	f := informers.NewSharedInformerFactory(e.Client, 5*time.Second)
	pvcs := f.Core().V1().PersistentVolumeClaims().Informer()
	pvs := f.Core().V1().PersistentVolumes().Informer()
	work := make(chan any, 256)
	enqueue := func(obj any) {
		select {
		case work <- obj:
		default: // the periodic resync brings it back
		}
	}
	h := cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueue,
		UpdateFunc: func(_, obj any) { enqueue(obj) },
	}
	_, _ = pvcs.AddEventHandler(h)
	_, _ = pvs.AddEventHandler(h)
	f.Start(e.ctx.Done())
	defer f.Shutdown()
	for {
		select {
		case <-e.ctx.Done():
			return
		case obj := <-work:
			var err error
			switch o := obj.(type) {
			case *corev1.PersistentVolumeClaim:
				err = e.provision(o)
			case *corev1.PersistentVolume:
				err = e.reclaim(o)
			}
			if err != nil && e.ctx.Err() == nil {
				logf("kubeenv provisioner: %v", err)
			}
		}
	}
}

func (e *Env) volumeDir(pvName string) string { return filepath.Join(e.Dir, "volumes", pvName) }

func (e *Env) provision(c *corev1.PersistentVolumeClaim) error {
	if c.Spec.StorageClassName == nil || *c.Spec.StorageClassName != StorageClass ||
		c.Spec.VolumeName != "" || c.DeletionTimestamp != nil || c.Status.Phase != corev1.ClaimPending ||
		c.Annotations[annStorageProvisioner] != Provisioner {
		return nil
	}
	node := c.Annotations[annSelectedNode]
	if node == "" {
		return nil // WaitForFirstConsumer: not yet
	}
	name := "pvc-" + string(c.UID)
	dir := e.volumeDir(name)
	// World-writable like a fresh volume for a non-root engine (the agent
	// runs engines as this process's user).
	if err := os.MkdirAll(dir, 0o777); err != nil {
		return err
	}
	_ = os.Chmod(dir, 0o777)
	size := c.Spec.Resources.Requests[corev1.ResourceStorage]
	hostPathType := corev1.HostPathDirectory
	pv := &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{
			Name:        name,
			Annotations: map[string]string{annProvisionedBy: Provisioner},
		},
		Spec: corev1.PersistentVolumeSpec{
			Capacity:                      corev1.ResourceList{corev1.ResourceStorage: size},
			AccessModes:                   c.Spec.AccessModes,
			PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimDelete,
			StorageClassName:              StorageClass,
			PersistentVolumeSource: corev1.PersistentVolumeSource{
				HostPath: &corev1.HostPathVolumeSource{Path: dir, Type: &hostPathType},
			},
			ClaimRef: &corev1.ObjectReference{
				Kind: "PersistentVolumeClaim", APIVersion: "v1",
				Namespace: c.Namespace, Name: c.Name, UID: c.UID,
			},
			NodeAffinity: &corev1.VolumeNodeAffinity{Required: &corev1.NodeSelector{
				NodeSelectorTerms: []corev1.NodeSelectorTerm{{MatchExpressions: []corev1.NodeSelectorRequirement{{
					Key: "kubernetes.io/hostname", Operator: corev1.NodeSelectorOpIn, Values: []string{node},
				}}}},
			}},
		},
	}
	ctx, cancel := context.WithTimeout(e.ctx, 10*time.Second)
	defer cancel()
	if _, err := e.Client.CoreV1().PersistentVolumes().Create(ctx, pv, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create volume for %s/%s: %w", c.Namespace, c.Name, err)
	}
	return nil
}

func (e *Env) reclaim(pv *corev1.PersistentVolume) error {
	if pv.Annotations[annProvisionedBy] != Provisioner || pv.Status.Phase != corev1.VolumeReleased || pv.DeletionTimestamp != nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(e.ctx, 10*time.Second)
	defer cancel()
	if err := e.Client.CoreV1().PersistentVolumes().Delete(ctx, pv.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("delete released volume %s: %w", pv.Name, err)
	}
	return os.RemoveAll(e.volumeDir(pv.Name))
}

// VolumeDir is the host directory behind a bound claim of StorageClass
// ("" when it is not bound to one of the environment's volumes).
func (e *Env) VolumeDir(ctx context.Context, namespace, claim string) (string, error) {
	c, err := e.Client.CoreV1().PersistentVolumeClaims(namespace).Get(ctx, claim, metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	if c.Spec.VolumeName == "" {
		return "", nil
	}
	pv, err := e.Client.CoreV1().PersistentVolumes().Get(ctx, c.Spec.VolumeName, metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	if pv.Spec.HostPath == nil {
		return "", nil
	}
	return pv.Spec.HostPath.Path, nil
}
