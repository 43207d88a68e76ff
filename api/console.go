package api

import (
	"context"
	"net/http"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/console"
	"github.com/enginefleet/orchestrator/lifecycle"
	"github.com/enginefleet/orchestrator/schema"
)

// This file mounts the operator console (package console) at /console and
// gives it its Actions over the lifecycle core: the same checks,
// operations and jobs as the HTTP routes, with the operation's actor
// "admin". It is the one place to re-point when the request side moves.

// mountConsole mounts the console when the API has a core, a database and
// an admin key (the document-only API of `orchestrator openapi` has none).
func (s *Server) mountConsole() {
	if s.core == nil || s.pool == nil || s.cfg.AdminKey == "" {
		return
	}
	cfg := console.Config{AdminKey: s.cfg.AdminKey, PortMin: s.cfg.PortMin, PortMax: s.cfg.PortMax,
		OpTimeout: s.core.WaitTimeout, Version: s.cfg.Version, Log: s.log}
	if s.cfg.Metrics != nil {
		cfg.Gatherer = s.cfg.Metrics.Gatherer()
	}
	c, err := console.New(cfg, s.pool, consoleActions{s})
	if err != nil {
		s.log.Error("console unavailable", "error", err)
		return
	}
	s.mux.Handle(console.Path, c)
	s.mux.Handle(console.Path+"/", c)
}

// consoleActions implements console.Actions.
type consoleActions struct{ s *Server }

func (a consoleActions) product(ctx context.Context, productID string) (orch.Product, error) {
	return schema.New(a.s.pool).GetProduct(ctx, productID)
}

// Operate starts start, stop, restart, destroy or rotate_key with the
// checks of the HTTP routes (the lifecycle core's requests).
func (a consoleActions) Operate(ctx context.Context, productID, userID string, kind orch.OpKind, actor string) (string, error) {
	p, err := a.product(ctx, productID)
	if err != nil {
		return "", err
	}
	var r lifecycle.Request
	switch kind {
	case orch.OpStart:
		r = lifecycle.Start
	case orch.OpStop:
		r = lifecycle.Stop
	case orch.OpRestart:
		r = lifecycle.Restart
	case orch.OpDestroy:
		r = lifecycle.Destroy
	case orch.OpRotateKey:
		p.Slug = actor // RotateKey's operation is by the product it is given
		_, opID, _, err := a.s.core.RotateKey(ctx, p, userID)
		return opID, err
	default:
		return "", orch.Errorf(orch.CodeInvalidRequest, "the console cannot %s an engine", kind)
	}
	r.Actor = actor
	_, opID, err := a.s.core.Operate(ctx, p, userID, r)
	return opID, err
}

// Backup takes a backup now (or joins the one in flight).
func (a consoleActions) Backup(ctx context.Context, productID, userID, actor string) (string, error) {
	p, err := a.product(ctx, productID)
	if err != nil {
		return "", err
	}
	_, opID, _, err := a.s.core.TakeBackup(ctx, p, userID, actor)
	return opID, err
}

// Restore restores one of the user's backups into the user's engine.
func (a consoleActions) Restore(ctx context.Context, productID, userID, backupID, actor string) (string, error) {
	p, err := a.product(ctx, productID)
	if err != nil {
		return "", err
	}
	_, opID, err := a.s.core.Restore(ctx, p, userID, backupID, actor)
	return opID, err
}

// SetPolicy replaces a product's policy (audited policy_update by admin).
func (a consoleActions) SetPolicy(ctx context.Context, productID string, p orch.Policy, _ string) error {
	if err := p.Validate(); err != nil {
		return err
	}
	_, err := a.s.updatePolicy(ctx, productID, p)
	return err
}

var _ http.Handler = (*console.Console)(nil)
