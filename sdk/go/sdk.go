// Package enginefleet is the Go client of the engine fleet orchestrator.
//
// client.gen.go is generated from openapi-3.0.yaml by oapi-codegen (make
// gen) and gives every operation; this file adds a thin layer where it
// earns its place: key headers set once, Admit returning the engine or a
// typed denial, and errors carrying the API's stable code.
package enginefleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"
)

// Orchestrator talks to one orchestrator with one key (a product's
// platform key, or the admin key for /products). The generated methods of
// ClientWithResponses are all available on it.
type Orchestrator struct {
	*ClientWithResponses
}

// Option configures a Client.
type Option func(*options)

type options struct {
	platformKey, adminKey string
	http                  HttpRequestDoer
}

// WithPlatformKey sends X-Platform-Key on every request (product routes).
func WithPlatformKey(key string) Option { return func(o *options) { o.platformKey = key } }

// WithAdminKey sends X-Admin-Key on every request (admin routes).
func WithAdminKey(key string) Option { return func(o *options) { o.adminKey = key } }

// UseHTTPClient uses c instead of http.DefaultClient.
func UseHTTPClient(c HttpRequestDoer) Option { return func(o *options) { o.http = c } }

// New returns a client of the orchestrator at baseURL (e.g. https://orch.example.com).
func New(baseURL string, opts ...Option) (*Orchestrator, error) {
	var o options
	for _, fn := range opts {
		fn(&o)
	}
	copts := []ClientOption{WithRequestEditorFn(func(_ context.Context, req *http.Request) error {
		if o.platformKey != "" {
			req.Header.Set("X-Platform-Key", o.platformKey)
		}
		if o.adminKey != "" {
			req.Header.Set("X-Admin-Key", o.adminKey)
		}
		return nil
	})}
	if o.http != nil {
		copts = append(copts, WithHTTPClient(o.http))
	}
	c, err := NewClientWithResponses(baseURL, copts...)
	if err != nil {
		return nil, err
	}
	return &Orchestrator{c}, nil
}

// Error is an error answered by the orchestrator, with its stable code.
// Compare it with the sentinels of errors.gen.go, one per code:
//
//	if errors.Is(err, enginefleet.ErrRateLimited) { … }
//
// or take it apart with errors.As for the status, message and Retry-After.
type Error struct {
	Status    int       // the HTTP status (0 for a failed operation followed with Wait)
	Code      ErrorCode // e.g. ErrorCodeEngineNotFound, ErrorCodeQuotaExceeded
	Message   string
	RequestID string
	// RetryAfter is how long the orchestrator asked to wait before trying
	// again (RATE_LIMITED, QUOTA_EXCEEDED, SERVICE_UNAVAILABLE), else 0.
	RetryAfter time.Duration
}

func (e *Error) Error() string {
	if e.Status == 0 {
		return fmt.Sprintf("orchestrator: %s: %s", e.Code, e.Message)
	}
	return fmt.Sprintf("orchestrator: %d %s: %s", e.Status, e.Code, e.Message)
}

// Is reports whether target is an *Error with the same code: what makes
// errors.Is(err, ErrQuotaExceeded) work.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code
}

// Code returns the stable error code of err, or "" if err is not an *Error.
func Code(err error) ErrorCode {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return ""
}

// RetryAfter returns how long the orchestrator asked to wait before
// trying again, and whether it said (429 and 503 answers do).
func RetryAfter(err error) (time.Duration, bool) {
	var e *Error
	if errors.As(err, &e) && e.RetryAfter > 0 {
		return e.RetryAfter, true
	}
	return 0, false
}

// Unknown codes: an answer that is not the envelope, or a 2xx without the
// body the operation promises.
const (
	CodeUnknown    ErrorCode = "UNKNOWN"
	CodeUnexpected ErrorCode = "UNEXPECTED"
)

// check turns a non-2xx answer into an *Error.
func check(res *http.Response, body []byte, err error) error {
	if err != nil {
		return err
	}
	if res.StatusCode < 300 {
		return nil
	}
	var env ErrorResponse
	if json.Unmarshal(body, &env) != nil || env.Error.Code == "" {
		return &Error{Status: res.StatusCode, Code: CodeUnknown, Message: http.StatusText(res.StatusCode)}
	}
	e := &Error{Status: res.StatusCode, Code: env.Error.Code, Message: env.Error.Message, RetryAfter: retryAfter(res.Header.Get("Retry-After"))}
	if env.Error.RequestId != nil {
		e.RequestID = *env.Error.RequestId
	}
	return e
}

// retryAfter reads a Retry-After header: seconds, or an HTTP date.
func retryAfter(v string) time.Duration {
	if v == "" {
		return 0
	}
	if secs, err := strconv.Atoi(v); err == nil && secs >= 0 {
		return time.Duration(secs) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		if d := time.Until(t); d > 0 {
			return d
		}
	}
	return 0
}

// AdmitOptions are admit's switches.
type AdmitOptions struct {
	AutoProvision bool // provision an engine when the user has none
	AutoWake      bool // start a sleeping or stopped engine
}

// Denial is an admit that did not admit, and why: "engine_not_found",
// "engine_sleeping" or "engine_unhealthy".
type Denial struct{ Reason string }

// Admit is the call a product makes on every user request: the user's
// engine when admitted, else a Denial; errors are *Error (RATE_LIMITED,
// QUOTA_EXCEEDED, BOOT_TIMEOUT…).
func (c *Orchestrator) Admit(ctx context.Context, userID string, o AdmitOptions) (*EngineDetail, *Denial, error) {
	res, err := c.AdmitEngineWithResponse(ctx, userID, nil, AdmitEngineJSONRequestBody{AutoProvision: &o.AutoProvision, AutoWake: &o.AutoWake})
	if res == nil {
		return nil, nil, err
	}
	if err := check(res.HTTPResponse, res.Body, err); err != nil {
		return nil, nil, err
	}
	b := res.JSON200
	if b == nil {
		return nil, nil, &Error{Status: res.StatusCode(), Code: CodeUnexpected, Message: "no admit body"}
	}
	if !b.Admitted || b.Engine == nil {
		reason := ""
		if b.Reason != nil {
			reason = string(*b.Reason)
		}
		return nil, &Denial{Reason: reason}, nil
	}
	e := b.Engine
	return &EngineDetail{ApiKey: e.ApiKey, CreatedAt: e.CreatedAt, EngineId: e.EngineId, EngineVersion: e.EngineVersion,
		LastHealthAt: e.LastHealthAt, Status: EngineDetailStatus(e.Status), Url: e.Url, UserId: e.UserId}, nil, nil
}

// Provision creates the user's engine and waits until it is healthy.
// version "" is the orchestrator's default image.
func (c *Orchestrator) Provision(ctx context.Context, userID, version string) (*ProvisionBody, error) {
	body := ProvisionEngineJSONRequestBody{UserId: userID}
	if version != "" {
		body.EngineVersion = &version
	}
	res, err := c.ProvisionEngineWithResponse(ctx, nil, body)
	if res == nil {
		return nil, err
	}
	if err := check(res.HTTPResponse, res.Body, err); err != nil {
		return nil, err
	}
	return res.JSON200, nil
}

// ProvisionAsync asks for the user's engine and returns at once (202)
// with the operation to follow: Wait(ctx, body.OperationId) returns when
// the engine is healthy, or with the operation's error.
func (c *Orchestrator) ProvisionAsync(ctx context.Context, userID, version string) (*ProvisionBody, error) {
	body := ProvisionEngineJSONRequestBody{UserId: userID}
	if version != "" {
		body.EngineVersion = &version
	}
	async := "respond-async"
	res, err := c.ProvisionEngineWithResponse(ctx, &ProvisionEngineParams{Prefer: &async}, body)
	if res == nil {
		return nil, err
	}
	if err := check(res.HTTPResponse, res.Body, err); err != nil {
		return nil, err
	}
	if res.JSON202 == nil || res.JSON202.OperationId == nil {
		return nil, &Error{Status: res.StatusCode(), Code: CodeUnexpected, Message: "no operation to follow"}
	}
	return res.JSON202, nil
}

// Operation returns an asynchronous operation as it stands.
func (c *Orchestrator) Operation(ctx context.Context, operationID string) (*OperationBody, error) {
	res, err := c.GetOperationWithResponse(ctx, operationID)
	if res == nil {
		return nil, err
	}
	if err := check(res.HTTPResponse, res.Body, err); err != nil {
		return nil, err
	}
	return res.JSON200, nil
}

// Wait follows an asynchronous operation (an operation_id answered with
// 202) until it ends, reading it every poll (a second when 0), and returns
// it when it succeeded. A failed operation is an *Error with the
// operation's code (errors.Is(err, ErrBootTimeout)…); a 503 while
// following it is waited out.
func (c *Orchestrator) Wait(ctx context.Context, operationID string, poll time.Duration) (*OperationBody, error) {
	if poll <= 0 {
		poll = time.Second
	}
	for {
		op, err := c.Operation(ctx, operationID)
		switch {
		case Code(err) == ErrorCodeServiceUnavailable:
		case err != nil:
			return nil, err
		case op.Status == OperationBodyStatusSucceeded:
			return op, nil
		case op.Status == OperationBodyStatusFailed:
			e := &Error{Code: CodeUnknown, Message: "operation failed"}
			if op.ErrorCode != nil {
				e.Code = *op.ErrorCode
			}
			if op.ErrorMessage != nil {
				e.Message = *op.ErrorMessage
			}
			return op, e
		}
		wait := poll
		if d, ok := RetryAfter(err); ok && d > wait {
			wait = d
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(wait):
		}
	}
}

// Engine returns the user's engine, key included (ENGINE_NOT_FOUND if none).
func (c *Orchestrator) Engine(ctx context.Context, userID string) (*EngineDetail, error) {
	res, err := c.GetEngineWithResponse(ctx, userID)
	if res == nil {
		return nil, err
	}
	if err := check(res.HTTPResponse, res.Body, err); err != nil {
		return nil, err
	}
	return res.JSON200, nil
}

// Engines lists the product's engines (no keys); status "" lists all.
func (c *Orchestrator) Engines(ctx context.Context, status string, limit, offset int64) (*ListOutputBody, error) {
	p := &ListEnginesParams{Limit: &limit, Offset: &offset}
	if status != "" {
		s := ListEnginesParamsStatus(status)
		p.Status = &s
	}
	res, err := c.ListEnginesWithResponse(ctx, p)
	if res == nil {
		return nil, err
	}
	if err := check(res.HTTPResponse, res.Body, err); err != nil {
		return nil, err
	}
	return res.JSON200, nil
}

// Start starts a stopped or sleeping engine and waits for it.
func (c *Orchestrator) Start(ctx context.Context, userID string) (*OpBody, error) {
	res, err := c.StartEngineWithResponse(ctx, userID, nil)
	return opResult(res, err)
}

// Stop stops an engine (its brain is kept).
func (c *Orchestrator) Stop(ctx context.Context, userID string) (*OpBody, error) {
	res, err := c.StopEngineWithResponse(ctx, userID, nil)
	return opResult(res, err)
}

// Destroy removes an engine, its brain and its port: irreversible.
func (c *Orchestrator) Destroy(ctx context.Context, userID string) (*OpBody, error) {
	res, err := c.DestroyEngineWithResponse(ctx, userID, nil)
	return opResult(res, err)
}

type opResponse interface {
	StatusCode() int
}

func opResult[R interface {
	opResponse
	*StartEngineResponse | *StopEngineResponse | *DestroyEngineResponse
}](res R, err error) (*OpBody, error) {
	if res == nil {
		return nil, err
	}
	var hr *http.Response
	var body []byte
	var out *OpBody
	switch r := any(res).(type) {
	case *StartEngineResponse:
		hr, body, out = r.HTTPResponse, r.Body, r.JSON200
	case *StopEngineResponse:
		hr, body, out = r.HTTPResponse, r.Body, r.JSON200
	case *DestroyEngineResponse:
		hr, body, out = r.HTTPResponse, r.Body, r.JSON200
	}
	if err := check(hr, body, err); err != nil {
		return nil, err
	}
	return out, nil
}

// RegisterProduct registers a product (admin key) without limits; the
// platform key in the answer is shown only this once.
func (c *Orchestrator) RegisterProduct(ctx context.Context, slug, displayName string) (*RegisterBody, error) {
	return c.RegisterProductWithPolicy(ctx, slug, displayName, nil)
}

// RegisterProductWithPolicy registers a product with a policy (nil: no
// limits).
func (c *Orchestrator) RegisterProductWithPolicy(ctx context.Context, slug, displayName string, policy *Policy) (*RegisterBody, error) {
	res, err := c.RegisterProductWithResponse(ctx, RegisterProductJSONRequestBody{Slug: slug, DisplayName: displayName, Policy: policy})
	if res == nil {
		return nil, err
	}
	if err := check(res.HTTPResponse, res.Body, err); err != nil {
		return nil, err
	}
	return res.JSON200, nil
}
