package archtest

import (
	"encoding/json"
	"os/exec"
	"strings"
	"testing"
)

// Only backend/kubernetes (and its test support, internal/kubeenv) import
// the Kubernetes client libraries, as only backend/docker imports the
// Docker SDK.
func TestOnlyKubernetesBackendImportsClientGo(t *testing.T) {
	out, err := exec.Command("go", "list", "-json=ImportPath,Imports,TestImports,XTestImports", mod+"/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for dec.More() {
		var p struct {
			ImportPath                         string
			Imports, TestImports, XTestImports []string
		}
		if err := dec.Decode(&p); err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(p.ImportPath, mod+"/backend/kubernetes") || strings.HasPrefix(p.ImportPath, mod+"/internal/kubeenv") {
			continue
		}
		for _, imp := range append(append(p.Imports, p.TestImports...), p.XTestImports...) {
			if strings.HasPrefix(imp, "k8s.io/") || strings.HasPrefix(imp, "sigs.k8s.io/") {
				t.Errorf("%s imports %s: only backend/kubernetes (and internal/kubeenv) may", p.ImportPath, imp)
			}
		}
	}
}
