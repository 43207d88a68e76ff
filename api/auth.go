package api

import (
	"context"
	"strings"
	"sync"
	"time"

	"github.com/danielgtaylor/huma/v2"
	"github.com/jackc/pgx/v5/pgxpool"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

// Security scheme names; an operation's Security says which key it takes.
const (
	securityAdmin    = "adminKey"
	securityPlatform = "platformKey"
)

var (
	adminSecurity    = []map[string][]string{{securityAdmin: {}}}
	platformSecurity = []map[string][]string{{securityPlatform: {}}}
)

// authMiddleware checks the key an operation's security requirement names,
// before the body is parsed, so a request without a valid key learns
// nothing else (not even whether its body would validate).
func (s *Server) authMiddleware(ctx huma.Context, next func(huma.Context)) {
	op := ctx.Operation()
	if op == nil || len(op.Security) == 0 {
		next(ctx)
		return
	}
	var err error
	switch {
	case hasScheme(op, securityAdmin):
		if !s.adminOK(ctx.Header("X-Admin-Key")) {
			err = orch.Errorf(orch.CodeInvalidAdminKey, "missing or invalid X-Admin-Key")
		}
	case hasScheme(op, securityPlatform):
		var p orch.Product
		p, err = s.products.lookup(ctx.Context(), ctx.Header("X-Platform-Key"))
		if err == nil {
			ctx = huma.WithValue(ctx, ctxProduct, p)
			if la, ok := ctx.Context().Value(ctxLogAttrs).(*logAttrs); ok {
				la.product = p.Slug
			}
		}
	}
	if err != nil {
		writeHumaError(s.api, ctx, toHTTP(ctx.Context(), err))
		return
	}
	next(ctx)
}

func hasScheme(op *huma.Operation, name string) bool {
	for _, req := range op.Security {
		if _, ok := req[name]; ok {
			return true
		}
	}
	return false
}

func (s *Server) adminOK(got string) bool {
	return got != "" && keys.Equal(keys.Hash(got), keys.Hash(s.cfg.AdminKey))
}

// validateUserPath checks the {user_id} path parameter of every operation
// that has one, once, before any handler runs: INVALID_REQUEST otherwise.
func (s *Server) validateUserPath(ctx huma.Context, next func(huma.Context)) {
	if op := ctx.Operation(); op != nil && strings.Contains(op.Path, "{user_id}") {
		if err := orch.ValidateUserID(ctx.Param("user_id")); err != nil {
			writeHumaError(s.api, ctx, toHTTP(ctx.Context(), err))
			return
		}
	}
	next(ctx)
}

// writeHumaError writes an envelope error from middleware.
func writeHumaError(api huma.API, ctx huma.Context, err error) {
	ae := err.(*ErrorResponse)
	for k, v := range ae.GetHeaders() {
		ctx.SetHeader(k, v[0])
	}
	ctx.SetHeader("Content-Type", "application/json")
	ctx.SetStatus(ae.status)
	api.Marshal(ctx.BodyWriter(), "application/json", ae) //nolint:errcheck
}

// productFrom returns the authenticated product of a platform-key operation.
func productFrom(ctx context.Context) orch.Product {
	p, _ := ctx.Value(ctxProduct).(orch.Product)
	return p
}

// productCache maps platform-key hashes to products so admit does not pay
// a database round trip per request. Every replica drops entries when a
// product changes (NOTIFY on schema.ChannelProducts) and flushes everything
// when its listener reconnects; unknown keys are remembered briefly.
type productCache struct {
	pool  *pgxpool.Pool
	mu    sync.RWMutex
	byKey map[string]cachedProduct
	gen   uint64 // bumped on every invalidation, so a lookup racing one is not cached
}

type cachedProduct struct {
	product   orch.Product
	found     bool
	expiresAt time.Time // zero = until invalidated; set for previous keys and misses
}

const negativeTTL = 500 * time.Millisecond

func newProductCache(pool *pgxpool.Pool) *productCache {
	return &productCache{pool: pool, byKey: map[string]cachedProduct{}}
}

func (c *productCache) lookup(ctx context.Context, key string) (orch.Product, error) {
	if key == "" {
		return orch.Product{}, orch.Errorf(orch.CodeInvalidPlatformKey, "missing X-Platform-Key")
	}
	h := keys.Hash(key)
	now := time.Now()
	c.mu.RLock()
	e, ok := c.byKey[h]
	gen := c.gen
	c.mu.RUnlock()
	if ok && (e.expiresAt.IsZero() || now.Before(e.expiresAt)) {
		if !e.found {
			return orch.Product{}, orch.Errorf(orch.CodeInvalidPlatformKey, "invalid X-Platform-Key")
		}
		return e.product, nil
	}
	p, expires, err := schema.New(c.pool).ProductByKeyHash(ctx, h)
	entry := cachedProduct{product: p, found: err == nil}
	switch {
	case err == nil:
		if expires != nil {
			entry.expiresAt = *expires // a previous key: re-check when its overlap ends
		}
	case orch.IsCode(err, orch.CodeProductNotFound):
		entry.expiresAt = now.Add(negativeTTL)
	default:
		return orch.Product{}, err
	}
	c.mu.Lock()
	if c.gen == gen {
		c.byKey[h] = entry
	}
	c.mu.Unlock()
	if !entry.found {
		return orch.Product{}, orch.Errorf(orch.CodeInvalidPlatformKey, "invalid X-Platform-Key")
	}
	return p, nil
}

// invalidate drops every entry of one product (all its keys) and every miss.
func (c *productCache) invalidate(productID string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	for h, e := range c.byKey {
		if !e.found || e.product.ID == productID {
			delete(c.byKey, h)
		}
	}
}

func (c *productCache) flush() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	c.byKey = map[string]cachedProduct{}
}
