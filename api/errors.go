package api

import (
	"context"
	"errors"
	"net/http"
	"net/netip"
	"strconv"

	"github.com/danielgtaylor/huma/v2"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/schema"
)

// statusOf is the HTTP status of a code: the registry's (orch.Codes).
func statusOf(c orch.Code) int { return c.Status() }

// ErrorBody is the contract's error envelope:
// {"error": {"code": "...", "message": "...", "request_id": "..."}}.
type ErrorBody struct {
	Error ErrorDetail `json:"error"`
}

// ErrorDetail is the inside of the envelope.
type ErrorDetail struct {
	Code      string `json:"code" doc:"Stable error code" example:"ENGINE_NOT_FOUND"`
	Message   string `json:"message" doc:"Human-readable explanation"`
	RequestID string `json:"request_id,omitempty" doc:"Request id, also in the X-Request-ID header"`
}

// ErrorResponse is every error the API answers: the contract's envelope.
type ErrorResponse struct {
	status  int
	headers http.Header // e.g. Retry-After, X-RateLimit-*
	ErrorBody
}

func (e *ErrorResponse) Error() string {
	return e.ErrorBody.Error.Code + ": " + e.ErrorBody.Error.Message
}
func (e *ErrorResponse) GetStatus() int               { return e.status }
func (e *ErrorResponse) ContentType(ct string) string { return "application/json" }

// GetHeaders returns the response headers of the error; huma merges
// headers added with huma.ErrorWithHeaders into this same map.
func (e *ErrorResponse) GetHeaders() http.Header {
	if e.headers == nil {
		e.headers = http.Header{}
	}
	return e.headers
}

type ctxKey int

const (
	ctxRequest ctxKey = iota
	ctxProduct
)

// requestInfo is what the access log and the handlers share about one
// request: one context value (and one allocation) per request.
type requestInfo struct {
	id      string
	client  netip.Addr      // the address the request is throttled under (clientAddr)
	op      *huma.Operation // the operation routed to (nil outside huma), for checkDocumented
	product string          // the authenticated product's slug, for the log
	err     error           // a 5xx's cause, for the log
}

func infoFrom(ctx context.Context) *requestInfo {
	ri, _ := ctx.Value(ctxRequest).(*requestInfo)
	if ri == nil {
		return &requestInfo{}
	}
	return ri
}

// clientFrom is the address the request is throttled under (clientAddr).
func clientFrom(ctx context.Context) netip.Addr { return infoFrom(ctx).client }

func requestID(ctx context.Context) string { return infoFrom(ctx).id }

// withRetryAfter sets a domain error's Retry-After hint (seconds).
func withRetryAfter(err *orch.Error, seconds int) error {
	err.RetryAfter = seconds
	return err
}

// toHTTP converts any error a handler returns into the envelope. Internal
// causes are logged once by the access log, never sent.
func toHTTP(ctx context.Context, err error) error {
	var ae *ErrorResponse
	if errors.As(err, &ae) {
		return ae
	}
	var de *orch.Error
	out := &ErrorResponse{}
	if errors.As(err, &de) {
		out.status = statusOf(de.Code)
		out.ErrorBody.Error = ErrorDetail{Code: string(de.Code), Message: de.Message}
	} else if schema.Unreachable(err) {
		// A database outage is not the client's fault nor a bug: say so,
		// and when to try again.
		out.status = http.StatusServiceUnavailable
		out.ErrorBody.Error = ErrorDetail{Code: string(orch.CodeUnavailable), Message: "the database is unreachable; retry shortly"}
		out.GetHeaders().Set("Retry-After", "2")
	} else if errors.Is(err, context.DeadlineExceeded) {
		out.status = http.StatusGatewayTimeout
		out.ErrorBody.Error = ErrorDetail{Code: string(orch.CodeBackendTimeout), Message: "the operation timed out"}
	} else {
		out.status = http.StatusInternalServerError
		out.ErrorBody.Error = ErrorDetail{Code: string(orch.CodeInternal), Message: "internal error"}
	}
	if de != nil && de.RetryAfter > 0 {
		out.GetHeaders().Set("Retry-After", strconv.Itoa(de.RetryAfter))
	} else if out.status == http.StatusTooManyRequests {
		out.GetHeaders().Set("Retry-After", "60")
	}
	out.ErrorBody.Error.RequestID = requestID(ctx)
	if ri, ok := ctx.Value(ctxRequest).(*requestInfo); ok && out.status >= 500 {
		ri.err = err
	}
	return out
}

// errorsAs is errors.As over any of errs.
func errorsAs[T error](errs []error, target *T) bool {
	for _, e := range errs {
		if e != nil && errors.As(e, target) {
			return true
		}
	}
	return false
}

func init() {
	// huma's own errors (validation, bad JSON, unknown routes' 404s, 415…)
	// use the contract envelope; validation is 400 INVALID_REQUEST, not 422.
	huma.NewErrorWithContext = func(hctx huma.Context, status int, msg string, errs ...error) huma.StatusError {
		code := orch.CodeInternal
		var tooBig *http.MaxBytesError
		switch {
		case status == http.StatusUnprocessableEntity || status == http.StatusBadRequest ||
			status == http.StatusUnsupportedMediaType || status == http.StatusNotAcceptable:
			code, status = orch.CodeInvalidRequest, http.StatusBadRequest
		case status == http.StatusRequestEntityTooLarge:
			code, msg, errs = orch.CodeInvalidRequest, tooLarge, nil
		case status == http.StatusRequestTimeout:
			// The body did not arrive within the operation's read deadline.
			code = orch.CodeInvalidRequest
		case status == http.StatusNotFound:
			code = orch.CodeNotFound
		case status == http.StatusInternalServerError && errorsAs(errs, &tooBig):
			// Read past MaxBodyBytes (limitBody), chunked.
			code, status, msg, errs = orch.CodeInvalidRequest, http.StatusRequestEntityTooLarge, tooLarge, nil
		case status == http.StatusInternalServerError && msg == "cannot read request body":
			// The client broke off or garbled its body: not our failure.
			code, status = orch.CodeInvalidRequest, http.StatusBadRequest
		}
		for _, e := range errs {
			if e == nil {
				continue
			}
			if status < 500 {
				msg += ": " + e.Error()
			}
			break
		}
		rid := ""
		if hctx != nil {
			rid = requestID(hctx.Context())
		}
		return &ErrorResponse{status: status, ErrorBody: ErrorBody{Error: ErrorDetail{Code: string(code), Message: msg, RequestID: rid}}}
	}
	huma.NewError = func(status int, msg string, errs ...error) huma.StatusError {
		return huma.NewErrorWithContext(nil, status, msg, errs...)
	}
}
