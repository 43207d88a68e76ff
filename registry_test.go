package orchestrator

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// constsOf returns the values of the constants of type typ declared in
// file: what the code defines, to compare with the registries.
func constsOf(t *testing.T, file, typ string) []string {
	t.Helper()
	f, err := parser.ParseFile(token.NewFileSet(), file, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, d := range f.Decls {
		g, ok := d.(*ast.GenDecl)
		if !ok || g.Tok != token.CONST {
			continue
		}
		for _, s := range g.Specs {
			vs := s.(*ast.ValueSpec)
			if id, ok := vs.Type.(*ast.Ident); !ok || id.Name != typ {
				continue
			}
			for _, v := range vs.Values {
				if lit, ok := v.(*ast.BasicLit); ok && lit.Kind == token.STRING {
					out = append(out, lit.Value[1:len(lit.Value)-1])
				}
			}
		}
	}
	return out
}

// Every Code constant is in Codes (with a status and a description), and
// nothing else is: the openapi enum and docs/api.md are made from Codes.
func TestCodesRegistryIsComplete(t *testing.T) {
	defined := constsOf(t, "errors.go", "Code")
	var registered []string
	for _, c := range Codes {
		registered = append(registered, string(c.Code))
		if c.Status < 400 || c.Status > 599 || http.StatusText(c.Status) == "" {
			t.Errorf("%s: status %d is not an error status", c.Code, c.Status)
		}
		if len(c.When) < 20 {
			t.Errorf("%s: say when it happens", c.Code)
		}
	}
	slices.Sort(defined)
	slices.Sort(registered)
	if !slices.Equal(defined, registered) {
		t.Fatalf("errors.go defines %v, Codes registers %v: add the code to Codes", defined, registered)
	}
	if len(defined) < 20 {
		t.Fatalf("parsed only %d codes", len(defined))
	}
}

// Every Action constant is in Actions with a description, and nothing
// else is.
func TestActionsRegistryIsComplete(t *testing.T) {
	defined := constsOf(t, "audit.go", "Action")
	var registered []string
	for _, a := range Actions {
		registered = append(registered, string(a.Action))
		if len(a.When) < 20 {
			t.Errorf("%s: say when it is written", a.Action)
		}
	}
	slices.Sort(defined)
	slices.Sort(registered)
	if !slices.Equal(defined, registered) {
		t.Fatalf("audit.go defines %v, Actions registers %v: add the action to Actions", defined, registered)
	}
	if len(defined) < 20 {
		t.Fatalf("parsed only %d actions", len(defined))
	}
}

// The repository carries its own contract: nothing points outside it to a
// specification.
func TestNoOutsideSpecReferences(t *testing.T) {
	// Spelled in pieces so this file does not match itself.
	bad := []string{"../" + "shared/", "SPEC" + " §", "SPEC" + ".md"}
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			switch d.Name() {
			case ".git", ".data", ".build", "node_modules", "testdata":
				return filepath.SkipDir
			}
			return nil
		}
		switch filepath.Ext(path) {
		case ".go", ".md", ".yaml", ".yml", ".sql", ".sh", ".example":
		default:
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, s := range bad {
			if strings.Contains(string(b), s) {
				t.Errorf("%s refers to %q: say it in the repository (docs/api.md, docs/engine-contract.md)", path, s)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
