package kubernetes

import (
	"fmt"
	"strings"

	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/validation"
)

// The parsers below read the backend's settings in the forms operators
// write them (cmd/orchestrator names the variable in its error), so that
// no other package needs Kubernetes' validation libraries.

// CheckNamespace reports whether s is a valid namespace name.
func CheckNamespace(s string) error {
	if errs := validation.IsDNS1123Label(s); len(errs) > 0 {
		return fmt.Errorf("%q is not a namespace name: %s", s, strings.Join(errs, "; "))
	}
	return nil
}

// CheckObjectName reports whether s is a valid name of a Secret, claim,
// ConfigMap or StorageClass.
func CheckObjectName(s string) error {
	if errs := validation.IsDNS1123Subdomain(s); len(errs) > 0 {
		return fmt.Errorf("%q is not an object name", s)
	}
	return nil
}

// CheckSize reports whether s is a positive quantity (1Gi, 500Mi).
func CheckSize(s string) error {
	if q, err := resource.ParseQuantity(s); err != nil || q.Sign() <= 0 {
		return fmt.Errorf("must be a positive quantity such as 1Gi or 500Mi, got %q", s)
	}
	return nil
}

// ParseLabels reads "k=v,k2=v2" (keys and values as Kubernetes labels).
func ParseLabels(s string) (map[string]string, error) {
	out := map[string]string{}
	for _, kv := range strings.Split(s, ",") {
		if kv = strings.TrimSpace(kv); kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if !ok || len(validation.IsQualifiedName(k)) > 0 || len(validation.IsValidLabelValue(v)) > 0 {
			return nil, fmt.Errorf("%q is not a key=value label", kv)
		}
		out[k] = v
	}
	return out, nil
}

// ParseToleration reads kubectl's taint syntax: "key=value:Effect"
// (operator Equal), "key:Effect" or "key" (operator Exists); Effect is
// NoSchedule, PreferNoSchedule or NoExecute, and "key" alone tolerates
// every effect.
func ParseToleration(s string) (Toleration, error) {
	rest, effect, _ := strings.Cut(s, ":")
	key, value, equal := strings.Cut(rest, "=")
	t := Toleration{Key: key, Value: value, Effect: effect, Operator: "Exists"}
	if equal {
		t.Operator = "Equal"
	}
	switch effect {
	case "", "NoSchedule", "PreferNoSchedule", "NoExecute":
	default:
		return t, fmt.Errorf("%q: effect must be NoSchedule, PreferNoSchedule or NoExecute", s)
	}
	if len(validation.IsQualifiedName(key)) > 0 || (equal && len(validation.IsValidLabelValue(value)) > 0) {
		return t, fmt.Errorf("%q is not key=value:Effect, key:Effect or key", s)
	}
	return t, nil
}
