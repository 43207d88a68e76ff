package api

import (
	"context"
	"net/http"
	"time"

	"github.com/danielgtaylor/huma/v2"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/schema"
	"github.com/enginefleet/orchestrator/webhooks"
)

// Webhooks: a product's endpoints, their signing secrets and delivery log
// (docs/webhooks.md). The webhooks package does the work.

// WebhookBody is an endpoint as the API shows it (never its secret).
type WebhookBody struct {
	WebhookID            string     `json:"webhook_id" format:"uuid"`
	URL                  string     `json:"url"`
	Description          string     `json:"description"`
	EventTypes           []string   `json:"event_types" doc:"The event types sent; empty = every type"`
	Status               string     `json:"status" enum:"active,failing" doc:"failing once a delivery exhausted its retries: new deliveries then get one attempt each until one succeeds"`
	FailingSince         *time.Time `json:"failing_since,omitempty"`
	PreviousSecretExpiry *time.Time `json:"previous_secret_expires_at,omitempty" doc:"While set and in the future, deliveries are signed with the previous secret too"`
	CreatedAt            time.Time  `json:"created_at"`
}

func toWebhookBody(e schema.WebhookEndpoint) WebhookBody {
	b := WebhookBody{WebhookID: e.ID, URL: e.URL, Description: e.Description, EventTypes: e.EventTypes, Status: e.Status,
		FailingSince: e.FailingSince, CreatedAt: e.CreatedAt}
	if b.EventTypes == nil {
		b.EventTypes = []string{}
	}
	if e.PreviousExpiresAt != nil && e.PreviousExpiresAt.After(time.Now()) {
		b.PreviousSecretExpiry = e.PreviousExpiresAt
	}
	return b
}

// CreateWebhookBody answers POST /webhooks: the endpoint and its secret.
type CreateWebhookBody struct {
	WebhookBody
	Secret string `json:"secret" doc:"The signing secret (whsec_…). Shown only now: verify each delivery's Webhook-Signature with it."`
}

type createWebhookInput struct {
	Body struct {
		URL         string   `json:"url" minLength:"1" maxLength:"2048" doc:"https URL (http only to a loopback address unless the operator allows it); private, loopback and link-local destinations are refused unless the operator allows them"`
		Description string   `json:"description,omitempty" maxLength:"200"`
		EventTypes  []string `json:"event_types,omitempty" maxItems:"32" doc:"Event types to send (engine.provisioned, engine.failed, engine.crashed, engine.restarted, engine.gave_up, engine.slept, engine.woke, engine.upgraded, engine.destroyed, backup.completed, backup.failed, restore.completed); omitted or empty = every type"`
	}
}

type webhookPath struct {
	WebhookID string `path:"webhook_id" doc:"The endpoint's id"`
}

type rotateWebhookSecretInput struct {
	WebhookID string `path:"webhook_id" doc:"The endpoint's id"`
	Body      *struct {
		OverlapSeconds *int `json:"overlap_seconds,omitempty" minimum:"0" maximum:"2592000" doc:"How long deliveries are signed with the current secret too (default 86400, 24 h; 0 = stops now)"`
	} `required:"false"`
}

// RotateWebhookSecretBody answers rotate-webhook-secret. The secret is shown once.
type RotateWebhookSecretBody struct {
	WebhookBody
	Secret string `json:"secret" doc:"The new signing secret. Shown only now."`
}

// DeliveryBody is one delivery of an event to an endpoint.
type DeliveryBody struct {
	DeliveryID      string     `json:"delivery_id" format:"uuid"`
	EventID         string     `json:"event_id" format:"uuid" doc:"The event's id (Webhook-Id): the same on every redelivery"`
	EventType       string     `json:"event_type"`
	State           string     `json:"state" enum:"pending,queued,delivered,failed" doc:"pending: waits for an earlier event of the same engine; queued: being attempted (or waiting for its next retry)"`
	Attempts        int        `json:"attempts"`
	LastAttemptAt   *time.Time `json:"last_attempt_at,omitempty"`
	NextAttemptAt   *time.Time `json:"next_attempt_at,omitempty"`
	ResponseStatus  *int       `json:"response_status,omitempty" doc:"The last attempt's HTTP status"`
	ResponseExcerpt string     `json:"response_excerpt,omitempty" doc:"The start (256 bytes at most) of the last response's body"`
	LastError       string     `json:"last_error,omitempty"`
	RedeliveryOf    string     `json:"redelivery_of,omitempty" doc:"The delivery this one redelivers"`
	CreatedAt       time.Time  `json:"created_at"`
	FinishedAt      *time.Time `json:"finished_at,omitempty"`
}

func toDeliveryBody(d schema.WebhookDelivery) DeliveryBody {
	b := DeliveryBody{DeliveryID: d.ID, EventID: d.EventID, EventType: d.EventType, State: d.State, Attempts: d.Attempts,
		LastAttemptAt: d.LastAttemptAt, ResponseStatus: d.ResponseStatus, ResponseExcerpt: d.ResponseExcerpt,
		LastError: d.LastError, RedeliveryOf: d.RedeliveryOf, CreatedAt: d.CreatedAt, FinishedAt: d.FinishedAt}
	if d.State == schema.DeliveryQueued {
		b.NextAttemptAt = d.NextAttemptAt
	}
	return b
}

// WebhookListBody answers GET /webhooks.
type WebhookListBody struct {
	Webhooks []WebhookBody `json:"webhooks"`
}

// DeliveryListBody answers GET /webhooks/{webhook_id}/deliveries.
type DeliveryListBody struct {
	Deliveries []DeliveryBody `json:"deliveries"`
}

type listDeliveriesInput struct {
	WebhookID string    `path:"webhook_id" doc:"The endpoint's id"`
	State     string    `query:"state" enum:"pending,queued,delivered,failed" doc:"Only deliveries in this state"`
	EventID   string    `query:"event_id" doc:"Only deliveries of this event"`
	Before    time.Time `query:"before" doc:"Only deliveries created before this time (the next page: the last one's created_at)"`
	Limit     int       `query:"limit" default:"100" minimum:"1" maximum:"1000"`
}

type redeliverInput struct {
	WebhookID  string `path:"webhook_id" doc:"The endpoint's id"`
	DeliveryID string `path:"delivery_id" doc:"The delivery whose event to send again"`
}

func (s *Server) webhookOp(o huma.Operation) huma.Operation {
	o = s.op(o)
	o.Tags = []string{"webhooks"}
	return o
}

func (s *Server) webhooks() (*webhooks.Endpoints, error) {
	if s.cfg.Webhooks == nil {
		return nil, orch.Errorf(orch.CodeUnavailable, "webhooks are not configured on this replica")
	}
	return s.cfg.Webhooks, nil
}

func (s *Server) registerWebhooks() {
	huma.Register(s.api, s.webhookOp(huma.Operation{
		OperationID: "create-webhook", Method: http.MethodPost, Path: "/webhooks", DefaultStatus: http.StatusCreated,
		Summary:     "Register a webhook endpoint",
		Description: "Lifecycle events of the product's engines are POSTed to the URL, signed (Webhook-Signature). The signing secret is returned once. At most 10 endpoints per product.",
		Metadata:    codes(orch.CodeQuotaExceeded),
	}), func(ctx context.Context, in *createWebhookInput) (*struct{ Body CreateWebhookBody }, error) {
		wh, err := s.webhooks()
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		e, secret, err := wh.Create(ctx, productFrom(ctx).ID, webhooks.NewEndpoint{URL: in.Body.URL,
			Description: in.Body.Description, EventTypes: in.Body.EventTypes})
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		return &struct{ Body CreateWebhookBody }{CreateWebhookBody{toWebhookBody(e), secret}}, nil
	})

	huma.Register(s.api, s.webhookOp(huma.Operation{
		OperationID: "list-webhooks", Method: http.MethodGet, Path: "/webhooks",
		Summary:  "List the product's webhook endpoints",
		Metadata: codes(),
	}), func(ctx context.Context, _ *struct{}) (*struct{ Body WebhookListBody }, error) {
		wh, err := s.webhooks()
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		es, err := wh.List(ctx, productFrom(ctx).ID)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		out := &struct{ Body WebhookListBody }{}
		out.Body.Webhooks = make([]WebhookBody, 0, len(es))
		for _, e := range es {
			out.Body.Webhooks = append(out.Body.Webhooks, toWebhookBody(e))
		}
		return out, nil
	})

	huma.Register(s.api, s.webhookOp(huma.Operation{
		OperationID: "get-webhook", Method: http.MethodGet, Path: "/webhooks/{webhook_id}",
		Summary:  "Get a webhook endpoint",
		Metadata: codes(orch.CodeWebhookNotFound),
	}), func(ctx context.Context, in *webhookPath) (*struct{ Body WebhookBody }, error) {
		wh, err := s.webhooks()
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		e, err := wh.Get(ctx, productFrom(ctx).ID, in.WebhookID)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		return &struct{ Body WebhookBody }{toWebhookBody(e)}, nil
	})

	huma.Register(s.api, s.webhookOp(huma.Operation{
		OperationID: "delete-webhook", Method: http.MethodDelete, Path: "/webhooks/{webhook_id}", DefaultStatus: http.StatusNoContent,
		Summary:     "Delete a webhook endpoint",
		Description: "Nothing more is sent to it (an attempt already in flight may still arrive); its delivery log goes with it.",
		Metadata:    codes(orch.CodeWebhookNotFound),
	}), func(ctx context.Context, in *webhookPath) (*struct{}, error) {
		wh, err := s.webhooks()
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		if err := wh.Delete(ctx, productFrom(ctx).ID, in.WebhookID); err != nil {
			return nil, toHTTP(ctx, err)
		}
		return &struct{}{}, nil
	})

	huma.Register(s.api, s.webhookOp(huma.Operation{
		OperationID: "rotate-webhook-secret", Method: http.MethodPost, Path: "/webhooks/{webhook_id}/rotate-secret",
		Summary: "Rotate an endpoint's signing secret",
		Description: "Returns a new secret, once. Deliveries are signed with both the new and the current secret (two v1 values) " +
			"for overlap_seconds, so the receiver can switch without dropping any.",
		Metadata: codes(orch.CodeWebhookNotFound),
	}), func(ctx context.Context, in *rotateWebhookSecretInput) (*struct{ Body RotateWebhookSecretBody }, error) {
		wh, err := s.webhooks()
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		overlap := defaultKeyOverlap
		if in.Body != nil && in.Body.OverlapSeconds != nil {
			overlap = *in.Body.OverlapSeconds
		}
		e, secret, err := wh.RotateSecret(ctx, productFrom(ctx).ID, in.WebhookID, time.Duration(overlap)*time.Second)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		return &struct{ Body RotateWebhookSecretBody }{RotateWebhookSecretBody{toWebhookBody(e), secret}}, nil
	})

	huma.Register(s.api, s.webhookOp(huma.Operation{
		OperationID: "list-webhook-deliveries", Method: http.MethodGet, Path: "/webhooks/{webhook_id}/deliveries",
		Summary:  "List an endpoint's deliveries, newest first",
		Metadata: codes(orch.CodeWebhookNotFound),
	}), func(ctx context.Context, in *listDeliveriesInput) (*struct{ Body DeliveryListBody }, error) {
		wh, err := s.webhooks()
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		f := schema.DeliveryFilter{EndpointID: in.WebhookID, State: in.State, EventID: in.EventID, Limit: in.Limit}
		if !in.Before.IsZero() {
			f.Before = &in.Before
		}
		ds, err := wh.Deliveries(ctx, productFrom(ctx).ID, f)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		out := &struct{ Body DeliveryListBody }{}
		out.Body.Deliveries = make([]DeliveryBody, 0, len(ds))
		for _, d := range ds {
			out.Body.Deliveries = append(out.Body.Deliveries, toDeliveryBody(d))
		}
		return out, nil
	})

	huma.Register(s.api, s.webhookOp(huma.Operation{
		OperationID: "redeliver-webhook", Method: http.MethodPost, Path: "/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver",
		DefaultStatus: http.StatusAccepted,
		Summary:       "Send a delivery's event again",
		Description:   "A new delivery of the same event (same id, so receivers dedupe), attempted and retried like any other but outside the engine's order.",
		Metadata:      codes(orch.CodeWebhookNotFound, orch.CodeDeliveryNotFound),
	}), func(ctx context.Context, in *redeliverInput) (*struct{ Body DeliveryBody }, error) {
		wh, err := s.webhooks()
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		d, err := wh.Redeliver(ctx, productFrom(ctx).ID, in.WebhookID, in.DeliveryID)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		return &struct{ Body DeliveryBody }{toDeliveryBody(d)}, nil
	})
}
