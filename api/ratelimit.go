package api

import (
	"context"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/schema"
)

// rateLimit takes one admit permit for the product (policy rate_limit_rpm).
// limit is 0 when the product has no rate limit; remaining is an
// estimate of the permits its current window has left across all replicas.
// RATE_LIMITED, carrying Retry-After (seconds until the window ends), when
// the window is exhausted. A rate_limit_rpm of 0 admits nothing, as
// max_engines 0 provisions nothing.
func (s *Server) rateLimit(ctx context.Context, p orch.Product) (limit, remaining int, err error) {
	if p.Policy.RateLimitRPM == nil {
		return 0, 0, nil
	}
	limit = *p.Policy.RateLimitRPM
	if limit <= 0 {
		return 0, 0, withRetryAfter(orch.Errorf(orch.CodeRateLimited, "the product's policy allows no admits (rate_limit_rpm is 0)"), 60)
	}
	return s.rates.take(ctx, s.pool, s.log, p.ID, limit)
}

// rateLimiter enforces rate_limit_rpm for every product across all API
// replicas together. The shared truth is one counter row per product per
// one-minute window (rate_windows, the database clock picks the window).
// Each replica leases permits from it in small batches and spends them
// locally, so most admits cost a mutex, not a round trip. A lease never
// gets more than the window has left, so the replicas together admit at
// most the limit per window (they may admit fewer: permits a replica leased
// and did not spend lapse with the window). When a lease comes back short
// the window is exhausted: the replica remembers it and denies locally,
// without a round trip, until the window ends.
//
// The zero value is ready to use.
type rateLimiter struct {
	mu        sync.Mutex
	buckets   map[string]*rateBucket // by product id
	lastPrune atomic.Int64           // unix nanoseconds of the last prune of old windows
}

// rateBucket is one product's local share of its current window.
type rateBucket struct {
	mu         sync.Mutex
	limit      int           // the limit the permits were leased under
	window     time.Time     // the window's start (database clock)
	windowEnd  time.Time     // the window's end (local clock)
	permits    int           // leased and not yet spent
	globalLeft int           // permits nobody had leased yet, as of our last lease
	exhausted  bool          // the window has given out every permit
	leasing    chan struct{} // non-nil while a lease is in flight; closed when it returns
}

const (
	// maxLease bounds one lease: at most one round trip per this many admits.
	maxLease = 100
	// leaseShare is the fraction of the limit one lease may take (1/leaseShare),
	// so permits idle on one replica cannot starve the others by much.
	leaseShare = 20
	// maxAccountedLimit caps the limit the shared counter (an integer column)
	// accounts in; anything above it is, in practice, no limit.
	maxAccountedLimit = 1 << 30
	// rateWindowKeep is how long ended windows are kept before pruning.
	rateWindowKeep = 5 * time.Minute
	// rateLeaseTimeout bounds a lease's database round trip.
	rateLeaseTimeout = 5 * time.Second
)

// leaseSize is how many permits one lease asks for under limit.
func leaseSize(limit int) int {
	return max(1, min(maxLease, limit/leaseShare))
}

func (rl *rateLimiter) bucket(productID string) *rateBucket {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	if rl.buckets == nil {
		rl.buckets = map[string]*rateBucket{}
	}
	b := rl.buckets[productID]
	if b == nil {
		b = &rateBucket{}
		rl.buckets[productID] = b
	}
	return b
}

// take spends one permit of productID's current window, leasing more from
// the shared counter when the local ones are spent.
func (rl *rateLimiter) take(ctx context.Context, pool *pgxpool.Pool, log *slog.Logger, productID string, limit int) (int, int, error) {
	b := rl.bucket(productID)
	accounted := min(limit, maxAccountedLimit)
	for {
		b.mu.Lock()
		now := time.Now()
		if b.limit != accounted {
			// A new policy: permits leased under the old limit are dropped
			// (never over-admit), and an exhausted window is asked again.
			b.limit, b.permits, b.exhausted, b.globalLeft = accounted, 0, false, accounted
		}
		if !now.Before(b.windowEnd) {
			b.permits, b.exhausted, b.globalLeft = 0, false, accounted
		}
		if b.permits > 0 {
			b.permits--
			remaining := min(b.permits+b.globalLeft, limit)
			b.mu.Unlock()
			return limit, remaining, nil
		}
		if b.exhausted {
			retry := retryAfterSeconds(b.windowEnd.Sub(now))
			b.mu.Unlock()
			return limit, 0, withRetryAfter(orch.Errorf(orch.CodeRateLimited,
				"rate limit of %d admits per minute reached; retry in %d s", limit, retry), retry)
		}
		if wait := b.leasing; wait != nil {
			// Another admit is leasing for this product: wait for it
			// rather than pay a round trip of our own.
			b.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-ctx.Done():
				return limit, 0, ctx.Err()
			}
		}
		done := make(chan struct{})
		b.leasing = done
		want := leaseSize(accounted)
		b.mu.Unlock()

		lctx, cancel := context.WithTimeout(ctx, rateLeaseTimeout)
		lease, err := schema.New(pool).LeasePermits(lctx, productID, want, accounted)
		cancel()

		b.mu.Lock()
		b.leasing = nil
		close(done)
		if err != nil {
			b.mu.Unlock()
			return limit, 0, err
		}
		if b.limit == accounted {
			if !lease.WindowStart.Equal(b.window) {
				b.window, b.permits = lease.WindowStart, 0
			}
			b.windowEnd = time.Now().Add(lease.Left)
			b.permits += lease.Granted
			b.globalLeft = accounted - lease.Used
			b.exhausted = lease.Granted < want || lease.Used >= accounted
		} // else the policy changed while we leased: the loop starts over.
		b.mu.Unlock()
		rl.maybePrune(pool, log)
	}
}

// retryAfterSeconds rounds a wait up to whole seconds, at least 1.
func retryAfterSeconds(d time.Duration) int {
	return max(1, int(math.Ceil(d.Seconds())))
}

// maybePrune deletes ended windows, at most once a minute per replica, in
// the background (it runs only on the lease path, never on a local admit).
func (rl *rateLimiter) maybePrune(pool *pgxpool.Pool, log *slog.Logger) {
	now := time.Now().UnixNano()
	last := rl.lastPrune.Load()
	if now-last < int64(time.Minute) || !rl.lastPrune.CompareAndSwap(last, now) {
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := schema.New(pool).PruneRateWindows(ctx, rateWindowKeep); err != nil {
			log.Warn("prune rate windows", "error", err)
		}
	}()
}
