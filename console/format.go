package console

import (
	"encoding/json"
	"fmt"
	"html/template"
	"math"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"

	orch "github.com/enginefleet/orchestrator"
)

// parsePages parses each page template together with the layout.
func parsePages() (map[string]*template.Template, error) {
	names := []string{"login", "error", "overview", "products", "policy", "engines", "engine", "confirm", "operations",
		"operation", "backups", "audit"}
	out := map[string]*template.Template{}
	for _, n := range names {
		t, err := template.New(n).Funcs(funcs).ParseFS(templateFS, "templates/layout.html", "templates/"+n+".html")
		if err != nil {
			return nil, fmt.Errorf("console: template %s: %w", n, err)
		}
		out[n] = t
	}
	return out, nil
}

var funcs = template.FuncMap{
	"ago":      ago,
	"agoPtr":   agoPtr,
	"since":    sinceShort,
	"sinceT":   func(t time.Time) string { return sinceShort(&t) },
	"stateN":   func(m map[orch.State]int, s string) int { return m[orch.State(s)] },
	"stamp":    stamp,
	"stampPtr": stampPtr,
	"bytes":    humanBytes,
	"ms":       humanMS,
	"short":    shortID,
	"meta":     metaText,
	"policy":   policyText,
	"limit":    limitText,
	"states":   func() []orch.State { return orch.States },
	"pct":      pct,
	"add":      func(a, b int) int { return a + b },
	"val": func(p *int) int {
		if p == nil {
			return 0
		}
		return *p
	},
	"opTitle": opTitle,
}

// ago is a duration before now, short ("3m ago"); title text has the stamp.
func ago(t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	d := time.Since(t)
	if d < 0 {
		return "in " + shortDur(-d)
	}
	return shortDur(d) + " ago"
}

func agoPtr(t *time.Time) string {
	if t == nil {
		return "never"
	}
	return ago(*t)
}

// sinceShort is how long since t, without "ago" (idle time, key age).
func sinceShort(t *time.Time) string {
	if t == nil || t.IsZero() {
		return "—"
	}
	return shortDur(time.Since(*t))
}

func shortDur(d time.Duration) string {
	switch {
	case d < time.Second:
		return "now"
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

func stamp(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format("2006-01-02 15:04:05Z")
}

func stampPtr(t *time.Time) string {
	if t == nil {
		return ""
	}
	return stamp(*t)
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return strconv.FormatInt(n, 10) + " B"
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func humanMS(p *int64) string {
	if p == nil {
		return "—"
	}
	if *p < 1000 {
		return fmt.Sprintf("%d ms", *p)
	}
	return fmt.Sprintf("%.1f s", float64(*p)/1000)
}

func shortID(id string) string {
	if len(id) > 8 {
		return id[:8]
	}
	return id
}

// metaText renders audit metadata compactly: key=value, sorted, without
// the operation id (shown as a link where it matters).
func metaText(m map[string]any) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		if k == "operation_id" {
			continue
		}
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		v := m[k]
		var s string
		switch x := v.(type) {
		case string:
			s = x
		case nil:
			s = "null"
		default:
			b, _ := json.Marshal(x)
			s = string(b)
		}
		if len(s) > 120 {
			s = s[:117] + "…"
		}
		parts = append(parts, k+"="+s)
	}
	return strings.Join(parts, " ")
}

func limitText(p *int) string {
	if p == nil {
		return "no limit"
	}
	return strconv.Itoa(*p)
}

func policyText(p orch.Policy) string {
	return "max_engines " + limitText(p.MaxEngines) + ", rate_limit_rpm " + limitText(p.RateLimitRPM)
}

func pct(used, size int) int {
	if size <= 0 {
		return 0
	}
	return int(math.Round(100 * float64(used) / float64(size)))
}

// opTitle names an action for buttons and headings.
func opTitle(kind string) string {
	switch kind {
	case string(orch.OpRotateKey):
		return "Rotate key"
	case string(orch.OpBackup):
		return "Take a backup"
	}
	if kind == "" {
		return ""
	}
	return strings.ToUpper(kind[:1]) + kind[1:]
}

// pager is offset pagination that keeps the page's other query values.
type pager struct {
	Total, Limit, Offset int
	base                 url.Values
	path                 string
}

func newPager(path string, q url.Values, total, limit, offset int) pager {
	return pager{Total: total, Limit: limit, Offset: offset, base: q, path: path}
}

func (p pager) From() int {
	if p.Total == 0 {
		return 0
	}
	return p.Offset + 1
}

func (p pager) To() int { return min(p.Offset+p.Limit, p.Total) }

func (p pager) Page() int  { return p.Offset/p.Limit + 1 }
func (p pager) Pages() int { return max(1, (p.Total+p.Limit-1)/p.Limit) }

func (p pager) url(offset int) string {
	q := url.Values{}
	for k, v := range p.base {
		q[k] = v
	}
	if offset > 0 {
		q.Set("offset", strconv.Itoa(offset))
	} else {
		q.Del("offset")
	}
	if len(q) == 0 {
		return p.path
	}
	return p.path + "?" + q.Encode()
}

func (p pager) Prev() string {
	if p.Offset == 0 {
		return ""
	}
	return p.url(max(0, p.Offset-p.Limit))
}

func (p pager) Next() string {
	if p.Offset+p.Limit >= p.Total {
		return ""
	}
	return p.url(p.Offset + p.Limit)
}

func (p pager) First() string {
	if p.Offset == 0 {
		return ""
	}
	return p.url(0)
}

func (p pager) Last() string {
	last := (p.Pages() - 1) * p.Limit
	if p.Offset >= last {
		return ""
	}
	return p.url(last)
}

// intParam reads a non-negative integer query value, clamped to max.
func intParam(q url.Values, name string, def, max int) int {
	n, err := strconv.Atoi(q.Get(name))
	if err != nil || n < 0 {
		return def
	}
	if n > max {
		return max
	}
	return n
}
