package console

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/schema"
)

// Actions from the console: the engine page links each action to a
// confirmation page (it works without the script, and a key press cannot
// destroy anything by accident); the confirmation posts the form with the
// session's CSRF token; the answer redirects to the engine page (or, for a
// destroy, the operation's page), which follows the operation.

// engineActions are the actions the engine page offers, with what their
// confirmation says.
var engineActions = map[string]string{
	"start":      "Start the engine (boots it and waits for its health check).",
	"stop":       "Stop the engine: SIGTERM, up to 30 s grace, then SIGKILL. Its brain volume is kept; its users are refused until it is started.",
	"restart":    "Restart the engine: its users lose their connections for the few seconds it takes to boot again. A pending auto-restart is replaced.",
	"rotate_key": "Rotate the engine's key: the engine is recreated with a new key; the previous key keeps working for the overlap window. The product reads the new key from GET /engines/{user_id}; the console never shows it.",
	"backup":     "Take a backup of the engine's brain now (the engine is frozen for well under a second).",
	"restore":    "Restore this backup into the engine: it is stopped, its current brain is kept as a safety copy, the backup's brain replaces it and the engine boots. If it does not come up, the previous brain is put back.",
	"destroy":    "Destroy the engine: its process or container, its brain volume, its port and its row. Irreversible: backups are kept (retention permitting) and can be restored into a new engine of this user.",
}

type confirmData struct {
	E       orch.Engine
	Slug    string
	Action  string
	Says    string
	Backup  *schema.Backup
	Error   string
	Confirm string // destroy: what was typed
}

func (c *Console) confirm(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := queryCtx(r)
	defer cancel()
	action := r.URL.Query().Get("action")
	d, ok := c.confirmData(ctx, w, r, action, r.URL.Query().Get("backup"))
	if !ok {
		return
	}
	c.render(w, r, http.StatusOK, "confirm", opTitle(action)+" · "+d.E.UserID, "engines", d)
}

// confirmData loads what a confirmation shows; it answers the request
// itself (and returns false) when the engine, action or backup is unknown.
func (c *Console) confirmData(ctx context.Context, w http.ResponseWriter, r *http.Request, action, backupID string) (confirmData, bool) {
	says, known := engineActions[action]
	if !known {
		c.fail(w, r, http.StatusBadRequest, fmt.Sprintf("There is no action %q.", action))
		return confirmData{}, false
	}
	e, slug, err := schema.New(c.pool).ConsoleEngine(ctx, "", r.PathValue("id"))
	if err != nil {
		c.failErr(w, r, err)
		return confirmData{}, false
	}
	d := confirmData{E: e, Slug: slug, Action: action, Says: says}
	if action == "restore" {
		b, err := schema.New(c.pool).UserBackup(ctx, e.ProductID, e.UserID, backupID)
		if err != nil {
			c.failErr(w, r, err)
			return confirmData{}, false
		}
		d.Backup = &b
	}
	return d, true
}

// act runs a confirmed action through Actions and records who asked.
func (c *Console) act(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	s := sessionFrom(r.Context())
	action := r.PostFormValue("action")
	d, ok := c.confirmData(ctx, w, r, action, r.PostFormValue("backup_id"))
	if !ok {
		return
	}
	e := d.E
	if action == "destroy" && strings.TrimSpace(r.PostFormValue("confirm")) != e.UserID {
		d.Error = "Type the engine's user id exactly to destroy it."
		d.Confirm = r.PostFormValue("confirm")
		c.render(w, r, http.StatusBadRequest, "confirm", "Destroy · "+e.UserID, "engines", d)
		return
	}
	var opID string
	var err error
	switch action {
	case "backup":
		opID, err = c.actions.Backup(ctx, e.ProductID, e.UserID, orch.ActorAdmin)
	case "restore":
		opID, err = c.actions.Restore(ctx, e.ProductID, e.UserID, d.Backup.ID, orch.ActorAdmin)
	default:
		opID, err = c.actions.Operate(ctx, e.ProductID, e.UserID, orch.OpKind(action), orch.ActorAdmin)
	}
	meta := map[string]any{"via": "console", "request": action}
	if d.Backup != nil {
		meta["backup_id"] = d.Backup.ID
	}
	c.auditRequest(e.ProductID, e.UserID, e.ID, s, meta, opID, err)
	if err != nil {
		d.Error = fmt.Sprintf("%s: %s", orch.ErrorCode(err), errText(err))
		if orch.ErrorCode(err) == orch.CodeInternal {
			c.log.Error("console action", "action", action, "engine_id", e.ID, "error", err)
		}
		c.render(w, r, statusOf(orch.ErrorCode(err)), "confirm", opTitle(action)+" · "+e.UserID, "engines", d)
		return
	}
	c.log.Info("console action", "action", action, "engine_id", e.ID, "operation_id", opID, "operator", s.Operator)
	if action == "destroy" {
		http.Redirect(w, r, Path+"/operations/"+opID, http.StatusSeeOther)
		return
	}
	http.Redirect(w, r, Path+"/engines/"+e.ID+"?op="+opID, http.StatusSeeOther)
}

// auditRequest writes the admin_request row of an action: who asked
// (actor admin, the operator's name), what, through the console, and the
// operation it started or the code it was refused with. It is written
// after the operation's transaction (the Actions boundary has its own);
// a failure to write it is logged, the action stands.
func (c *Console) auditRequest(productID, userID, engineID string, s *session, meta map[string]any, opID string, err error) {
	if s.Operator != "" {
		meta["operator"] = s.Operator
	}
	if opID != "" {
		meta["operation_id"] = opID
	}
	if err != nil {
		meta["outcome"] = "refused"
		meta["error_code"] = string(orch.ErrorCode(err))
	} else {
		meta["outcome"] = "accepted"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	aerr := schema.New(c.pool).InsertAudit(ctx, orch.AuditEntry{ProductID: productID, UserID: userID, EngineID: engineID,
		Action: orch.ActionAdminRequest, Actor: orch.ActorAdmin, Metadata: meta})
	if aerr != nil {
		c.log.Error("console audit", "request", meta["request"], "error", aerr)
	}
}

// errText is a domain error's caller-safe message.
func errText(err error) string {
	var de *orch.Error
	if errors.As(err, &de) && de.Code != orch.CodeInternal {
		return de.Message
	}
	return "internal error (see the API's log)"
}

// ---- product policy (freeze = cordon: no new engines) ----

type policyData struct {
	P          orch.Product
	FrozenFrom *int
	Max        string
	RPM        string
	Error      string
	Preset     string // what the preset button does, said before applying
}

func (c *Console) policyPage(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := queryCtx(r)
	defer cancel()
	ps, err := schema.New(c.pool).ConsoleProducts(ctx, r.PathValue("id"))
	if err == nil && len(ps) == 0 {
		err = orch.Errorf(orch.CodeProductNotFound, "product not found")
	}
	if err != nil {
		c.failErr(w, r, err)
		return
	}
	p := ps[0]
	d := policyData{P: p.Product, FrozenFrom: p.FrozenFrom, Max: intText(p.Policy.MaxEngines), RPM: intText(p.Policy.RateLimitRPM)}
	switch r.URL.Query().Get("preset") {
	case "freeze":
		d.Max = "0"
		d.Preset = "Freeze: max_engines 0. The product's engines keep running; new engines (provision, admit with auto_provision) are refused with QUOTA_EXCEEDED until it is lifted."
	case "unfreeze":
		d.Max = intText(p.FrozenFrom)
		d.Preset = "Unfreeze: max_engines back to what it was before the freeze (empty: no limit)."
	}
	c.render(w, r, http.StatusOK, "policy", "Policy · "+p.Slug, "products", d)
}

func (c *Console) setPolicy(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := queryCtx(r)
	defer cancel()
	s := sessionFrom(r.Context())
	p, err := schema.New(c.pool).GetProduct(ctx, r.PathValue("id"))
	if err != nil {
		c.failErr(w, r, err)
		return
	}
	d := policyData{P: p, Max: strings.TrimSpace(r.PostFormValue("max_engines")), RPM: strings.TrimSpace(r.PostFormValue("rate_limit_rpm"))}
	var pol orch.Policy
	var perr error
	if pol.MaxEngines, perr = optInt(d.Max, "max_engines"); perr == nil {
		pol.RateLimitRPM, perr = optInt(d.RPM, "rate_limit_rpm")
	}
	if perr != nil {
		d.Error = perr.Error()
		c.render(w, r, http.StatusBadRequest, "policy", "Policy · "+p.Slug, "products", d)
		return
	}
	err = c.actions.SetPolicy(ctx, p.ID, pol, orch.ActorAdmin)
	c.auditRequest(p.ID, "", "", s, map[string]any{"via": "console", "request": "set_policy",
		"policy": map[string]any{"max_engines": pol.MaxEngines, "rate_limit_rpm": pol.RateLimitRPM}}, "", err)
	if err != nil {
		d.Error = fmt.Sprintf("%s: %s", orch.ErrorCode(err), errText(err))
		c.render(w, r, statusOf(orch.ErrorCode(err)), "policy", "Policy · "+p.Slug, "products", d)
		return
	}
	c.log.Info("console policy", "product_id", p.ID, "policy", policyText(pol), "operator", s.Operator)
	http.Redirect(w, r, Path+"/products#"+p.Slug, http.StatusSeeOther)
}

func intText(p *int) string {
	if p == nil {
		return ""
	}
	return strconv.Itoa(*p)
}

// optInt reads a limit: empty is no limit, otherwise a whole number >= 0.
func optInt(s, name string) (*int, error) {
	if s == "" {
		return nil, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 {
		return nil, fmt.Errorf("%s must be empty (no limit) or a whole number ≥ 0, not %q", name, s)
	}
	return &n, nil
}
