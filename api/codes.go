package api

import (
	"encoding/json"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"unicode"

	"github.com/danielgtaylor/huma/v2"

	orch "github.com/enginefleet/orchestrator"
)

// How a route documents its error codes
//
// Every operation puts the codes it can answer in its Metadata:
//
//	huma.Register(s.api, s.op(huma.Operation{
//		OperationID: "start-engine", …,
//		Metadata: codes(orch.CodeEngineNotFound, orch.CodeEngineAlreadyRunning),
//	}), handler)
//
// Codes every operation of its kind answers are added for it (commonCodes:
// the key's 401 and 429, INVALID_REQUEST when it takes input, 500, 503).
// documentErrors turns the declarations into one response per status in
// openapi.yaml, each listing its codes (x-error-codes); the status of a
// code is the registry's (orch.Codes). At run time every error answer is
// checked against the document (checkDocumented): an undocumented code is
// logged, and fails the test that provoked it.

// metaCodes is the Metadata key of an operation's declared codes.
const metaCodes = "error-codes"

// codes declares the error codes an operation answers beyond commonCodes.
func codes(cs ...orch.Code) map[string]any { return map[string]any{metaCodes: cs} }

// answer is a documented error: a status and a code.
type answer struct {
	status int
	code   orch.Code
}

// commonCodes are the answers every operation like op can give: its key's
// refusal and the throttle of clients that keep failing it, validation
// (when it takes input), a body too large or too slow (when it takes one),
// a database outage and a bug.
func commonCodes(op *huma.Operation) []answer {
	as := []answer{{http.StatusInternalServerError, orch.CodeInternal}}
	if _, own := op.Responses["503"]; !own { // GET /health answers its own 503
		as = append(as, answer{http.StatusServiceUnavailable, orch.CodeUnavailable})
	}
	if hasScheme(op, securityAdmin) {
		as = append(as, answer{http.StatusUnauthorized, orch.CodeInvalidAdminKey}, answer{http.StatusTooManyRequests, orch.CodeRateLimited})
	}
	if hasScheme(op, securityPlatform) { // both: an operation either key may call (rollouts)
		as = append(as, answer{http.StatusUnauthorized, orch.CodeInvalidPlatformKey}, answer{http.StatusTooManyRequests, orch.CodeRateLimited})
	}
	if len(op.Parameters) > 0 || op.RequestBody != nil {
		as = append(as, answer{http.StatusBadRequest, orch.CodeInvalidRequest})
	}
	if op.RequestBody != nil {
		as = append(as, answer{http.StatusRequestEntityTooLarge, orch.CodeInvalidRequest}, answer{http.StatusRequestTimeout, orch.CodeInvalidRequest})
	}
	return as
}

// declaredCodes is everything op answers: commonCodes and its own.
func declaredCodes(op *huma.Operation) map[int][]orch.Code {
	out := map[int][]orch.Code{}
	add := func(a answer) {
		if !slices.Contains(out[a.status], a.code) {
			out[a.status] = append(out[a.status], a.code)
		}
	}
	for _, a := range commonCodes(op) {
		add(a)
	}
	own, ok := op.Metadata[metaCodes].([]orch.Code)
	if !ok {
		panic("api: operation " + op.OperationID + " declares no error codes: add Metadata: codes(...) (see api/codes.go)")
	}
	for _, c := range own {
		if !c.Known() {
			panic("api: operation " + op.OperationID + " declares " + string(c) + ", which is not in orch.Codes")
		}
		add(answer{c.Status(), c})
	}
	return out
}

// errorCodesExt is the extension of an error response listing its codes.
const errorCodesExt = "x-error-codes"

// documentErrors replaces the error responses huma made from op.Errors
// with one response per status of the operation's declared codes, each
// saying its codes (in words and in x-error-codes), and returns what it
// documented for the run-time check.
func documentErrors(op *huma.Operation) map[int]map[orch.Code]bool {
	for k, r := range op.Responses {
		if k == "default" || isEnvelope(r) {
			delete(op.Responses, k) // huma's, from op.Errors
		}
	}
	decl := declaredCodes(op)
	documented := map[int]map[orch.Code]bool{}
	for status, cs := range decl {
		slices.Sort(cs)
		documented[status] = map[orch.Code]bool{}
		names := make([]string, len(cs))
		for i, c := range cs {
			documented[status][c] = true
			names[i] = string(c)
		}
		r := &huma.Response{
			Description: http.StatusText(status) + ": " + strings.Join(names, ", "),
			Content:     map[string]*huma.MediaType{"application/json": {Schema: &huma.Schema{Ref: "#/components/schemas/ErrorResponse"}}},
			Extensions:  map[string]any{errorCodesExt: names},
		}
		if status == http.StatusTooManyRequests || status == http.StatusServiceUnavailable {
			r.Headers = map[string]*huma.Param{"Retry-After": {Description: "Seconds to wait before retrying", Schema: &huma.Schema{Type: "integer"}}}
		}
		op.Responses[strconv.Itoa(status)] = r
	}
	return documented
}

// isEnvelope reports whether r answers the error envelope.
func isEnvelope(r *huma.Response) bool {
	if r == nil || r.Content == nil || r.Content["application/json"] == nil || r.Content["application/json"].Schema == nil {
		return false
	}
	return strings.HasSuffix(r.Content["application/json"].Schema.Ref, "/ErrorResponse")
}

// enumSchemas adds the ErrorCode and AuditAction enums, from the
// registries, and makes the error envelope's code, a failed operation's
// error_code and the audit entries' (and filter's) action refer to them.
func enumSchemas(doc *huma.OpenAPI) {
	schemas := doc.Components.Schemas.Map()
	var codeNames, codeVars []any
	var desc strings.Builder
	desc.WriteString("Stable error code. Never renamed; new codes may be added.\n\n")
	for _, c := range orch.Codes {
		codeNames = append(codeNames, string(c.Code))
		codeVars = append(codeVars, camel(string(c.Code)))
		desc.WriteString("- `" + string(c.Code) + "` (" + strconv.Itoa(c.Status) + "): " + c.When + "\n")
	}
	schemas["ErrorCode"] = &huma.Schema{Type: "string", Enum: codeNames, Description: desc.String(),
		Extensions: map[string]any{"x-enum-varnames": codeVars}}
	var actNames, actVars []any
	desc.Reset()
	desc.WriteString("Audit action. Names are permanent; new actions may be added.\n\n")
	for _, a := range orch.Actions {
		actNames = append(actNames, string(a.Action))
		actVars = append(actVars, camel(string(a.Action)))
		desc.WriteString("- `" + string(a.Action) + "`: " + a.When + "\n")
	}
	schemas["AuditAction"] = &huma.Schema{Type: "string", Enum: actNames, Description: desc.String(),
		Extensions: map[string]any{"x-enum-varnames": actVars}}

	if d := schemas["ErrorDetail"]; d != nil {
		d.Properties["code"] = &huma.Schema{Ref: "#/components/schemas/ErrorCode"}
	}
	if o := schemas["OperationBody"]; o != nil && o.Properties["error_code"] != nil {
		// A failed operation's code is one of the same set.
		o.Properties["error_code"] = &huma.Schema{Ref: "#/components/schemas/ErrorCode"}
	}
	if a := schemas["AuditEntryBody"]; a != nil {
		a.Properties["action"] = &huma.Schema{Ref: "#/components/schemas/AuditAction"}
	}
	if item := doc.Paths["/audit"]; item != nil && item.Get != nil {
		for _, p := range item.Get.Parameters {
			if p.Name == "action" && p.In == "query" {
				p.Schema = &huma.Schema{Ref: "#/components/schemas/AuditAction"}
			}
		}
	}
}

// camel turns RATE_LIMITED or auto_restart_gave_up into RateLimited,
// AutoRestartGaveUp: the names generators give the enum's constants.
func camel(s string) string {
	var b strings.Builder
	for _, part := range strings.Split(strings.ToLower(s), "_") {
		if part == "" {
			continue
		}
		r := []rune(part)
		r[0] = unicode.ToUpper(r[0])
		b.WriteString(string(r))
	}
	return b.String()
}

// errorCodeOf is the code of an envelope body, "" when it is none.
func errorCodeOf(body []byte) orch.Code {
	var b struct {
		Error struct {
			Code string `json:"code"`
		} `json:"error"`
	}
	if json.Unmarshal(body, &b) != nil {
		return ""
	}
	return orch.Code(b.Error.Code)
}

// checkDocumented checks an error answer of op against the document: a
// status or code it does not list is logged (and reported to
// Config.UndocumentedError, which the tests make fail).
func (s *Server) checkDocumented(op *huma.Operation, status int, body []byte) {
	doc, ok := s.documented[op.OperationID]
	if !ok {
		return
	}
	code := errorCodeOf(body)
	byStatus, listed := doc[status]
	if listed && (code == "" || byStatus[code]) {
		return
	}
	if !listed {
		if _, own := op.Responses[strconv.Itoa(status)]; own && code == "" {
			return // the operation's own answer (GET /health's 503)
		}
	}
	s.log.Warn("error answer not in openapi.yaml", "operation", op.OperationID, "status", status, "code", string(code))
	if s.cfg.UndocumentedError != nil {
		s.cfg.UndocumentedError(op.OperationID, status, string(code))
	}
}
