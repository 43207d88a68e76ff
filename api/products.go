package api

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"reflect"
	"strings"
	"time"
	"unicode"

	"github.com/danielgtaylor/huma/v2"
	"github.com/jackc/pgx/v5"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

// This file is the admin API (X-Admin-Key): registering products, their
// policy and their platform keys. Every write commits its
// audit row and a NOTIFY on schema.ChannelProducts in one transaction, so
// every replica's product cache drops the product as the change commits.

// Policy is a product's policy as the API documents and returns it.
// An absent field means no limit.
type Policy struct {
	MaxEngines   *int `json:"max_engines,omitempty" minimum:"0" doc:"Engines the product may have at once, in any state; a provision beyond it is 429 QUOTA_EXCEEDED. Absent: no limit."`
	RateLimitRPM *int `json:"rate_limit_rpm,omitempty" minimum:"0" doc:"Admits per minute, across all orchestrator replicas together; beyond it admit is 429 RATE_LIMITED with Retry-After. Absent: no limit."`
}

// TransformSchema documents that a policy has no other keys (they are
// refused), whatever the API's default for other bodies.
func (Policy) TransformSchema(_ huma.Registry, s *huma.Schema) *huma.Schema {
	s.AdditionalProperties = false
	return s
}

func toPolicy(p orch.Policy) Policy {
	return Policy{MaxEngines: p.MaxEngines, RateLimitRPM: p.RateLimitRPM}
}

// policyJSON is a policy exactly as the client sent it. The OpenAPI
// document shows the Policy schema (and huma checks the body against it),
// but the bytes reach orch.ParsePolicy, which decides: unknown keys, wrong
// types and negative limits are 400 INVALID_REQUEST, never ignored.
type policyJSON struct {
	raw json.RawMessage
}

func (p *policyJSON) UnmarshalJSON(b []byte) error {
	p.raw = append(p.raw[:0], b...)
	return nil
}

// Schema documents the field as a Policy.
func (policyJSON) Schema(r huma.Registry) *huma.Schema {
	return r.Schema(reflect.TypeOf(Policy{}), true, "Policy")
}

// policyKeys are the policy's field names, exactly as spelt.
var policyKeys = map[string]bool{"max_engines": true, "rate_limit_rpm": true}

// parsePolicy decodes a policy strictly. Beyond orch.ParsePolicy it
// refuses keys that only match a field name case-insensitively
// ("MAX_ENGINES"), which encoding/json would otherwise accept.
// INVALID_REQUEST on any problem.
func parsePolicy(raw json.RawMessage) (orch.Policy, error) {
	pol, err := orch.ParsePolicy(raw)
	if err != nil {
		return pol, err
	}
	trimmed := bytes.TrimSpace(raw)
	if len(trimmed) == 0 || string(trimmed) == "null" {
		return pol, nil
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(trimmed, &m); err != nil {
		return orch.Policy{}, orch.Errorf(orch.CodeInvalidRequest, "invalid policy: must be a JSON object")
	}
	for k := range m {
		if !policyKeys[k] {
			return orch.Policy{}, orch.Errorf(orch.CodeInvalidRequest, "invalid policy: unknown field %q", k)
		}
	}
	return pol, nil
}

// validateDisplayName: 1-200 characters, not blank, no control characters.
func validateDisplayName(s string) error {
	if strings.TrimSpace(s) == "" {
		return orch.Errorf(orch.CodeInvalidRequest, "display_name must not be blank")
	}
	for _, r := range s {
		if unicode.IsControl(r) {
			return orch.Errorf(orch.CodeInvalidRequest, "display_name must not contain control characters")
		}
	}
	return nil
}

// ProductBody is a product as the admin API shows it: never a key or a hash.
type ProductBody struct {
	ProductID   string    `json:"product_id" format:"uuid"`
	Slug        string    `json:"slug"`
	DisplayName string    `json:"display_name"`
	Policy      Policy    `json:"policy"`
	CreatedAt   time.Time `json:"created_at"`
	UpdatedAt   time.Time `json:"updated_at"`
}

func toProductBody(p orch.Product) ProductBody {
	return ProductBody{ProductID: p.ID, Slug: p.Slug, DisplayName: p.DisplayName, Policy: toPolicy(p.Policy),
		CreatedAt: p.CreatedAt, UpdatedAt: p.UpdatedAt}
}

type registerInput struct {
	Body struct {
		Slug        string     `json:"slug" maxLength:"63" doc:"Lowercase letters, digits and dashes, 1-63 characters, not starting with a dash" example:"acme-notes"`
		DisplayName string     `json:"display_name" minLength:"1" maxLength:"200" example:"Acme Notes"`
		Policy      policyJSON `json:"policy,omitempty" doc:"The product's limits; absent or {} means none"`
	}
}

// RegisterBody is registration's answer. The platform key is shown once.
type RegisterBody struct {
	ProductID      string `json:"product_id" format:"uuid"`
	Slug           string `json:"slug"`
	PlatformAPIKey string `json:"platform_api_key" doc:"The product's platform key, sent as X-Platform-Key. Shown only now: the orchestrator keeps only its SHA-256."`
}

// productPath is the {product_id} path parameter. (Input structs name the
// field themselves: huma skips parameters of unexported embedded structs.)
type productPath struct {
	ProductID string `path:"product_id" doc:"The product's id"`
}

type policyInput struct {
	ProductID string `path:"product_id" doc:"The product's id"`
	Body      struct {
		Policy policyJSON `json:"policy" required:"true" doc:"Replaces the whole policy; {} removes every limit"`
	}
}

type policyOutput struct {
	Body struct {
		Policy Policy `json:"policy"`
	}
}

type listProductsInput struct {
	Limit  int `query:"limit" default:"100" minimum:"1" maximum:"1000"`
	Offset int `query:"offset" default:"0" minimum:"0"`
}

type listProductsOutput struct {
	Body struct {
		Products []ProductBody `json:"products"`
		Total    int           `json:"total"`
	}
}

// defaultKeyOverlap is how long a rotated-out platform key keeps working
// when the request does not say.
const defaultKeyOverlap = 86400

type rotatePlatformKeyInput struct {
	ProductID string `path:"product_id" doc:"The product's id"`
	Body      *struct {
		OverlapSeconds *int `json:"overlap_seconds,omitempty" minimum:"0" maximum:"2592000" doc:"How long the current key keeps working (default 86400, 24 h; 0 = stops now)"`
	} `required:"false"`
}

// RotatePlatformKeyBody is rotate-platform-key's answer. The new key is shown once.
type RotatePlatformKeyBody struct {
	ProductID            string    `json:"product_id" format:"uuid"`
	PlatformAPIKey       string    `json:"platform_api_key" doc:"The new platform key. Shown only now."`
	PreviousKeyExpiresAt time.Time `json:"previous_key_expires_at" doc:"Until when the previous key keeps working"`
}

func (s *Server) adminOp(o huma.Operation) huma.Operation {
	o.Security = adminSecurity
	o.Tags = []string{"products"}
	return o
}

func (s *Server) registerProducts() {
	huma.Register(s.api, s.adminOp(huma.Operation{
		OperationID: "register-product", Method: http.MethodPost, Path: "/products/register",
		Summary:     "Register a product (tenant)",
		Description: "Creates the product and returns its platform key, once. Audited as policy_register.",
		Metadata:    codes(orch.CodeProductSlugExists),
	}), func(ctx context.Context, in *registerInput) (*struct{ Body RegisterBody }, error) {
		if err := orch.ValidateSlug(in.Body.Slug); err != nil {
			return nil, toHTTP(ctx, err)
		}
		if err := validateDisplayName(in.Body.DisplayName); err != nil {
			return nil, toHTTP(ctx, err)
		}
		pol, err := parsePolicy(in.Body.Policy.raw)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		p, key, err := s.registerProduct(ctx, in.Body.Slug, in.Body.DisplayName, pol)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		return &struct{ Body RegisterBody }{Body: RegisterBody{ProductID: p.ID, Slug: p.Slug, PlatformAPIKey: key}}, nil
	})

	huma.Register(s.api, s.adminOp(huma.Operation{
		OperationID: "list-products", Method: http.MethodGet, Path: "/products",
		Summary: "List products", Metadata: codes(),
	}), func(ctx context.Context, in *listProductsInput) (*listProductsOutput, error) {
		ps, total, err := schema.New(s.pool).ListProducts(ctx, in.Limit, in.Offset)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		out := &listProductsOutput{}
		out.Body.Products = make([]ProductBody, 0, len(ps))
		for _, p := range ps {
			out.Body.Products = append(out.Body.Products, toProductBody(p))
		}
		out.Body.Total = total
		return out, nil
	})

	huma.Register(s.api, s.adminOp(huma.Operation{
		OperationID: "get-product", Method: http.MethodGet, Path: "/products/{product_id}",
		Summary: "Get a product", Metadata: codes(orch.CodeProductNotFound),
	}), func(ctx context.Context, in *productPath) (*struct{ Body ProductBody }, error) {
		p, err := schema.New(s.pool).GetProduct(ctx, in.ProductID)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		return &struct{ Body ProductBody }{Body: toProductBody(p)}, nil
	})

	huma.Register(s.api, s.adminOp(huma.Operation{
		OperationID: "update-product-policy", Method: http.MethodPut, Path: "/products/{product_id}/policy",
		Summary:     "Replace a product's policy",
		Description: "Effective on the product's next request on every replica. Engines above a lowered max_engines are kept. Audited as policy_update.",
		Metadata:    codes(orch.CodeProductNotFound),
	}), func(ctx context.Context, in *policyInput) (*policyOutput, error) {
		pol, err := parsePolicy(in.Body.Policy.raw)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		p, err := s.updatePolicy(ctx, in.ProductID, pol)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		out := &policyOutput{}
		out.Body.Policy = toPolicy(p.Policy)
		return out, nil
	})

	huma.Register(s.api, s.adminOp(huma.Operation{
		OperationID: "rotate-platform-key", Method: http.MethodPost, Path: "/products/{product_id}/rotate-platform-key",
		Summary: "Rotate a product's platform key",
		Description: "Returns a new platform key, once. The current key keeps working for overlap_seconds, then is refused; " +
			"a key already rotated out earlier stops at once. Audited as platform_key_rotated.",
		Metadata: codes(orch.CodeProductNotFound),
	}), func(ctx context.Context, in *rotatePlatformKeyInput) (*struct{ Body RotatePlatformKeyBody }, error) {
		overlap := defaultKeyOverlap
		if in.Body != nil && in.Body.OverlapSeconds != nil {
			overlap = *in.Body.OverlapSeconds
		}
		p, key, expires, err := s.rotatePlatformKey(ctx, in.ProductID, time.Duration(overlap)*time.Second)
		if err != nil {
			return nil, toHTTP(ctx, err)
		}
		return &struct{ Body RotatePlatformKeyBody }{Body: RotatePlatformKeyBody{ProductID: p.ID, PlatformAPIKey: key,
			PreviousKeyExpiresAt: expires}}, nil
	})
}

// productChanged is the tail of every product write, inside its
// transaction: the audit row, then the NOTIFY that makes every replica's
// cache drop the product when the transaction commits. (The writing
// replica also drops it itself at commit: see committed.)
func productChanged(ctx context.Context, q *schema.Queries, p orch.Product, action orch.Action, md map[string]any) error {
	if err := q.InsertAudit(ctx, orch.AuditEntry{ProductID: p.ID, Action: action, Actor: orch.ActorAdmin, Metadata: md}); err != nil {
		return err
	}
	return q.Notify(ctx, schema.ChannelProducts, p.ID)
}

// registerProduct creates a product with a fresh platform key, stored only
// as its hash. PRODUCT_SLUG_EXISTS when the slug is taken.
func (s *Server) registerProduct(ctx context.Context, slug, displayName string, pol orch.Policy) (orch.Product, string, error) {
	key := keys.Generate()
	var p orch.Product
	err := s.inTx(ctx, func(q *schema.Queries) error {
		var err error
		if p, err = q.InsertProduct(ctx, slug, displayName, pol, keys.Hash(key)); err != nil {
			return err
		}
		return productChanged(ctx, q, p, orch.ActionPolicyRegister, map[string]any{
			"slug": p.Slug, "display_name": p.DisplayName, "policy": toPolicy(p.Policy)})
	})
	if err != nil {
		return orch.Product{}, "", err
	}
	s.committed(p.ID)
	return p, key, nil
}

// updatePolicy replaces a product's policy. PRODUCT_NOT_FOUND if none.
func (s *Server) updatePolicy(ctx context.Context, productID string, pol orch.Policy) (orch.Product, error) {
	var p orch.Product
	err := s.inTx(ctx, func(q *schema.Queries) error {
		old, err := q.GetProductForUpdate(ctx, productID)
		if err != nil {
			return err
		}
		if p, err = q.UpdatePolicy(ctx, productID, pol); err != nil {
			return err
		}
		return productChanged(ctx, q, p, orch.ActionPolicyUpdate, map[string]any{
			"policy": toPolicy(p.Policy), "previous": toPolicy(old.Policy)})
	})
	if err != nil {
		return orch.Product{}, err
	}
	s.committed(p.ID)
	return p, nil
}

// rotatePlatformKey gives a product a new platform key; the current one
// works until the returned time. PRODUCT_NOT_FOUND if none.
func (s *Server) rotatePlatformKey(ctx context.Context, productID string, overlap time.Duration) (orch.Product, string, time.Time, error) {
	key := keys.Generate()
	expires := time.Now().Add(overlap).UTC().Truncate(time.Microsecond)
	var p orch.Product
	err := s.inTx(ctx, func(q *schema.Queries) error {
		var err error
		if p, err = q.RotatePlatformKey(ctx, productID, keys.Hash(key), expires); err != nil {
			return err
		}
		return productChanged(ctx, q, p, orch.ActionPlatformKeyRotated, map[string]any{
			"overlap_seconds": int64(overlap / time.Second), "previous_key_expires_at": expires})
	})
	if err != nil {
		return orch.Product{}, "", time.Time{}, err
	}
	s.committed(p.ID)
	return p, key, expires, nil
}

// committed drops a changed product from this replica's cache at once, so
// the replica that made a change never answers from before it; the others
// drop it when the NOTIFY arrives.
func (s *Server) committed(productID string) {
	s.products.invalidate(productID)
}

// inTx runs fn in one transaction on the pool.
func (s *Server) inTx(ctx context.Context, fn func(q *schema.Queries) error) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error { return fn(schema.New(tx)) })
}
