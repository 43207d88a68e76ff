package console

import (
	"fmt"
	"math"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/schema"
)

// ---- overview: the 3 a.m. screen ----

type overviewData struct {
	Live      Live
	Failed    []schema.ConsoleEngine
	FailedN   int
	Problems  []schema.ConsoleEngine
	ProblemsN int
	InFlight  []schema.ConsoleOperation
	InFlightN int
	FailedOps []schema.ConsoleOperation
	FailedOpN int
	Images    []schema.ImageCount
	Products  []schema.ConsoleProduct
	Recent    []schema.ConsoleAuditEntry
}

func (c *Console) overview(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := queryCtx(r)
	defer cancel()
	scope := sessionFrom(r.Context()).Scope()
	q := schema.New(c.pool)
	var d overviewData
	var err error
	if d.Live, err = c.readLive(ctx, scope); err != nil {
		c.failErr(w, r, err)
		return
	}
	if d.Failed, d.FailedN, err = q.ConsoleEngines(ctx, schema.ConsoleEngineFilter{ProductID: scope, State: orch.StateFailed,
		Sort: schema.ConsoleSortFailures, Limit: 10}); err != nil {
		c.failErr(w, r, err)
		return
	}
	if d.Problems, d.ProblemsN, err = q.ConsoleEngines(ctx, schema.ConsoleEngineFilter{ProductID: scope, Problems: true,
		Sort: schema.ConsoleSortFailures, Limit: 10}); err != nil {
		c.failErr(w, r, err)
		return
	}
	d.Problems = slices.DeleteFunc(d.Problems, func(e schema.ConsoleEngine) bool { return e.Status == orch.StateFailed })
	if d.InFlight, d.InFlightN, err = q.ConsoleOperations(ctx, schema.ConsoleOpFilter{ProductID: scope, Limit: 10}); err != nil {
		c.failErr(w, r, err)
		return
	}
	if d.FailedOps, d.FailedOpN, err = q.ConsoleOperations(ctx, schema.ConsoleOpFilter{ProductID: scope, Failed: true,
		Since: time.Now().Add(-24 * time.Hour), Limit: 10}); err != nil {
		c.failErr(w, r, err)
		return
	}
	f, err := q.ConsoleFacets(ctx, scope)
	if err != nil {
		c.failErr(w, r, err)
		return
	}
	d.Images = f.Images
	if d.Products, err = q.ConsoleProducts(ctx, scope); err != nil {
		c.failErr(w, r, err)
		return
	}
	if d.Recent, err = q.ConsoleAudit(ctx, schema.ConsoleAuditSearch{ProductID: scope, Actions: recentActions, Limit: 12}); err != nil {
		c.failErr(w, r, err)
		return
	}
	c.render(w, r, http.StatusOK, "overview", "Fleet", "overview", d)
}

// ---- products ----

func (c *Console) products(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := queryCtx(r)
	defer cancel()
	ps, err := schema.New(c.pool).ConsoleProducts(ctx, sessionFrom(r.Context()).Scope())
	if err != nil {
		c.failErr(w, r, err)
		return
	}
	c.render(w, r, http.StatusOK, "products", "Products", "products", ps)
}

// ---- engines: server-side filters and pages ----

const enginesPerPage = 50

type enginesData struct {
	F        schema.ConsoleEngineFilter
	Engines  []schema.ConsoleEngine
	Pager    pager
	Products []orch.Product
	Facets   schema.ConsoleFacets
	Sorts    [][2]string
	Took     time.Duration
}

func (c *Console) engines(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	ctx, cancel := queryCtx(r)
	defer cancel()
	scope := sessionFrom(r.Context()).Scope()
	qv := r.URL.Query()
	f := schema.ConsoleEngineFilter{ProductID: qv.Get("product"), State: orch.State(qv.Get("state")), Node: qv.Get("node"),
		Image: qv.Get("image"), Search: strings.TrimSpace(qv.Get("q")), Problems: qv.Get("problems") == "1", Sort: qv.Get("sort"),
		Limit: enginesPerPage, Offset: intParam(qv, "offset", 0, 1_000_000)}
	if scope != "" {
		f.ProductID = scope
	}
	if f.State != "" && !f.State.Valid() {
		f.State = ""
	}
	if f.ProductID != "" && !isUUID(f.ProductID) {
		f.ProductID = ""
	}
	q := schema.New(c.pool)
	d := enginesData{F: f, Sorts: [][2]string{{schema.ConsoleSortNewest, "newest first"}, {schema.ConsoleSortUser, "user id"},
		{schema.ConsoleSortHealth, "stalest health check"}, {schema.ConsoleSortIdle, "longest idle"},
		{schema.ConsoleSortFailures, "most failures"}}}
	var total int
	var err error
	if d.Engines, total, err = q.ConsoleEngines(ctx, f); err != nil {
		c.failErr(w, r, err)
		return
	}
	if d.Facets, err = q.ConsoleFacets(ctx, scope); err != nil {
		c.failErr(w, r, err)
		return
	}
	if scope == "" {
		if d.Products, _, err = q.ListProducts(ctx, 1000, 0); err != nil {
			c.failErr(w, r, err)
			return
		}
	}
	base := url.Values{}
	for _, k := range []string{"product", "state", "node", "image", "q", "problems", "sort"} {
		if v := qv.Get(k); v != "" {
			base.Set(k, v)
		}
	}
	d.Pager = newPager(Path+"/engines", base, total, f.Limit, f.Offset)
	d.Took = time.Since(start).Round(time.Millisecond)
	c.render(w, r, http.StatusOK, "engines", "Engines", "engines", d)
}

// ---- one engine ----

type engineData struct {
	E         schema.ConsoleEngine
	Focus     *OperationLive // the operation the page was opened for (?op=)
	Ops       []OperationLive
	Timeline  []orch.AuditEntry
	Backups   []schema.Backup
	BackupsN  int
	Health    healthChart
	Actions   []string
	InFlight  bool
	Gone      bool
	HealthWin string
}

func (c *Console) engine(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := queryCtx(r)
	defer cancel()
	scope := sessionFrom(r.Context()).Scope()
	id := r.PathValue("id")
	q := schema.New(c.pool)
	var d engineData
	es, _, err := q.ConsoleEngines(ctx, schema.ConsoleEngineFilter{ProductID: scope, Search: id, Limit: 5})
	if err != nil {
		c.failErr(w, r, err)
		return
	}
	for _, e := range es {
		if e.ID == id {
			d.E = e
		}
	}
	now := time.Now()
	if opID := r.URL.Query().Get("op"); opID != "" {
		if o, err := q.ConsoleOperation(ctx, scope, opID); err == nil && o.EngineID == id {
			l := c.opLive(o, now)
			d.Focus = &l
		}
	}
	if d.E.ID == "" {
		if d.Focus == nil {
			c.fail(w, r, http.StatusNotFound, "There is no engine "+id+" (destroyed engines are gone; their audit rows stay: search the audit log).")
			return
		}
		d.Gone = true
		d.E.ID = id
		c.render(w, r, http.StatusOK, "engine", "Engine "+shortID(id), "engines", d)
		return
	}
	ops, err := q.ConsoleEngineOperations(ctx, id, 20)
	if err != nil {
		c.failErr(w, r, err)
		return
	}
	for _, o := range ops {
		d.Ops = append(d.Ops, c.opLive(o, now))
		if !o.Status.Done() {
			d.InFlight = true
		}
	}
	if d.Timeline, err = q.ConsoleUserAudit(ctx, d.E.ProductID, d.E.UserID, timelineActions, now.Add(-30*24*time.Hour), 100); err != nil {
		c.failErr(w, r, err)
		return
	}
	health, err := q.ConsoleUserAudit(ctx, d.E.ProductID, d.E.UserID, healthActions, now.Add(-24*time.Hour), 500)
	if err != nil {
		c.failErr(w, r, err)
		return
	}
	d.Health = newHealthChart(health, d.E.ID, now)
	if d.Backups, d.BackupsN, err = q.ListUserBackups(ctx, d.E.ProductID, d.E.UserID, 10, 0); err != nil {
		c.failErr(w, r, err)
		return
	}
	d.Actions = actionsFor(d.E.Status)
	c.render(w, r, http.StatusOK, "engine", d.E.UserID+" · engine", "engines", d)
}

// timelineActions is everything but the sampled health checks (those are
// the health history).
var timelineActions = func() []string {
	var out []string
	for _, a := range []orch.Action{orch.ActionProvision, orch.ActionProvisionFailed, orch.ActionStart, orch.ActionStop,
		orch.ActionWake, orch.ActionSleep, orch.ActionRestart, orch.ActionUpgrade, orch.ActionDestroy, orch.ActionRotateKey,
		orch.ActionHealthFailed, orch.ActionAutoRestartStart, orch.ActionAutoRestartSuccess, orch.ActionAutoRestartFailed,
		orch.ActionAutoRestartGaveUp, orch.ActionAdmitDenied, orch.ActionBackup, orch.ActionRestore, orch.ActionReconcile,
		orch.ActionAdminRequest} {
		out = append(out, string(a))
	}
	return out
}()

// recentActions are the overview's "what just happened": the timeline's
// actions without refused admits, plus the product changes.
var recentActions = append(slices.DeleteFunc(slices.Clone(timelineActions), func(a string) bool {
	return a == string(orch.ActionAdmitDenied)
}), string(orch.ActionPolicyRegister), string(orch.ActionPolicyUpdate), string(orch.ActionPlatformKeyRotated))

var healthActions = []string{string(orch.ActionHealthCheck), string(orch.ActionHealthFailed), string(orch.ActionAutoRestartStart),
	string(orch.ActionAutoRestartSuccess), string(orch.ActionAutoRestartFailed), string(orch.ActionAutoRestartGaveUp)}

// actionsFor lists the actions the engine page offers in a state (the
// operations themselves decide; this only hides what would be refused).
func actionsFor(s orch.State) []string {
	switch s {
	case orch.StateRunning:
		return []string{"restart", "stop", "rotate_key", "backup", "destroy"}
	case orch.StateSleeping:
		return []string{"start", "restart", "stop", "backup", "destroy"}
	case orch.StateStopped:
		return []string{"start", "backup", "destroy"}
	case orch.StateFailed:
		return []string{"restart", "start", "stop", "backup", "destroy"}
	}
	return []string{"destroy"}
}

// healthChart is an engine's last 24 h of probes, drawn by the template
// as inline SVG: one dot per sampled check (height = probe time, red when
// it failed), a line per engine marked failed and per auto-restart.
type healthChart struct {
	W, H    int
	Dots    []healthDot
	Marks   []healthMark
	Checks  int
	Fails   int
	MaxMS   int64
	Summary string
}

type healthDot struct {
	X, Y  float64
	OK    bool
	Title string
}

type healthMark struct {
	X     float64
	Class string
	Title string
}

func newHealthChart(rows []orch.AuditEntry, engineID string, now time.Time) healthChart {
	h := healthChart{W: 720, H: 120, MaxMS: 100}
	from := now.Add(-24 * time.Hour)
	x := func(t time.Time) float64 {
		return math.Round(float64(h.W)*t.Sub(from).Seconds()/(24*3600)*10) / 10
	}
	for _, e := range rows { // the scale is the passing probes' (failures are drawn at the top)
		if ok, _ := e.Metadata["ok"].(bool); ok && e.Action == orch.ActionHealthCheck && e.DurationMS != nil && *e.DurationMS > h.MaxMS {
			h.MaxMS = *e.DurationMS
		}
	}
	for _, e := range rows {
		if e.EngineID != "" && e.EngineID != engineID {
			continue // an earlier engine of this user
		}
		switch e.Action {
		case orch.ActionHealthCheck:
			ok, _ := e.Metadata["ok"].(bool)
			if _, crash := e.Metadata["reason"]; crash {
				ok = false
			}
			var ms int64
			if e.DurationMS != nil {
				ms = *e.DurationMS
			}
			y := float64(h.H-10) - float64(h.H-20)*float64(min(ms, h.MaxMS))/float64(h.MaxMS)
			if !ok {
				y = 8
				h.Fails++
			}
			h.Checks++
			title := fmt.Sprintf("%s: %s, %d ms", stamp(e.Timestamp), map[bool]string{true: "ok", false: "failed"}[ok], ms)
			if s, _ := e.Metadata["error"].(string); s != "" {
				title += " — " + s
			}
			h.Dots = append(h.Dots, healthDot{X: x(e.Timestamp), Y: math.Round(y*10) / 10, OK: ok, Title: title})
		default:
			class := "mark-restart"
			if e.Action == orch.ActionHealthFailed || e.Action == orch.ActionAutoRestartGaveUp || e.Action == orch.ActionAutoRestartFailed {
				class = "mark-failed"
			}
			h.Marks = append(h.Marks, healthMark{X: x(e.Timestamp), Class: class, Title: stamp(e.Timestamp) + ": " + string(e.Action) + " " + metaText(e.Metadata)})
		}
	}
	h.Summary = fmt.Sprintf("%d sampled health checks in the last 24 hours, %d failed; %d failure and restart events.", h.Checks, h.Fails, len(h.Marks))
	return h
}

// ---- operations ----

type operationsData struct {
	Failed bool
	Kind   string
	Ops    []schema.ConsoleOperation
	Pager  pager
	Kinds  []orch.OpKind
}

func (c *Console) operations(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := queryCtx(r)
	defer cancel()
	qv := r.URL.Query()
	f := schema.ConsoleOpFilter{ProductID: sessionFrom(r.Context()).Scope(), Failed: qv.Get("view") == "failed",
		Kind: orch.OpKind(qv.Get("kind")), Limit: 50, Offset: intParam(qv, "offset", 0, 1_000_000)}
	ops, total, err := schema.New(c.pool).ConsoleOperations(ctx, f)
	if err != nil {
		c.failErr(w, r, err)
		return
	}
	base := url.Values{}
	if f.Failed {
		base.Set("view", "failed")
	}
	if f.Kind != "" {
		base.Set("kind", string(f.Kind))
	}
	d := operationsData{Failed: f.Failed, Kind: string(f.Kind), Ops: ops, Pager: newPager(Path+"/operations", base, total, f.Limit, f.Offset),
		Kinds: []orch.OpKind{orch.OpProvision, orch.OpStart, orch.OpStop, orch.OpRestart, orch.OpWake, orch.OpRotateKey,
			orch.OpUpgrade, orch.OpDestroy, orch.OpBackup, orch.OpRestore}}
	c.render(w, r, http.StatusOK, "operations", "Operations", "operations", d)
}

type operationData struct {
	Op   OperationLive
	O    orch.Operation
	Gone bool
}

func (c *Console) operation(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := queryCtx(r)
	defer cancel()
	scope := sessionFrom(r.Context()).Scope()
	q := schema.New(c.pool)
	o, err := q.ConsoleOperation(ctx, scope, r.PathValue("id"))
	if err != nil {
		c.failErr(w, r, err)
		return
	}
	_, _, err = q.ConsoleEngine(ctx, "", o.EngineID)
	d := operationData{Op: c.opLive(o, time.Now()), O: o, Gone: orch.IsCode(err, orch.CodeEngineNotFound)}
	c.render(w, r, http.StatusOK, "operation", opTitle(string(o.Kind))+" · operation", "operations", d)
}

// ---- backups ----

type backupsData struct {
	User    string
	Backups []schema.ConsoleBackup
	Pager   pager
	Sum     schema.ConsoleBackupSummary
}

func (c *Console) backups(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := queryCtx(r)
	defer cancel()
	qv := r.URL.Query()
	f := schema.ConsoleBackupFilter{ProductID: sessionFrom(r.Context()).Scope(), UserID: strings.TrimSpace(qv.Get("user")),
		Limit: 50, Offset: intParam(qv, "offset", 0, 1_000_000)}
	if f.ProductID == "" && isUUID(qv.Get("product")) {
		f.ProductID = qv.Get("product")
	}
	bs, total, sum, err := schema.New(c.pool).ConsoleBackups(ctx, f)
	if err != nil {
		c.failErr(w, r, err)
		return
	}
	base := url.Values{}
	if f.UserID != "" {
		base.Set("user", f.UserID)
	}
	c.render(w, r, http.StatusOK, "backups", "Backups", "backups",
		backupsData{User: f.UserID, Backups: bs, Sum: sum, Pager: newPager(Path+"/backups", base, total, f.Limit, f.Offset)})
}

// ---- audit search ----

type auditData struct {
	F       url.Values
	Rows    []schema.ConsoleAuditEntry
	Next    string
	Actions []string
	Error   string
}

// auditActions are the actions the search offers.
var auditActions = append(slices.Clone(timelineActions), string(orch.ActionHealthCheck), string(orch.ActionPolicyRegister),
	string(orch.ActionPolicyUpdate), string(orch.ActionPlatformKeyRotated), string(orch.ActionMasterKeyRotated))

func (c *Console) audit(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := queryCtx(r)
	defer cancel()
	qv := r.URL.Query()
	s := schema.ConsoleAuditSearch{ProductID: sessionFrom(r.Context()).Scope(), UserID: strings.TrimSpace(qv.Get("user")),
		EngineID: strings.TrimSpace(qv.Get("engine")), Actor: strings.TrimSpace(qv.Get("actor")), Limit: 50}
	d := auditData{F: qv, Actions: auditActions}
	if a := qv.Get("action"); a != "" {
		s.Actions = []string{a}
	}
	if s.ProductID == "" && isUUID(qv.Get("product")) {
		s.ProductID = qv.Get("product")
	}
	if b, err := strconv.ParseInt(qv.Get("before"), 10, 64); err == nil && b > 0 {
		s.BeforeID = b
	}
	for name, dst := range map[string]**time.Time{"since": &s.Since, "until": &s.Until} {
		v := strings.TrimSpace(qv.Get(name))
		if v == "" {
			continue
		}
		t, err := parseWhen(v)
		if err != nil {
			d.Error = fmt.Sprintf("%s: %q is neither a time (2006-01-02 or 2006-01-02T15:04, UTC) nor a duration like 2h", name, v)
			c.render(w, r, http.StatusBadRequest, "audit", "Audit", "audit", d)
			return
		}
		*dst = &t
	}
	rows, err := schema.New(c.pool).ConsoleAudit(ctx, s)
	if err != nil {
		c.failErr(w, r, err)
		return
	}
	d.Rows = rows
	if len(rows) == s.Limit {
		next := url.Values{}
		for k, v := range qv {
			next[k] = v
		}
		next.Set("before", strconv.FormatInt(rows[len(rows)-1].ID, 10))
		d.Next = Path + "/audit?" + next.Encode()
	}
	c.render(w, r, http.StatusOK, "audit", "Audit", "audit", d)
}

// parseWhen reads a time (UTC date, date and minute, RFC 3339) or a
// duration before now ("2h").
func parseWhen(v string) (time.Time, error) {
	if d, err := time.ParseDuration(v); err == nil {
		return time.Now().Add(-d), nil
	}
	for _, layout := range []string{time.RFC3339, "2006-01-02T15:04", "2006-01-02 15:04", "2006-01-02"} {
		if t, err := time.ParseInLocation(layout, v, time.UTC); err == nil {
			return t, nil
		}
	}
	return time.Time{}, fmt.Errorf("bad time %q", v)
}

func isUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i, c := range s {
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
				return false
			}
		}
	}
	return true
}
