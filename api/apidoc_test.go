package api

import (
	"flag"
	"fmt"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/danielgtaylor/huma/v2"

	orch "github.com/enginefleet/orchestrator"
)

// The tables of docs/api.md (between <!-- generated:NAME --> and
// <!-- end:NAME -->) are made from the code: the routes and the codes
// each answers from the document, the codes and audit actions from their
// registries, the states from the transition table. This fails when they
// are stale (make gen rewrites them) and when the hand-written text omits
// an admit reason.
func TestAPIDocGolden(t *testing.T) {
	const path = "../docs/api.md"
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	doc := document("dev")
	got := string(raw)
	for name, body := range map[string]string{"routes": routesTable(doc), "codes": codesTable(), "actions": actionsTable(),
		"states": statesTable()} {
		re := regexp.MustCompile(`(?s)(<!-- generated:` + name + ` -->\n).*?(<!-- end:` + name + ` -->)`)
		if !re.MatchString(got) {
			t.Fatalf("docs/api.md has no <!-- generated:%s --> … <!-- end:%s --> section", name, name)
		}
		got = re.ReplaceAllLiteralString(got, "<!-- generated:"+name+" -->\n"+body+"<!-- end:"+name+" -->")
	}
	if f := flag.Lookup("update"); f != nil && f.Value.String() == "true" {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		raw = []byte(got)
	}
	if string(raw) != got {
		t.Fatal("docs/api.md is stale: run `make gen`")
	}
	reasons := doc.Components.Schemas.Map()["AdmitBody"].Properties["reason"].Enum
	for _, r := range reasons {
		if !strings.Contains(got, "`"+r.(string)+"`") {
			t.Errorf("docs/api.md does not explain admit reason %s", r)
		}
	}
	if len(reasons) < 3 {
		t.Fatalf("found %d admit reasons", len(reasons))
	}
}

func routesTable(doc *huma.OpenAPI) string {
	type row struct {
		path, method string
		op           *huma.Operation
	}
	var rows []row
	for p, item := range doc.Paths {
		for m, op := range map[string]*huma.Operation{"GET": item.Get, "POST": item.Post, "PUT": item.Put, "DELETE": item.Delete, "PATCH": item.Patch} {
			if op != nil {
				rows = append(rows, row{p, m, op})
			}
		}
	}
	sort.Slice(rows, func(i, j int) bool {
		if rows[i].path != rows[j].path {
			return rows[i].path < rows[j].path
		}
		return rows[i].method < rows[j].method
	})
	var b strings.Builder
	b.WriteString("| Route | Key | Does | Error answers (status: codes) |\n|---|---|---|---|\n")
	for _, r := range rows {
		key := "none"
		switch {
		case hasScheme(r.op, securityAdmin):
			key = "admin"
		case hasScheme(r.op, securityPlatform):
			key = "platform"
		}
		var statuses []string
		for s := range r.op.Responses {
			if s >= "400" && s != "default" {
				statuses = append(statuses, s)
			}
		}
		slices.Sort(statuses)
		var errs []string
		for _, s := range statuses {
			names, _ := r.op.Responses[s].Extensions[errorCodesExt].([]string)
			if len(names) == 0 {
				errs = append(errs, s+" (its own body)")
				continue
			}
			errs = append(errs, s+": "+strings.Join(names, ", "))
		}
		fmt.Fprintf(&b, "| `%s %s` | %s | %s | %s |\n", r.method, r.path, key, strings.ReplaceAll(r.op.Summary, "|", "\\|"), strings.Join(errs, "<br>"))
	}
	return b.String()
}

func codesTable() string {
	var b strings.Builder
	b.WriteString("| Code | Status | When |\n|---|---|---|\n")
	for _, c := range orch.Codes {
		fmt.Fprintf(&b, "| `%s` | %d | %s |\n", c.Code, c.Status, strings.ReplaceAll(c.When, "|", "\\|"))
	}
	return b.String()
}

func actionsTable() string {
	var b strings.Builder
	b.WriteString("| Action | Written when |\n|---|---|\n")
	for _, a := range orch.Actions {
		fmt.Fprintf(&b, "| `%s` | %s |\n", a.Action, a.When)
	}
	return b.String()
}

func statesTable() string {
	var b strings.Builder
	b.WriteString("| From | May become |\n|---|---|\n")
	for _, from := range orch.States {
		var to []string
		for _, s := range orch.States {
			if s != from && orch.CanTransition(from, s) {
				to = append(to, "`"+string(s)+"`")
			}
		}
		fmt.Fprintf(&b, "| `%s` | %s |\n", from, strings.Join(to, ", "))
	}
	return b.String()
}
