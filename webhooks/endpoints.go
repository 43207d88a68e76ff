package webhooks

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

// MaxEndpoints is how many endpoints one product may register.
const MaxEndpoints = 10

// SecretPrefix starts every signing secret, so one found in a config file
// or a leak scanner is recognised for what it is.
const SecretPrefix = "whsec_"

// Endpoints is the request side: a product's endpoints, their secrets and
// deliveries (the API's /webhooks routes call it).
type Endpoints struct {
	policy Policy
	pool   *pgxpool.Pool
	kr     *keys.Keyring
}

// NewEndpoints builds the request side on pool; secrets are encrypted
// under kr.
func NewEndpoints(policy Policy, pool *pgxpool.Pool, kr *keys.Keyring) *Endpoints {
	return &Endpoints{policy: policy, pool: pool, kr: kr}
}

// NewEndpoint is what a product registers.
type NewEndpoint struct {
	URL         string
	Description string
	EventTypes  []string // empty = every type
}

// Create registers an endpoint and returns it with its signing secret
// (shown once: only its encryption is stored).
func (s *Endpoints) Create(ctx context.Context, productID string, n NewEndpoint) (schema.WebhookEndpoint, string, error) {
	if err := s.policy.CheckURL(n.URL); err != nil {
		return schema.WebhookEndpoint{}, "", orch.Errorf(orch.CodeInvalidRequest, "url: %s", err)
	}
	types, err := checkTypes(n.EventTypes)
	if err != nil {
		return schema.WebhookEndpoint{}, "", err
	}
	secret := SecretPrefix + keys.Generate()
	enc, err := s.kr.Encrypt(secret)
	if err != nil {
		return schema.WebhookEndpoint{}, "", err
	}
	var e schema.WebhookEndpoint
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		q := schema.New(tx)
		if err := q.LockProductWebhooks(ctx, productID); err != nil {
			return err
		}
		have, err := q.WebhookEndpoints(ctx, productID)
		if err != nil {
			return err
		}
		if len(have) >= MaxEndpoints {
			return orch.Errorf(orch.CodeQuotaExceeded, "a product has at most %d webhook endpoints", MaxEndpoints)
		}
		e, err = q.InsertWebhookEndpoint(ctx, schema.WebhookEndpoint{ID: uuid.NewString(), ProductID: productID, URL: n.URL,
			Description: n.Description, EventTypes: types, SecretEnc: enc})
		return err
	})
	if err != nil {
		return schema.WebhookEndpoint{}, "", err
	}
	return e, secret, nil
}

func checkTypes(ts []string) ([]string, error) {
	seen := map[string]bool{}
	out := []string{}
	for _, t := range ts {
		if !IsType(t) {
			return nil, orch.Errorf(orch.CodeInvalidRequest, "event_types: unknown event type %q", t)
		}
		if !seen[t] {
			seen[t] = true
			out = append(out, t)
		}
	}
	return out, nil
}

// List returns a product's endpoints.
func (s *Endpoints) List(ctx context.Context, productID string) ([]schema.WebhookEndpoint, error) {
	return schema.New(s.pool).WebhookEndpoints(ctx, productID)
}

// Get returns one of a product's endpoints; WEBHOOK_NOT_FOUND if none.
func (s *Endpoints) Get(ctx context.Context, productID, id string) (schema.WebhookEndpoint, error) {
	return schema.New(s.pool).WebhookEndpoint(ctx, productID, id)
}

// Delete removes an endpoint and its delivery log; nothing more is sent
// to it (an attempt in flight may still land).
func (s *Endpoints) Delete(ctx context.Context, productID, id string) error {
	return schema.New(s.pool).DeleteWebhookEndpoint(ctx, productID, id)
}

// RotateSecret gives an endpoint a new secret (returned, once); the
// current one keeps signing alongside it for overlap.
func (s *Endpoints) RotateSecret(ctx context.Context, productID, id string, overlap time.Duration) (schema.WebhookEndpoint, string, error) {
	secret := SecretPrefix + keys.Generate()
	enc, err := s.kr.Encrypt(secret)
	if err != nil {
		return schema.WebhookEndpoint{}, "", err
	}
	e, err := schema.New(s.pool).RotateWebhookSecret(ctx, productID, id, enc, time.Now().Add(overlap).UTC().Truncate(time.Microsecond))
	if err != nil {
		return e, "", err
	}
	return e, secret, nil
}

// Deliveries lists an endpoint's deliveries, newest first.
func (s *Endpoints) Deliveries(ctx context.Context, productID string, f schema.DeliveryFilter) ([]schema.WebhookDelivery, error) {
	if _, err := s.Get(ctx, productID, f.EndpointID); err != nil {
		return nil, err
	}
	switch f.State {
	case "", schema.DeliveryPending, schema.DeliveryQueued, schema.DeliveryDelivered, schema.DeliveryFailed:
	default:
		return nil, orch.Errorf(orch.CodeInvalidRequest, "state: one of pending, queued, delivered, failed")
	}
	return schema.New(s.pool).WebhookDeliveries(ctx, f)
}

// Redeliver sends a delivery's event to its endpoint again, as a new
// delivery (same event id), outside the engine's order.
func (s *Endpoints) Redeliver(ctx context.Context, productID, endpointID, deliveryID string) (schema.WebhookDelivery, error) {
	var d schema.WebhookDelivery
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		q := schema.New(tx)
		if _, err := q.WebhookEndpoint(ctx, productID, endpointID); err != nil {
			return err
		}
		var err error
		d, err = q.Redeliver(ctx, endpointID, deliveryID)
		return err
	})
	if err != nil && !errors.As(err, new(*orch.Error)) {
		return d, fmt.Errorf("redeliver: %w", err)
	}
	return d, err
}
