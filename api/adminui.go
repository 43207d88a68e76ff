package api

import (
	"context"
	"net/http"

	"riverqueue.com/riverui"

	orch "github.com/enginefleet/orchestrator"
)

// AdminUIPath is where the River UI (jobs, queues, retries) is mounted.
const AdminUIPath = "/admin/jobs"

// adminUI is River's web UI, served to operators behind HTTP basic auth
// with the admin key as password: a browser cannot send X-Admin-Key, and
// it remembers basic credentials for the session. Job arguments are
// hidden in job lists by default: they hold engine and operation ids,
// never keys, but a list is no place to browse them.
type adminUI struct {
	handler *riverui.Handler
}

// mountAdminUI mounts the River UI on the API's mux when the API has a
// River client and an admin key; without either it is simply absent.
func (s *Server) mountAdminUI() {
	if s.river == nil || s.cfg.AdminKey == "" {
		return
	}
	h, err := riverui.NewHandler(&riverui.HandlerOpts{
		Endpoints:                riverui.NewEndpoints(s.river, nil),
		JobListHideArgsByDefault: true,
		Logger:                   s.log,
		Prefix:                   AdminUIPath,
	})
	if err != nil {
		s.log.Error("river ui unavailable", "error", err)
		return
	}
	s.adminUI = &adminUI{handler: h}
	guarded := s.adminOnly(h)
	s.mux.Handle(AdminUIPath, guarded)
	s.mux.Handle(AdminUIPath+"/", guarded)
}

// startAdminUI runs the UI's background services (query caches) until ctx ends.
func (s *Server) startAdminUI(ctx context.Context) {
	if s.adminUI == nil {
		return
	}
	if err := s.adminUI.handler.Start(ctx); err != nil {
		s.log.Error("start river ui", "error", err)
	}
}

// adminOnly lets a request through when its basic-auth password is the
// admin key (any user name). Browsers send remembered basic credentials
// on cross-site requests too, so unsafe methods (the UI's retry, cancel,
// delete, pause) must also come from this origin (Go's CSRF protection:
// Sec-Fetch-Site, else Origin against Host).
func (s *Server) adminOnly(next http.Handler) http.Handler {
	csrf := http.NewCrossOriginProtection()
	csrf.SetDenyHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeEnvelope(w, r, http.StatusForbidden, orch.CodePolicyDenied, "cross-origin request refused")
	}))
	next = csrf.Handler(next)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, pass, _ := r.BasicAuth()
		if err := s.checkAdmin(r.Context(), pass); err != nil {
			if orch.IsCode(err, orch.CodeInvalidAdminKey) {
				w.Header().Set("WWW-Authenticate", `Basic realm="orchestrator admin", charset="UTF-8"`)
				err = orch.Errorf(orch.CodeInvalidAdminKey, "basic auth with the admin key as password required")
			}
			writeError(w, r, err)
			return
		}
		next.ServeHTTP(w, r)
	})
}
