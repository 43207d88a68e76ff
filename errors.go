package orchestrator

import (
	"errors"
	"fmt"
)

// Code is a stable, documented error code. Codes are part of the HTTP
// contract: never rename one.
type Code string

// Error codes of the contract (SPEC §3) and ours.
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

	// Ours.
	CodeOperationInProgress Code = "OPERATION_IN_PROGRESS"
	CodeOperationNotFound   Code = "OPERATION_NOT_FOUND"
	CodeBackendFailed       Code = "BACKEND_FAILED"
	CodeBackendTimeout      Code = "BACKEND_TIMEOUT"
	CodeUnavailable         Code = "SERVICE_UNAVAILABLE"
	CodeBackupNotFound      Code = "BACKUP_NOT_FOUND"
	CodeBackupCorrupt       Code = "BACKUP_CORRUPT"
	CodeExportNotFound      Code = "EXPORT_NOT_FOUND"
	CodeInvalidState        Code = "INVALID_STATE"
	CodeMethodNotAllowed    Code = "METHOD_NOT_ALLOWED"
	CodeWebhookNotFound     Code = "WEBHOOK_NOT_FOUND"
	CodeDeliveryNotFound    Code = "DELIVERY_NOT_FOUND"
)

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
