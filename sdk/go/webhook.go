package enginefleet

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Webhooks: the orchestrator POSTs lifecycle events to a product's
// endpoints, signed with the endpoint's secret (docs/webhooks.md). A
// receiver verifies the signature, drops what it has seen (event ids), and
// answers 2xx quickly.

// Webhook headers.
const (
	WebhookIDHeader        = "Webhook-Id"        // the event id: dedupe on it
	WebhookEventHeader     = "Webhook-Event"     // the event type
	WebhookSignatureHeader = "Webhook-Signature" // t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">[,v1=…]
)

// WebhookTolerance is the default age past which a signature is refused as
// a replay (the orchestrator signs each attempt afresh).
const WebhookTolerance = 5 * time.Minute

// Webhook event types.
const (
	EventEngineProvisioned = "engine.provisioned"
	EventEngineFailed      = "engine.failed"
	EventEngineCrashed     = "engine.crashed"
	EventEngineRestarted   = "engine.restarted"
	EventEngineGaveUp      = "engine.gave_up"
	EventEngineSlept       = "engine.slept"
	EventEngineWoke        = "engine.woke"
	EventEngineUpgraded    = "engine.upgraded"
	EventEngineDestroyed   = "engine.destroyed"
	EventBackupCompleted   = "backup.completed"
	EventBackupFailed      = "backup.failed"
	EventRestoreCompleted  = "restore.completed"
)

// Errors of webhook verification.
var (
	ErrWebhookSignature = errors.New("webhook: no valid signature")
	ErrWebhookTimestamp = errors.New("webhook: timestamp outside the tolerance (a replay or a skewed clock)")
)

// WebhookEvent is the body of every webhook (schema version 1).
type WebhookEvent struct {
	ID        string          `json:"id"`       // the same on every delivery of the event: dedupe on it
	Type      string          `json:"type"`     // one of the Event* constants
	Version   int             `json:"version"`  // 1
	Sequence  int64           `json:"sequence"` // increases with recording time across the fleet: drop an engine's event older than one already applied
	Time      time.Time       `json:"time"`
	ProductID string          `json:"product_id"`
	Product   string          `json:"product"` // the product's slug
	UserID    string          `json:"user_id,omitempty"`
	EngineID  string          `json:"engine_id,omitempty"`
	Data      json.RawMessage `json:"data"`
}

// EngineEventData is the data of engine.* events. Fields that do not apply
// to an event are empty.
type EngineEventData struct {
	Action      string `json:"action"` // the audit action behind it (provision, health_failed, …)
	Actor       string `json:"actor"`  // the product's slug, "system" or "admin"
	DurationMS  *int64 `json:"duration_ms,omitempty"`
	OperationID string `json:"operation_id,omitempty"`
	ErrorCode   string `json:"error_code,omitempty"` // engine.failed
	Error       string `json:"error,omitempty"`
	Reason      string `json:"reason,omitempty"` // engine.crashed: crash or probes; engine.slept: why
	ExitCode    *int   `json:"exit_code,omitempty"`
	OOM         bool   `json:"oom,omitempty"`
	From        string `json:"from,omitempty"` // the state it left
}

// BackupEventData is the data of backup.* and restore.* events.
type BackupEventData struct {
	Action      string `json:"action"`
	Actor       string `json:"actor"`
	DurationMS  *int64 `json:"duration_ms,omitempty"`
	OperationID string `json:"operation_id,omitempty"`
	BackupID    string `json:"backup_id,omitempty"`
	Trigger     string `json:"trigger,omitempty"`
	SizeBytes   int64  `json:"size_bytes,omitempty"`
	SHA256      string `json:"sha256,omitempty"`
	ErrorCode   string `json:"error_code,omitempty"` // backup.failed
	Error       string `json:"error,omitempty"`
}

// EngineData decodes the data of an engine.* event.
func (e *WebhookEvent) EngineData() (EngineEventData, error) {
	var d EngineEventData
	if !strings.HasPrefix(e.Type, "engine.") {
		return d, fmt.Errorf("webhook: %s is not an engine event", e.Type)
	}
	return d, json.Unmarshal(e.Data, &d)
}

// BackupData decodes the data of a backup.* or restore.* event.
func (e *WebhookEvent) BackupData() (BackupEventData, error) {
	var d BackupEventData
	if !strings.HasPrefix(e.Type, "backup.") && !strings.HasPrefix(e.Type, "restore.") {
		return d, fmt.Errorf("webhook: %s is not a backup or restore event", e.Type)
	}
	return d, json.Unmarshal(e.Data, &d)
}

// VerifyWebhookSignature checks a Webhook-Signature header against body:
// one v1 must be the HMAC-SHA256 of "<t>.<body>" under one of secrets (give
// two while rotating), and t within tolerance of now (0 = WebhookTolerance).
func VerifyWebhookSignature(header string, body []byte, secrets []string, tolerance time.Duration, now time.Time) error {
	if tolerance <= 0 {
		tolerance = WebhookTolerance
	}
	var ts string
	var sigs [][]byte
	for _, part := range strings.Split(header, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			continue
		}
		switch k {
		case "t":
			ts = v
		case "v1":
			if b, err := hex.DecodeString(v); err == nil {
				sigs = append(sigs, b)
			}
		}
	}
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil || len(sigs) == 0 {
		return ErrWebhookSignature
	}
	valid := false
	for _, s := range secrets {
		m := hmac.New(sha256.New, []byte(s))
		m.Write([]byte(ts))
		m.Write([]byte{'.'})
		m.Write(body)
		want := m.Sum(nil)
		for _, sig := range sigs {
			if hmac.Equal(sig, want) {
				valid = true
			}
		}
	}
	if !valid {
		return ErrWebhookSignature
	}
	// Checked after the signature, so a forged timestamp is a bad signature.
	if d := now.Sub(time.Unix(sec, 0)); d > tolerance || d < -tolerance {
		return ErrWebhookTimestamp
	}
	return nil
}

// ParseWebhook verifies a delivery's body and signature header and decodes
// the event.
func ParseWebhook(body []byte, signature string, secrets ...string) (*WebhookEvent, error) {
	if err := VerifyWebhookSignature(signature, body, secrets, 0, time.Now()); err != nil {
		return nil, err
	}
	var e WebhookEvent
	if err := json.Unmarshal(body, &e); err != nil {
		return nil, fmt.Errorf("webhook: decode event: %w", err)
	}
	return &e, nil
}

// maxWebhookBody bounds what ReadWebhook reads (events are a few KiB).
const maxWebhookBody = 1 << 20

// ReadWebhook reads, verifies and decodes a delivery from its request.
// Answer 2xx once the event is stored (or known); 4xx on an error here.
func ReadWebhook(r *http.Request, secrets ...string) (*WebhookEvent, error) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxWebhookBody+1))
	if err != nil {
		return nil, fmt.Errorf("webhook: read body: %w", err)
	}
	if len(body) > maxWebhookBody {
		return nil, errors.New("webhook: body too large")
	}
	return ParseWebhook(body, r.Header.Get(WebhookSignatureHeader), secrets...)
}
