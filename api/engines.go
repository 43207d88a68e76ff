package api

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/danielgtaylor/huma/v2"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/lifecycle"
	"github.com/enginefleet/orchestrator/metrics"
	"github.com/enginefleet/orchestrator/schema"
)

// EngineDetail is an engine as GET /engines/{user_id} and admit show it,
// key included.
type EngineDetail struct {
	EngineID      string     `json:"engine_id" format:"uuid"`
	UserID        string     `json:"user_id"`
	Status        string     `json:"status" enum:"provisioning,running,sleeping,stopped,failed,destroying"`
	URL           string     `json:"url" doc:"Where the product reaches the engine directly"`
	APIKey        string     `json:"api_key" doc:"The engine key: send it as X-Engine-Key"`
	EngineVersion string     `json:"engine_version"`
	CreatedAt     time.Time  `json:"created_at"`
	LastHealthAt  *time.Time `json:"last_health_at" nullable:"true"`
}

// EngineSummary is an engine in a list: no key.
type EngineSummary struct {
	EngineID      string     `json:"engine_id" format:"uuid"`
	UserID        string     `json:"user_id"`
	Status        string     `json:"status" enum:"provisioning,running,sleeping,stopped,failed,destroying"`
	URL           string     `json:"url"`
	EngineVersion string     `json:"engine_version"`
	CreatedAt     time.Time  `json:"created_at"`
	LastHealthAt  *time.Time `json:"last_health_at" nullable:"true"`
}

func (s *Server) toDetail(e orch.Engine, key string) EngineDetail {
	return EngineDetail{EngineID: e.ID, UserID: e.UserID, Status: string(e.Status), URL: s.core.URL(e), APIKey: key,
		EngineVersion: e.EngineVersion, CreatedAt: e.CreatedAt, LastHealthAt: e.LastHealthAt}
}

func (s *Server) toSummary(e orch.Engine) EngineSummary {
	return EngineSummary{EngineID: e.ID, UserID: e.UserID, Status: string(e.Status), URL: s.core.URL(e),
		EngineVersion: e.EngineVersion, CreatedAt: e.CreatedAt, LastHealthAt: e.LastHealthAt}
}

// userPath is the {user_id} path parameter, validated by hand so a bad id
// is INVALID_REQUEST with our message.
type userPath struct {
	UserID string `path:"user_id" doc:"The product's own user id: 1-128 characters of [A-Za-z0-9._@:|+=~-]"`
}

// wantsAsync reports whether a Prefer header asks for respond-async.
func wantsAsync(prefer string) bool {
	for _, p := range strings.Split(prefer, ",") {
		if strings.EqualFold(strings.TrimSpace(p), "respond-async") {
			return true
		}
	}
	return false
}

// awaited are the codes an operation can fail with (its error_code),
// which a request waiting for it answers.
var awaited = []orch.Code{orch.CodeBackendFailed, orch.CodeBackendTimeout, orch.CodeBootTimeout, orch.CodeEngineNotFound,
	orch.CodeOperationInProgress, orch.CodeInvalidState, orch.CodePortExhaustion}

// waits declares the codes of an operation that starts a lifecycle
// operation and waits for it: its own and awaited (codes.go).
func waits(cs ...orch.Code) map[string]any { return codes(append(cs, awaited...)...) }

func (s *Server) op(o huma.Operation) huma.Operation {
	o.Security = platformSecurity
	o.Tags = []string{"engines"}
	return o
}

// ---- provision ----

type provisionInput struct {
	Prefer string `header:"Prefer" doc:"respond-async: answer 202 with an operation_id at once instead of waiting"`
	Body   struct {
		_             struct{} `additionalProperties:"true"` // products may send fields we do not read
		UserID        string   `json:"user_id" doc:"The product's own user id" example:"user-42"`
		EngineVersion string   `json:"engine_version,omitempty" doc:"Engine image; default ORCH_ENGINE_IMAGE. Only images ORCH_ENGINE_IMAGE_ALLOWLIST allows (by default any pinned tag of ORCH_ENGINE_IMAGE's repository)" example:"enginefleet/engine:1.0.0"`
	}
}

// ProvisionBody is provision's answer.
type ProvisionBody struct {
	EngineID    string `json:"engine_id" format:"uuid"`
	UserID      string `json:"user_id"`
	Status      string `json:"status"`
	URL         string `json:"url"`
	APIKey      string `json:"api_key"`
	OperationID string `json:"operation_id,omitempty" doc:"Set with Prefer: respond-async"`
}

type provisionOutput struct {
	Status int
	Body   ProvisionBody
}

// ---- admit ----

type admitInput struct {
	UserID string `path:"user_id" doc:"The product's own user id: 1-128 characters of [A-Za-z0-9._@:|+=~-]"`
	Prefer string `header:"Prefer" doc:"respond-async: answer 202 with an operation_id at once instead of waiting"`
	Body   *struct {
		_             struct{} `additionalProperties:"true"` // products may send fields we do not read
		AutoProvision bool     `json:"auto_provision,omitempty" doc:"Provision an engine when the user has none"`
		AutoWake      bool     `json:"auto_wake,omitempty" doc:"Start a sleeping or stopped engine"`
	} `required:"false"`
}

// AdmitEngine is the engine of an admit answer: null when not admitted.
type AdmitEngine struct {
	_ struct{} `nullable:"true"`
	EngineDetail
}

// AdmitBody is admit's answer.
type AdmitBody struct {
	Admitted    bool         `json:"admitted"`
	Engine      *AdmitEngine `json:"engine"`
	Reason      string       `json:"reason,omitempty" enum:"engine_not_found,engine_sleeping,engine_unhealthy"`
	OperationID string       `json:"operation_id,omitempty" doc:"Set with Prefer: respond-async when work was started"`
}

type admitOutput struct {
	Status             int
	RateLimitLimit     string `header:"X-RateLimit-Limit"`
	RateLimitRemaining string `header:"X-RateLimit-Remaining"`
	Body               AdmitBody

	path string // how it was answered (metrics.AdmitWarm/Cold/Wake), for the latency histogram
}

// ---- simple operations ----

type getEngineOutput struct{ Body EngineDetail }

type listInput struct {
	Status string `query:"status" enum:"provisioning,running,sleeping,stopped,failed,destroying" doc:"Only engines in this state"`
	Limit  int    `query:"limit" default:"100" minimum:"1" maximum:"1000"`
	Offset int    `query:"offset" default:"0" minimum:"0"`
}

type listOutput struct {
	Body struct {
		Engines []EngineSummary `json:"engines"`
		Total   int             `json:"total"`
	}
}

// OpBody is the answer of start/stop/restart/destroy/upgrade.
type OpBody struct {
	EngineID    string `json:"engine_id" format:"uuid"`
	Status      string `json:"status"`
	URL         string `json:"url,omitempty"`
	OperationID string `json:"operation_id,omitempty" doc:"Set with Prefer: respond-async"`
}

type opOutput struct {
	Status int
	Body   OpBody
}

type rotateOutput struct {
	Status int
	Body   struct {
		EngineID    string `json:"engine_id" format:"uuid"`
		APIKey      string `json:"api_key" doc:"The new engine key; the previous one works until the overlap ends"`
		OperationID string `json:"operation_id,omitempty"`
	}
}

type upgradeInput struct {
	UserID string `path:"user_id" doc:"The product's own user id: 1-128 characters of [A-Za-z0-9._@:|+=~-]"`
	Prefer string `header:"Prefer" doc:"respond-async: answer 202 with an operation_id at once instead of waiting"`
	Body   struct {
		_             struct{} `additionalProperties:"true"` // products may send fields we do not read
		EngineVersion string   `json:"engine_version" minLength:"1" doc:"The image to recreate the engine on (ORCH_ENGINE_IMAGE_ALLOWLIST applies)"`
	}
}

type userOpInput struct {
	UserID string `path:"user_id" doc:"The product's own user id: 1-128 characters of [A-Za-z0-9._@:|+=~-]"`
	Prefer string `header:"Prefer" doc:"respond-async: answer 202 with an operation_id at once instead of waiting"`
}

// OperationBody is GET /operations/{id}.
type OperationBody struct {
	OperationID  string    `json:"operation_id" format:"uuid"`
	Kind         string    `json:"kind"`
	Status       string    `json:"status" enum:"pending,running,succeeded,failed"`
	EngineID     string    `json:"engine_id" format:"uuid"`
	UserID       string    `json:"user_id"`
	ErrorCode    string    `json:"error_code,omitempty"`
	ErrorMessage string    `json:"error_message,omitempty"`
	CreatedAt    time.Time `json:"created_at"`
	UpdatedAt    time.Time `json:"updated_at"`
}

func (s *Server) registerEngines() {
	huma.Register(s.api, s.op(huma.Operation{
		OperationID: "provision-engine", Method: http.MethodPost, Path: "/engines/provision",
		Summary:     "Provision a user's engine",
		Description: "Creates the user's engine and returns once it is healthy (or 202 with Prefer: respond-async).",
		Metadata:    waits(orch.CodeEngineAlreadyExists, orch.CodeQuotaExceeded, orch.CodePortExhaustion),
	}), func(ctx context.Context, in *provisionInput) (*provisionOutput, error) {
		p := productFrom(ctx)
		if err := orch.ValidateUserID(in.Body.UserID); err != nil {
			return nil, toHTTP(ctx, err)
		}
		res, err := s.core.Provision(ctx, p, in.Body.UserID, in.Body.EngineVersion, false)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		if wantsAsync(in.Prefer) {
			e := res.Engine
			return &provisionOutput{Status: http.StatusAccepted, Body: ProvisionBody{EngineID: e.ID, UserID: e.UserID,
				Status: string(e.Status), URL: s.core.URL(e), APIKey: res.Key, OperationID: res.OperationID}}, nil
		}
		e, err := s.core.Await(ctx, p.ID, res.Engine, res.OperationID, orch.OpProvision)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		return &provisionOutput{Status: http.StatusOK, Body: ProvisionBody{EngineID: e.ID, UserID: e.UserID, Status: string(e.Status),
			URL: s.core.URL(e), APIKey: res.Key}}, nil
	})

	huma.Register(s.api, s.op(huma.Operation{
		OperationID: "admit-engine", Method: http.MethodPost, Path: "/engines/{user_id}/admit",
		Summary:     "Admit a user: the one call a product makes per user request",
		Description: "Idempotent. Answers a running engine from one indexed read; provisions (auto_provision) or wakes (auto_wake) when asked.",
		Metadata:    waits(orch.CodeQuotaExceeded, orch.CodePortExhaustion),
	}), s.admit)

	huma.Register(s.api, s.op(huma.Operation{
		OperationID: "get-engine", Method: http.MethodGet, Path: "/engines/{user_id}",
		Summary: "Get a user's engine (read-only, never provisions)", Metadata: codes(orch.CodeEngineNotFound),
	}), func(ctx context.Context, in *userPath) (*getEngineOutput, error) {
		e, err := s.core.Engine(ctx, productFrom(ctx).ID, in.UserID)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		key, err := s.core.Key(e)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		return &getEngineOutput{Body: s.toDetail(e, key)}, nil
	})

	huma.Register(s.api, s.op(huma.Operation{
		OperationID: "list-engines", Method: http.MethodGet, Path: "/engines",
		Summary: "List the product's engines (no keys)", Metadata: codes(),
	}), func(ctx context.Context, in *listInput) (*listOutput, error) {
		es, total, err := schema.New(s.pool).ListEngines(ctx, productFrom(ctx).ID, orch.State(in.Status), in.Limit, in.Offset)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		out := &listOutput{}
		out.Body.Engines = make([]EngineSummary, 0, len(es))
		for _, e := range es {
			out.Body.Engines = append(out.Body.Engines, s.toSummary(e))
		}
		out.Body.Total = total
		return out, nil
	})

	s.registerOp("start-engine", http.MethodPost, "/engines/{user_id}/start", "Start a stopped or sleeping engine",
		lifecycle.Start, waits(orch.CodeEngineNotFound, orch.CodeEngineAlreadyRunning))
	s.registerOp("stop-engine", http.MethodPost, "/engines/{user_id}/stop", "Stop an engine (SIGTERM, 30 s grace, SIGKILL); the volume is kept",
		lifecycle.Stop, waits(orch.CodeEngineNotFound, orch.CodeEngineNotRunning))
	s.registerOp("restart-engine", http.MethodPost, "/engines/{user_id}/restart", "Restart an engine",
		lifecycle.Restart, waits(orch.CodeEngineNotFound))
	s.registerOp("destroy-engine", http.MethodDelete, "/engines/{user_id}", "Destroy an engine: container, brain volume, port and row (irreversible)",
		lifecycle.Destroy, waits(orch.CodeEngineNotFound))

	huma.Register(s.api, s.op(huma.Operation{
		OperationID: "rotate-engine-key", Method: http.MethodPost, Path: "/engines/{user_id}/rotate-key",
		Summary:     "Rotate an engine's key",
		Description: "Puts a new key in force on the engine; the previous key keeps working for the overlap window.",
		Metadata:    waits(orch.CodeEngineNotFound, orch.CodeEngineNotRunning),
	}), func(ctx context.Context, in *userOpInput) (*rotateOutput, error) {
		p := productFrom(ctx)
		e, opID, key, err := s.core.RotateKey(ctx, p, in.UserID)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		out := &rotateOutput{Status: http.StatusOK}
		out.Body.EngineID, out.Body.APIKey = e.ID, key
		if wantsAsync(in.Prefer) {
			out.Status, out.Body.OperationID = http.StatusAccepted, opID
			return out, nil
		}
		if _, err := s.core.Await(ctx, p.ID, e, opID, orch.OpRotateKey); err != nil {
			return nil, toHTTP(ctx, err)
		}
		return out, nil
	})

	huma.Register(s.api, s.op(huma.Operation{
		OperationID: "upgrade-engine", Method: http.MethodPost, Path: "/engines/{user_id}/upgrade",
		Summary:     "Recreate an engine on a new image, same brain volume",
		Description: "Per-user canaries. If the new version does not become healthy the engine is rolled back to the old image.",
		Metadata:    waits(orch.CodeEngineNotFound, orch.CodeEngineNotRunning),
	}), func(ctx context.Context, in *upgradeInput) (*opOutput, error) {
		if err := s.core.AllowImage(in.Body.EngineVersion); err != nil {
			return nil, toHTTP(ctx, err)
		}
		return s.runOp(ctx, in.UserID, in.Prefer, lifecycle.Upgrade(in.Body.EngineVersion))
	})

	huma.Register(s.api, huma.Operation{
		OperationID: "get-operation", Method: http.MethodGet, Path: "/operations/{operation_id}",
		Summary: "Follow an asynchronous operation", Security: platformSecurity, Tags: []string{"engines"},
		Metadata: codes(orch.CodeOperationNotFound),
	}, func(ctx context.Context, in *struct {
		ID string `path:"operation_id"`
	}) (*struct{ Body OperationBody }, error) {
		op, err := schema.New(s.pool).GetOperation(ctx, productFrom(ctx).ID, in.ID)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		return &struct{ Body OperationBody }{Body: OperationBody{OperationID: op.ID, Kind: string(op.Kind), Status: string(op.Status),
			EngineID: op.EngineID, UserID: op.UserID, ErrorCode: string(op.ErrorCode), ErrorMessage: op.ErrorMessage,
			CreatedAt: op.CreatedAt, UpdatedAt: op.UpdatedAt}}, nil
	})
}

// registerOp registers one of the simple engine operations.
func (s *Server) registerOp(id, method, path, summary string, r lifecycle.Request, errorCodes map[string]any) {
	huma.Register(s.api, s.op(huma.Operation{OperationID: id, Method: method, Path: path, Summary: summary, Metadata: errorCodes}),
		func(ctx context.Context, in *userOpInput) (*opOutput, error) {
			return s.runOp(ctx, in.UserID, in.Prefer, r)
		})
}

func (s *Server) runOp(ctx context.Context, userID string, prefer string, r lifecycle.Request) (*opOutput, error) {
	p := productFrom(ctx)
	e, opID, err := s.core.Operate(ctx, p, userID, r)
	if err != nil {
		return nil, toHTTP(ctx, err)
	}
	if wantsAsync(prefer) {
		return &opOutput{Status: http.StatusAccepted, Body: OpBody{EngineID: e.ID, Status: string(e.Status), URL: s.core.URL(e), OperationID: opID}}, nil
	}
	e, err = s.core.Await(ctx, p.ID, e, opID, r.Kind)
	if err != nil {
		return nil, toHTTP(ctx, err)
	}
	out := &opOutput{Status: http.StatusOK, Body: OpBody{EngineID: e.ID, Status: string(e.Status)}}
	switch r.Kind {
	case orch.OpDestroy:
		out.Body.Status = "destroyed"
	case orch.OpStop:
	default:
		out.Body.URL = s.core.URL(e)
	}
	return out, nil
}

// admit is the hot path: a running engine costs the cached
// product, the rate limit and one indexed read. Its latency is recorded
// by outcome: warm, cold, wake, denied (admitted:false or 429) or error.
func (s *Server) admit(ctx context.Context, in *admitInput) (*admitOutput, error) {
	start := time.Now()
	out, err := s.admitUser(ctx, in)
	s.cfg.Metrics.ObserveAdmit(admitOutcome(out, err), time.Since(start))
	return out, err
}

func admitOutcome(out *admitOutput, err error) string {
	var er *ErrorResponse
	switch {
	case errors.As(err, &er) && er.status == http.StatusTooManyRequests:
		return metrics.AdmitDenied
	case err != nil || out == nil:
		return metrics.AdmitError
	case !out.Body.Admitted && out.Status != http.StatusAccepted:
		return metrics.AdmitDenied
	case out.path == "":
		return metrics.AdmitWarm
	}
	return out.path
}

func (s *Server) admitUser(ctx context.Context, in *admitInput) (*admitOutput, error) {
	p := productFrom(ctx)
	var o lifecycle.AdmitOptions
	if in.Body != nil {
		o.AutoProvision, o.AutoWake = in.Body.AutoProvision, in.Body.AutoWake
	}
	o.Async = wantsAsync(in.Prefer)
	out := &admitOutput{Status: http.StatusOK}
	limit, remaining, err := s.rateLimit(ctx, p)
	if limit > 0 {
		out.RateLimitLimit = strconv.Itoa(limit)
		out.RateLimitRemaining = strconv.Itoa(remaining)
	}
	if err != nil {
		s.core.AuditDenied(p, in.UserID, string(orch.ErrorCode(err)))
		herr := toHTTP(ctx, err)
		if limit > 0 { // a denied admit still says where the product stands
			herr = huma.ErrorWithHeaders(herr, http.Header{"X-RateLimit-Limit": {out.RateLimitLimit},
				"X-RateLimit-Remaining": {out.RateLimitRemaining}})
		}
		return nil, herr
	}
	a, err := s.core.Admit(ctx, p, in.UserID, o)
	if err != nil {
		return nil, toHTTP(ctx, err)
	}
	out.path = a.Path
	out.Body = AdmitBody{Admitted: a.Admitted, Reason: string(a.Reason), OperationID: a.OperationID}
	if a.Engine != nil {
		out.Body.Engine = &AdmitEngine{EngineDetail: s.toDetail(*a.Engine, a.Key)}
	}
	if a.OperationID != "" {
		out.Status = http.StatusAccepted
	}
	return out, nil
}
