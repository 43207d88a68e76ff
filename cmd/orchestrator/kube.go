package main

import (
	"strings"

	"github.com/enginefleet/orchestrator/backend/kubernetes"
)

// kubeURLTemplate is ORCH_ENGINE_URL_TEMPLATE's (and the probe template's)
// default on the kubernetes backend: the engine's Service through cluster
// DNS, so the URL a product holds survives the pod moving to another node.
const kubeURLTemplate = "http://{service}.{namespace}.svc:8000"

// kubeConfig reads the kubernetes backend's settings (ORCH_KUBE_*,
// KUBECONFIG); bad reports each problem with the variable's name.
func kubeConfig(get func(string) string, bad func(name, format string, args ...any)) kubernetes.Config {
	k := kubernetes.Config{
		Kubeconfig:       get("KUBECONFIG"),
		Namespace:        get("ORCH_KUBE_NAMESPACE"),
		StorageClass:     get("ORCH_KUBE_STORAGE_CLASS"),
		BrainSize:        get("ORCH_KUBE_BRAIN_SIZE"),
		ImagePullSecrets: splitList(get("ORCH_KUBE_IMAGE_PULL_SECRETS")),
	}
	if err := kubernetes.CheckNamespace(k.Namespace); err != nil {
		bad("ORCH_KUBE_NAMESPACE", "%v", err)
	}
	if k.StorageClass != "" {
		if err := kubernetes.CheckObjectName(k.StorageClass); err != nil {
			bad("ORCH_KUBE_STORAGE_CLASS", "%v", err)
		}
	}
	if err := kubernetes.CheckSize(k.BrainSize); err != nil {
		bad("ORCH_KUBE_BRAIN_SIZE", "%v", err)
	}
	for _, s := range k.ImagePullSecrets {
		if err := kubernetes.CheckObjectName(s); err != nil {
			bad("ORCH_KUBE_IMAGE_PULL_SECRETS", "%v", err)
		}
	}
	var err error
	if k.NodeSelector, err = kubernetes.ParseLabels(get("ORCH_KUBE_NODE_SELECTOR")); err != nil {
		bad("ORCH_KUBE_NODE_SELECTOR", "%v", err)
	}
	for _, s := range splitList(get("ORCH_KUBE_TOLERATIONS")) {
		t, err := kubernetes.ParseToleration(s)
		if err != nil {
			bad("ORCH_KUBE_TOLERATIONS", "%v", err)
			continue
		}
		k.Tolerations = append(k.Tolerations, t)
	}
	if c := get("ORCH_KUBE_CATALOG"); c != "" {
		kind, name, ok := strings.Cut(c, ":")
		if !ok || (kind != kubernetes.CatalogPVC && kind != kubernetes.CatalogConfigMap) || kubernetes.CheckObjectName(name) != nil {
			bad("ORCH_KUBE_CATALOG", "must be pvc:<claim> or configmap:<name>, got %q", c)
		} else {
			k.CatalogKind, k.CatalogName = kind, name
		}
	}
	orchPods, err := kubernetes.ParseLabels(get("ORCH_KUBE_ORCHESTRATOR_POD_LABELS"))
	if err != nil || len(orchPods) == 0 {
		// An empty selector would let every pod of the namespace, engines
		// included, reach every engine.
		bad("ORCH_KUBE_ORCHESTRATOR_POD_LABELS", "must be at least one key=value label of the orchestrator's pods")
	}
	k.Orchestrator = kubernetes.Peer{PodLabels: orchPods}
	prodPods, perr := kubernetes.ParseLabels(get("ORCH_KUBE_PRODUCT_POD_LABELS"))
	if perr != nil {
		bad("ORCH_KUBE_PRODUCT_POD_LABELS", "%v", perr)
	}
	prodNS, nerr := kubernetes.ParseLabels(get("ORCH_KUBE_PRODUCT_NAMESPACE_LABELS"))
	if nerr != nil {
		bad("ORCH_KUBE_PRODUCT_NAMESPACE_LABELS", "%v", nerr)
	}
	switch {
	case len(prodNS) > 0:
		k.Products = []kubernetes.Peer{{NamespaceLabels: prodNS, PodLabels: prodPods}}
	case len(prodPods) > 0:
		k.Products = []kubernetes.Peer{{PodLabels: prodPods}} // in the engines' namespace
	}
	return k
}
