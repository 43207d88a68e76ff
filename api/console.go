package api

import (
	"context"
	"net/http"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/console"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

// This file mounts the operator console (package console) at /console and
// gives it its Actions over this package's request side: the same
// checks, operations and jobs as the HTTP routes, with the operation's
// actor "admin". It is the one place to re-point when the request side
// moves.

// mountConsole mounts the console when the API has a database and an
// admin key (the document-only API of `orchestrator openapi` has neither).
func (s *Server) mountConsole() {
	if s.pool == nil || s.river == nil || s.cfg.AdminKey == "" {
		return
	}
	cfg := console.Config{AdminKey: s.cfg.AdminKey, PortMin: s.cfg.PortMin, PortMax: s.cfg.PortMax,
		BootTimeout: s.cfg.BootTimeout, Version: s.cfg.Version, Log: s.log}
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

// as is the product acting under actor's name (the operation's actor).
func (a consoleActions) as(ctx context.Context, productID, actor string) (orch.Product, error) {
	p, err := schema.New(a.s.pool).GetProduct(ctx, productID)
	if err != nil {
		return p, err
	}
	p.Slug = actor
	return p, nil
}

// Operate starts start, stop, restart, destroy or rotate_key with the
// checks of the HTTP routes (engines.go).
func (a consoleActions) Operate(ctx context.Context, productID, userID string, kind orch.OpKind, actor string) (string, error) {
	p, err := a.as(ctx, productID, actor)
	if err != nil {
		return "", err
	}
	r := opRequest{kind: kind}
	switch kind {
	case orch.OpStart:
		r.check = func(e orch.Engine) error {
			if e.Status == orch.StateRunning {
				return orch.Errorf(orch.CodeEngineAlreadyRunning, "engine is already running")
			}
			return notTransitional(e)
		}
	case orch.OpStop:
		r.check = func(e orch.Engine) error {
			if e.Status == orch.StateStopped {
				return orch.Errorf(orch.CodeEngineNotRunning, "engine is not running")
			}
			return notTransitional(e)
		}
	case orch.OpRestart:
		r.check = notTransitional
	case orch.OpDestroy:
		r.state = orch.StateDestroying
	case orch.OpRotateKey:
		key := keys.Generate()
		enc, err := a.s.keyring.Encrypt(key)
		if err != nil {
			return "", err
		}
		r.check, r.payload = mustRun, schema.OpPayload{KeyHash: keys.Hash(key), KeyEnc: enc}
	default:
		return "", orch.Errorf(orch.CodeInvalidRequest, "the console cannot %s an engine", kind)
	}
	_, opID, err := a.s.operate(ctx, p, userID, r)
	return opID, err
}

// Backup takes a backup now (or joins the one in flight).
func (a consoleActions) Backup(ctx context.Context, productID, userID, actor string) (string, error) {
	p, err := a.as(ctx, productID, actor)
	if err != nil {
		return "", err
	}
	_, opID, _, err := a.s.requestBackup(ctx, p, userID)
	return opID, err
}

// Restore restores one of the user's backups into the user's engine.
func (a consoleActions) Restore(ctx context.Context, productID, userID, backupID, actor string) (string, error) {
	p, err := a.as(ctx, productID, actor)
	if err != nil {
		return "", err
	}
	_, opID, err := a.s.RestoreBackup(ctx, p, userID, backupID)
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
