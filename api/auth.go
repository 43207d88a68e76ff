package api

import (
	"context"
	"strings"
	"sync"
	"time"

	"github.com/danielgtaylor/huma/v2"
	"github.com/jackc/pgx/v5/pgxpool"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/generations"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/metrics"
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
// recordOperation notes the operation a request was routed to, so its
// error answer can be checked against the document (checkDocumented).
func (s *Server) recordOperation(ctx huma.Context, next func(huma.Context)) {
	if ri, ok := ctx.Context().Value(ctxRequest).(*requestInfo); ok {
		ri.op = ctx.Operation()
	}
	next(ctx)
}

func (s *Server) authMiddleware(ctx huma.Context, next func(huma.Context)) {
	op := ctx.Operation()
	if op == nil || len(op.Security) == 0 {
		next(ctx)
		return
	}
	var err error
	switch {
	case hasScheme(op, securityAdmin) && (!hasScheme(op, securityPlatform) || ctx.Header("X-Admin-Key") != ""):
		// An operation open to both keys (rollouts) is the operator's when
		// an admin key is sent, a product's otherwise.
		err = s.checkAdmin(ctx.Context(), ctx.Header("X-Admin-Key"))
	case hasScheme(op, securityPlatform):
		var p orch.Product
		p, err = s.checkPlatform(ctx.Context(), ctx.Header("X-Platform-Key"))
		if err == nil {
			ctx = huma.WithValue(ctx, ctxProduct, p)
			if ri, ok := ctx.Context().Value(ctxRequest).(*requestInfo); ok {
				ri.product = p.Slug
			}
		}
	}
	if err != nil {
		if op.OperationID == "fleet-metrics" && orch.IsCode(err, orch.CodeInvalidPlatformKey) && prometheusScrape(ctx) {
			err = orch.Errorf(orch.CodeInvalidPlatformKey, "%s", wrongMetricsListener)
		}
		writeHumaError(s.api, ctx, toHTTP(ctx.Context(), err))
		return
	}
	next(ctx)
}

// wrongMetricsListener answers a Prometheus scrape of the API's /metrics,
// which is a product's JSON activity, not the exposition format: the scrape
// fails (401) and whoever reads the body learns where to point it.
const wrongMetricsListener = "GET /metrics on the API is a product's JSON activity (needs X-Platform-Key); " +
	"scrape Prometheus metrics from the private metrics listener instead (ORCH_METRICS_ADDR, path /metrics)"

// prometheusScrape tells a Prometheus (or OpenMetrics) scraper from a
// product's client by what it asks for.
func prometheusScrape(ctx huma.Context) bool {
	accept, ua := ctx.Header("Accept"), ctx.Header("User-Agent")
	return strings.HasPrefix(ua, "Prometheus/") || strings.Contains(accept, "application/openmetrics-text") ||
		strings.Contains(accept, "text/plain;version=0.0.4") || strings.Contains(accept, "text/plain; version=0.0.4")
}

// checkAdmin accepts the admin key. INVALID_ADMIN_KEY otherwise, or
// RATE_LIMITED while the client has failed too often (authThrottle).
func (s *Server) checkAdmin(ctx context.Context, got string) error {
	client, now := clientFrom(ctx), time.Now()
	if blocked, retry := s.authFails.blocked(client, now); blocked {
		return s.authThrottled(retry)
	}
	if s.adminOK(got) {
		return nil
	}
	s.authFails.fail(client, now)
	s.cfg.Metrics.AuthFailure(metrics.AuthInvalid)
	return orch.Errorf(orch.CodeInvalidAdminKey, "missing or invalid X-Admin-Key")
}

// checkPlatform returns the product whose platform key this is.
// INVALID_PLATFORM_KEY when none, or RATE_LIMITED while the client has
// failed too often, unless the key is one the cache knows for valid
// (authThrottle); the database's error when it cannot tell.
func (s *Server) checkPlatform(ctx context.Context, key string) (orch.Product, error) {
	client, now := clientFrom(ctx), time.Now()
	var h string
	var known bool
	if key != "" {
		h = keys.Hash(key)
		var p orch.Product
		var fresh bool
		if p, fresh, known = s.products.peek(h, now); fresh {
			return p, nil // the hot path: one read lock
		}
	}
	if !known {
		if blocked, retry := s.authFails.blocked(client, now); blocked {
			return orch.Product{}, s.authThrottled(retry)
		}
	}
	if h == "" {
		s.authFails.fail(client, now)
		s.cfg.Metrics.AuthFailure(metrics.AuthInvalid)
		return orch.Product{}, orch.Errorf(orch.CodeInvalidPlatformKey, "missing X-Platform-Key")
	}
	p, err := s.products.lookup(ctx, h)
	if orch.IsCode(err, orch.CodeInvalidPlatformKey) {
		s.authFails.fail(client, now)
		s.cfg.Metrics.AuthFailure(metrics.AuthInvalid)
	}
	return p, err
}

func (s *Server) authThrottled(retry int) error {
	s.cfg.Metrics.AuthFailure(metrics.AuthThrottled)
	return withRetryAfter(orch.Errorf(orch.CodeRateLimited,
		"too many failed authentications from this address; retry in %d s", retry), retry)
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
// a database round trip per request.
//
// Valid keys are bounded by the keys in the database. The database's
// answer is trusted for ttl (30 s); after that an entry is checked again
// on its next use, so a key rotated out elsewhere stops working here
// within ttl even when the NOTIFY that should have dropped it was lost. A
// previous key is also checked again when its overlap ends. A change of
// the product (NOTIFY on schema.ChannelProducts) or a reconnect of the
// listener marks entries stale (checked again on next use) rather than
// forgetting them, so the auth throttle still knows them for valid keys;
// a stale entry the database no longer confirms is dropped, and one
// nobody has used for staleKeep is dropped by the next invalidation.
//
// Unknown keys are remembered for negativeTTL in a separate, bounded set
// (misses: at most 2×maxMisses, oldest generation dropped first), so a
// client retrying a wrong key costs one query per negativeTTL, random keys
// cannot grow memory, and a miss never evicts a valid key.
type productCache struct {
	pool   *pgxpool.Pool
	ttl    time.Duration
	mu     sync.RWMutex
	byKey  map[string]cachedProduct
	misses generations.Map[string, time.Time] // key hash → until when it is known not to exist
	gen    uint64                             // bumped on every invalidation, so a lookup racing one is not trusted
}

type cachedProduct struct {
	product   orch.Product
	checkedAt time.Time // when the database last confirmed the key
	expiresAt time.Time // a previous key: the end of its overlap (zero = none)
	stale     bool      // invalidated: check again before use
}

const (
	// DefaultProductTTL is how long a cached valid key is trusted without
	// asking the database again.
	DefaultProductTTL = 30 * time.Second
	negativeTTL       = 500 * time.Millisecond
	maxMisses         = 4096
	staleKeep         = time.Hour
)

func newProductCache(pool *pgxpool.Pool, ttl time.Duration) *productCache {
	if ttl <= 0 {
		ttl = DefaultProductTTL
	}
	return &productCache{pool: pool, ttl: ttl, byKey: map[string]cachedProduct{}, misses: generations.New[string, time.Time](maxMisses)}
}

func (e cachedProduct) fresh(now time.Time, ttl time.Duration) bool {
	return !e.stale && now.Sub(e.checkedAt) < ttl && (e.expiresAt.IsZero() || now.Before(e.expiresAt))
}

var errInvalidPlatformKey = orch.Errorf(orch.CodeInvalidPlatformKey, "invalid X-Platform-Key")

// peek returns the product of key hash h when its entry is fresh; known
// says whether h is, or recently was, a valid key (the auth throttle lets
// those through).
func (c *productCache) peek(h string, now time.Time) (p orch.Product, fresh, known bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	e, ok := c.byKey[h]
	if ok && e.fresh(now, c.ttl) {
		return e.product, true, true
	}
	return orch.Product{}, false, ok
}

// lookup returns the product whose key hashes to h: INVALID_PLATFORM_KEY
// when none, or the database's error.
func (c *productCache) lookup(ctx context.Context, h string) (orch.Product, error) {
	now := time.Now()
	c.mu.RLock()
	e, ok := c.byKey[h]
	var missed bool
	if !ok {
		until, has := c.misses.Get(h)
		missed = has && now.Before(until)
	}
	gen := c.gen
	c.mu.RUnlock()
	switch {
	case ok && e.fresh(now, c.ttl):
		return e.product, nil
	case missed:
		return orch.Product{}, errInvalidPlatformKey
	}
	p, expires, err := schema.New(c.pool).ProductByKeyHash(ctx, h)
	switch {
	case orch.IsCode(err, orch.CodeProductNotFound):
		c.mu.Lock()
		delete(c.byKey, h)
		if c.gen == gen {
			c.misses.Put(h, now.Add(negativeTTL))
		}
		c.mu.Unlock()
		return orch.Product{}, errInvalidPlatformKey
	case err != nil:
		return orch.Product{}, err
	}
	entry := cachedProduct{product: p, checkedAt: now}
	if expires != nil {
		entry.expiresAt = *expires // a previous key: check again when its overlap ends
	}
	c.mu.Lock()
	// A lookup racing an invalidation may have read the old row: keep the
	// key known, but check it again next time.
	entry.stale = c.gen != gen
	c.byKey[h] = entry
	c.mu.Unlock()
	return p, nil
}

// invalidate marks every entry of one product stale (all its keys),
// forgets every miss, and drops entries unused for staleKeep.
func (c *productCache) invalidate(productID string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	c.misses.Reset()
	now := time.Now()
	for h, e := range c.byKey {
		switch {
		case now.Sub(e.checkedAt) > staleKeep:
			delete(c.byKey, h)
		case e.product.ID == productID:
			e.stale = true
			c.byKey[h] = e
		}
	}
}

// flush marks everything stale: notifications may have been lost.
func (c *productCache) flush() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	c.misses.Reset()
	for h, e := range c.byKey {
		e.stale = true
		c.byKey[h] = e
	}
}
