package orchestrator

import (
	"errors"
	"fmt"
	"net/http"
)

// Code is a stable, documented error code. Codes are part of the HTTP
// contract: never rename one.
type Code string

// Error codes. Every code the API can answer is one of these, and each is
// in Codes with its HTTP status and when it happens: docs/api.md and the
// ErrorCode enum of openapi.yaml are generated from that table.
const (
	CodeInvalidRequest       Code = "INVALID_REQUEST"
	CodeInvalidAdminKey      Code = "INVALID_ADMIN_KEY"
	CodeInvalidPlatformKey   Code = "INVALID_PLATFORM_KEY"
	CodePolicyDenied         Code = "POLICY_DENIED"
	CodeProductNotFound      Code = "PRODUCT_NOT_FOUND"
	CodeProductSlugExists    Code = "PRODUCT_SLUG_EXISTS"
	CodeEngineNotFound       Code = "ENGINE_NOT_FOUND"
	CodeEngineAlreadyExists  Code = "ENGINE_ALREADY_EXISTS"
	CodeEngineAlreadyRunning Code = "ENGINE_ALREADY_RUNNING"
	CodeEngineNotRunning     Code = "ENGINE_NOT_RUNNING"
	CodeQuotaExceeded        Code = "QUOTA_EXCEEDED"
	CodeRateLimited          Code = "RATE_LIMITED"
	CodePortExhaustion       Code = "PORT_EXHAUSTION"
	CodeBootTimeout          Code = "BOOT_TIMEOUT"
	CodeInternal             Code = "INTERNAL_ERROR"
	CodeNotFound             Code = "NOT_FOUND"
	CodeOperationInProgress  Code = "OPERATION_IN_PROGRESS"
	CodeOperationNotFound    Code = "OPERATION_NOT_FOUND"
	CodeBackendFailed        Code = "BACKEND_FAILED"
	CodeBackendTimeout       Code = "BACKEND_TIMEOUT"
	CodeUnavailable          Code = "SERVICE_UNAVAILABLE"
	CodeBackupNotFound       Code = "BACKUP_NOT_FOUND"
	CodeBackupCorrupt        Code = "BACKUP_CORRUPT"
	CodeExportNotFound       Code = "EXPORT_NOT_FOUND"
	CodeInvalidState         Code = "INVALID_STATE"
	CodeMethodNotAllowed     Code = "METHOD_NOT_ALLOWED"
	CodeWebhookNotFound      Code = "WEBHOOK_NOT_FOUND"
	CodeDeliveryNotFound     Code = "DELIVERY_NOT_FOUND"
)

// CodeInfo is one code of the registry: the HTTP status it is answered
// with and, for the reader of the API's documentation, when it happens.
type CodeInfo struct {
	Code   Code
	Status int
	When   string
}

// Codes is the registry of every error code, in the order the
// documentation lists them. A code added above must be added here (a test
// parses this file and fails otherwise); a route that can answer it
// declares it (api: codes(...)).
var Codes = []CodeInfo{
	{CodeInvalidRequest, http.StatusBadRequest, "The request is malformed: a field, parameter or header fails validation (a user_id outside 1-128 characters of [A-Za-z0-9._@:|+=~-], an unknown policy key, an engine_version the allowlist refuses, bad JSON). Also answered with 413 when the body exceeds 1 MiB and 408 when the body does not arrive within 5 s."},
	{CodeInvalidAdminKey, http.StatusUnauthorized, "X-Admin-Key is missing or is not the orchestrator's admin key (admin routes)."},
	{CodeInvalidPlatformKey, http.StatusUnauthorized, "X-Platform-Key is missing or belongs to no product (or was rotated out and its overlap has ended)."},
	{CodePolicyDenied, http.StatusForbidden, "The request is refused by policy: a cross-origin request to the operator's job UI."},
	{CodeProductNotFound, http.StatusNotFound, "No product has this id (admin routes, audit exports of one product)."},
	{CodeProductSlugExists, http.StatusConflict, "A product with this slug is already registered."},
	{CodeEngineNotFound, http.StatusNotFound, "The calling product has no engine for this user_id (another product's engine is indistinguishable from a missing one); also an operation whose engine was destroyed while it waited."},
	{CodeEngineAlreadyExists, http.StatusConflict, "Provision of a user who already has an engine (admit with auto_provision is the idempotent way)."},
	{CodeEngineAlreadyRunning, http.StatusConflict, "Start of an engine that is already running."},
	{CodeEngineNotRunning, http.StatusConflict, "Stop, rotate-key or backup of an engine that is not running (stopped, sleeping with its container stopped, failed)."},
	{CodeQuotaExceeded, http.StatusTooManyRequests, "A provision (or an admit with auto_provision that would provision) when the product already has max_engines engines. Retry-After is set; freeing an engine (destroy) or raising the policy ends it."},
	{CodeRateLimited, http.StatusTooManyRequests, "Admits beyond the product's rate_limit_rpm in the current minute (Retry-After: when the next window opens), or a client that keeps presenting wrong keys (Retry-After: when it may try again)."},
	{CodePortExhaustion, http.StatusServiceUnavailable, "No engine port is free in ORCH_PORT_MIN..ORCH_PORT_MAX on the node: widen the range or destroy engines."},
	{CodeBootTimeout, http.StatusGatewayTimeout, "An engine did not answer /health ok within ORCH_BOOT_TIMEOUT_S (provision, start, wake, restart, upgrade, restore), or the request stopped waiting first: the operation may still finish, follow it at GET /operations/{operation_id}."},
	{CodeInternal, http.StatusInternalServerError, "A bug or an unexpected failure; the cause is logged under the request id, never sent."},
	{CodeNotFound, http.StatusNotFound, "No route has this path (or the path is not clean, e.g. // or /../)."},
	{CodeOperationInProgress, http.StatusConflict, "Another operation on this engine is pending or running (one at a time per engine), or this operation was superseded by a later one."},
	{CodeOperationNotFound, http.StatusNotFound, "The calling product has no operation with this id."},
	{CodeBackendFailed, http.StatusBadGateway, "The backend (Docker, Kubernetes, the engine process) failed the operation after its retries; the engine's last_error and the audit row say why."},
	{CodeBackendTimeout, http.StatusGatewayTimeout, "An operation that does not boot an engine (stop, destroy, backup…) did not finish within the request's wait: it goes on, follow it at GET /operations/{operation_id}."},
	{CodeUnavailable, http.StatusServiceUnavailable, "Postgres is unreachable, or this replica is shutting down; Retry-After says when to retry. Nothing in flight is lost."},
	{CodeBackupNotFound, http.StatusNotFound, "The user has no backup with this id."},
	{CodeBackupCorrupt, http.StatusBadGateway, "A restore's backup file is missing, unreadable or does not match the SHA-256 recorded when it was taken: nothing was changed."},
	{CodeExportNotFound, http.StatusNotFound, "No audit export has this id."},
	{CodeInvalidState, http.StatusConflict, "The engine's state does not allow the operation (e.g. restoring into an engine that is being destroyed)."},
	{CodeMethodNotAllowed, http.StatusMethodNotAllowed, "The path exists but not with this method; Allow lists the methods it takes."},
	{CodeWebhookNotFound, http.StatusNotFound, "The calling product has no webhook endpoint with this id."},
	{CodeDeliveryNotFound, http.StatusNotFound, "The webhook endpoint has no delivery with this id."},
}

var codeIndex = func() map[Code]CodeInfo {
	m := make(map[Code]CodeInfo, len(Codes))
	for _, c := range Codes {
		m[c.Code] = c
	}
	return m
}()

// Status is the HTTP status the code is answered with (500 for a code not
// in the registry).
func (c Code) Status() int {
	if i, ok := codeIndex[c]; ok {
		return i.Status
	}
	return http.StatusInternalServerError
}

// Known reports whether c is in the registry.
func (c Code) Known() bool { _, ok := codeIndex[c]; return ok }

// Error is a domain error carrying a stable code and a message safe to
// show to the caller. Err, when set, is the internal cause: it is logged,
// never sent. RetryAfter, when set, tells the caller how many seconds to
// wait before trying again (429, 503).
type Error struct {
	Code       Code
	Message    string
	Err        error
	RetryAfter int
}

func (e *Error) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("%s: %s: %v", e.Code, e.Message, e.Err)
	}
	return fmt.Sprintf("%s: %s", e.Code, e.Message)
}

func (e *Error) Unwrap() error { return e.Err }

// Errorf returns an *Error with the given code and formatted message.
func Errorf(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// ErrorCode returns the code of the first *Error in err's chain, or
// CodeInternal when there is none.
func ErrorCode(err error) Code {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return CodeInternal
}

// IsCode reports whether err carries code.
func IsCode(err error, code Code) bool {
	var e *Error
	return errors.As(err, &e) && e.Code == code
}
