package webhooks

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

// Config is the delivery side's configuration; zero values take the
// defaults named.
type Config struct {
	Policy Policy // where deliveries may go
	// Concurrency is how many deliveries one worker process attempts at
	// once: the webhooks queue's workers (20).
	Concurrency int
	// ProductConcurrency caps one product's attempts in flight per worker
	// process (4): a product whose endpoint hangs holds at most this many
	// of the queue's workers; its other deliveries wait, others' do not.
	ProductConcurrency int
	Timeout            time.Duration // one attempt, connect to last byte (10 s)
	RetryBase          time.Duration // the first retry's delay (10 s); doubles per attempt, with jitter
	RetryMax           time.Duration // the longest delay between attempts (1 h)
	RetryFor           time.Duration // how long a delivery is retried before it fails (24 h)
	Poll               time.Duration // the dispatcher's poll when no NOTIFY comes (2 s)
}

func (c Config) withDefaults() Config {
	if c.Concurrency <= 0 {
		c.Concurrency = 20
	}
	if c.ProductConcurrency <= 0 {
		c.ProductConcurrency = 4
	}
	if c.Timeout <= 0 {
		c.Timeout = 10 * time.Second
	}
	if c.RetryBase <= 0 {
		c.RetryBase = 10 * time.Second
	}
	if c.RetryMax <= 0 {
		c.RetryMax = time.Hour
	}
	if c.RetryFor <= 0 {
		c.RetryFor = 24 * time.Hour
	}
	if c.Poll <= 0 {
		c.Poll = 2 * time.Second
	}
	return c
}

// excerptBytes is how much of a response body is kept (shown in the
// delivery log): enough to see an error message, not a stored copy.
const excerptBytes = 256

// Inserter is the part of a River client that enqueues in a transaction.
type Inserter interface {
	InsertManyTx(ctx context.Context, tx pgx.Tx, params []river.InsertManyParams) ([]*rivertype.JobInsertResult, error)
}

// Deliverer delivers webhooks: the River worker of the webhooks queue and
// the dispatcher that queues each lane's head.
type Deliverer struct {
	river.WorkerDefaults[jobs.WebhookDeliverArgs]

	cfg    Config
	pool   *pgxpool.Pool
	kr     *keys.Keyring
	log    *slog.Logger
	client *http.Client

	mu       sync.Mutex
	inFlight map[string]int // attempts per product in this process
}

// NewDeliverer builds the delivery side of a worker process.
func NewDeliverer(cfg Config, pool *pgxpool.Pool, kr *keys.Keyring, log *slog.Logger) *Deliverer {
	cfg = cfg.withDefaults()
	return &Deliverer{cfg: cfg, pool: pool, kr: kr, log: log, client: cfg.Policy.Client(cfg.Timeout), inFlight: map[string]int{}}
}

// Register adds the delivery worker and its queue to a worker's River
// configuration.
func (d *Deliverer) Register(rc *river.Config) {
	river.AddWorker(rc.Workers, d)
	if rc.Queues == nil {
		rc.Queues = map[string]river.QueueConfig{}
	}
	rc.Queues[jobs.QueueWebhooks] = river.QueueConfig{MaxWorkers: d.cfg.Concurrency}
}

// Timeout bounds a job: one attempt plus its bookkeeping.
func (d *Deliverer) Timeout(*river.Job[jobs.WebhookDeliverArgs]) time.Duration {
	return d.cfg.Timeout + 30*time.Second
}

// Work makes one attempt of a queued delivery and records it: delivered,
// failed (and the lane's next delivery queued), or retried later (the job
// snoozes until then).
func (d *Deliverer) Work(ctx context.Context, job *river.Job[jobs.WebhookDeliverArgs]) error {
	j, err := schema.New(d.pool).DeliveryForJob(ctx, job.Args.DeliveryID)
	if orch.IsCode(err, orch.CodeDeliveryNotFound) {
		return nil // its endpoint was deleted
	}
	if err != nil {
		return err
	}
	if j.Delivery.State != schema.DeliveryQueued {
		return nil // a re-run of an attempt that finished it
	}
	if !d.acquire(j.Delivery.ProductID) {
		// The product has its share of attempts in flight: give the
		// worker back and come again soon.
		return river.JobSnooze(500*time.Millisecond + rand.N(time.Second))
	}
	defer d.release(j.Delivery.ProductID)

	secrets, err := d.secrets(j.Endpoint)
	if err != nil {
		return err // the keyring lost the master key: an operator's problem, retried
	}
	body, err := json.Marshal(Event{ID: j.Delivery.EventID, Type: j.Delivery.EventType, Version: Version,
		Sequence: j.Delivery.Seq, Time: j.OccurredAt.UTC(), ProductID: j.Delivery.ProductID, Product: j.ProductSlug,
		UserID: j.UserID, EngineID: j.EngineID, Data: j.Data})
	if err != nil {
		return fmt.Errorf("encode webhook event: %w", err)
	}
	start := time.Now()
	status, excerpt, perr := d.post(ctx, j, body, secrets)
	if ctx.Err() != nil {
		return ctx.Err() // stopped mid-attempt: River runs it again
	}
	a := schema.DeliveryAttempt{Status: status, Excerpt: excerpt, NewState: schema.DeliveryDelivered}
	var retryIn time.Duration
	if perr != nil {
		a.Error = perr.Error()
		retryIn = d.backoff(j.Delivery.Attempts + 1)
		if j.Endpoint.Status == schema.WebhookFailing || time.Now().Add(retryIn).After(j.Delivery.CreatedAt.Add(d.cfg.RetryFor)) {
			a.NewState = schema.DeliveryFailed
		} else {
			a.NewState = schema.DeliveryQueued
			a.Next = ptr(time.Now().Add(retryIn))
		}
	}
	err = pgx.BeginFunc(ctx, d.pool, func(tx pgx.Tx) error {
		q := schema.New(tx)
		ok, err := q.RecordDeliveryAttempt(ctx, j.Delivery.ID, a)
		if err != nil || !ok || a.NewState == schema.DeliveryQueued {
			return err
		}
		switch {
		case a.NewState == schema.DeliveryDelivered && j.Endpoint.Status == schema.WebhookFailing:
			err = q.SetWebhookStatus(ctx, j.Endpoint.ID, schema.WebhookActive)
		case a.NewState == schema.DeliveryFailed && j.Endpoint.Status == schema.WebhookActive:
			err = q.SetWebhookStatus(ctx, j.Endpoint.ID, schema.WebhookFailing)
		}
		if err != nil {
			return err
		}
		next, err := q.QueueNextInLane(ctx, j.Delivery.EndpointID, j.Delivery.Lane)
		if err != nil {
			return err
		}
		if len(next) == 0 {
			// A delivery committed while this lane was busy may be waiting
			// for the dispatcher: wake it once this commits.
			return q.Notify(ctx, schema.ChannelWebhooks, "")
		}
		rc := river.ClientFromContext[pgx.Tx](ctx)
		return insertJobs(ctx, tx, rc, next)
	})
	if err != nil {
		return fmt.Errorf("record webhook delivery: %w", err)
	}
	d.log.Debug("webhook attempt", "delivery_id", j.Delivery.ID, "endpoint_id", j.Endpoint.ID, "event_type", j.Delivery.EventType,
		"status", a.NewState, "http_status", deref(status), "duration_ms", time.Since(start).Milliseconds())
	if a.NewState == schema.DeliveryFailed && j.Endpoint.Status == schema.WebhookActive {
		d.log.Warn("webhook endpoint failing", "endpoint_id", j.Endpoint.ID, "product_id", j.Delivery.ProductID, "attempts", j.Delivery.Attempts+1)
	}
	if a.NewState == schema.DeliveryQueued {
		return river.JobSnooze(retryIn)
	}
	return nil
}

// post makes one attempt: the status (nil without a response), the start
// of the response body, and why it failed (nil on a 2xx).
func (d *Deliverer) post(ctx context.Context, j schema.DeliveryJob, body []byte, secrets []string) (*int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, j.Endpoint.URL, bytes.NewReader(body))
	if err != nil {
		return nil, "", errors.New("invalid endpoint URL")
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "enginefleet-webhooks/"+strconv.Itoa(Version))
	req.Header.Set(HeaderID, j.Delivery.EventID)
	req.Header.Set(HeaderEvent, j.Delivery.EventType)
	req.Header.Set(HeaderSignature, Sign(time.Now(), body, secrets...))
	resp, err := d.client.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // the URL is the product's own; say what went wrong
		}
		return nil, "", err
	}
	defer resp.Body.Close()
	buf := make([]byte, excerptBytes)
	n, _ := io.ReadFull(resp.Body, buf)
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10)) //nolint:errcheck // lets the connection be reused
	excerpt := strings.ToValidUTF8(string(buf[:n]), "")
	status := resp.StatusCode
	if status/100 != 2 {
		if status/100 == 3 {
			return &status, excerpt, fmt.Errorf("HTTP %d: redirects are not followed", status)
		}
		return &status, excerpt, fmt.Errorf("HTTP %d", status)
	}
	return &status, excerpt, nil
}

// secrets are the endpoint's signing secrets: the current one, and the
// previous one while its overlap lasts.
func (d *Deliverer) secrets(e schema.WebhookEndpoint) ([]string, error) {
	cur, err := d.kr.Decrypt(e.SecretEnc)
	if err != nil {
		return nil, fmt.Errorf("webhook secret of endpoint %s: %w", e.ID, err)
	}
	out := []string{cur}
	if e.PreviousSecretEnc != "" && e.PreviousExpiresAt != nil && time.Now().Before(*e.PreviousExpiresAt) {
		prev, err := d.kr.Decrypt(e.PreviousSecretEnc)
		if err != nil {
			return nil, fmt.Errorf("previous webhook secret of endpoint %s: %w", e.ID, err)
		}
		out = append(out, prev)
	}
	return out, nil
}

// backoff is the delay before retry n (1 = after the first failure):
// RetryBase doubling up to RetryMax, jittered to [½, 1]× so endpoints
// coming back are not hit by every retry at once.
func (d *Deliverer) backoff(n int) time.Duration {
	delay := d.cfg.RetryMax
	if n < 30 {
		delay = min(d.cfg.RetryBase<<(n-1), d.cfg.RetryMax)
	}
	return delay/2 + rand.N(delay/2+1)
}

func (d *Deliverer) acquire(productID string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.inFlight[productID] >= d.cfg.ProductConcurrency {
		return false
	}
	d.inFlight[productID]++
	return true
}

func (d *Deliverer) release(productID string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.inFlight[productID]--; d.inFlight[productID] <= 0 {
		delete(d.inFlight, productID)
	}
}

// dispatchBatch is how many lane heads one dispatcher transaction queues.
const dispatchBatch = 500

// Run is the dispatcher, until ctx ends: it LISTENs for new deliveries
// (and polls every Poll in case a NOTIFY was missed) and queues each idle
// lane's head as a River job. Every worker process runs one; they take
// turns under a lock.
func (d *Deliverer) Run(ctx context.Context, rc Inserter) {
	for ctx.Err() == nil {
		err := d.listen(ctx, rc)
		if ctx.Err() != nil {
			return
		}
		d.log.Warn("webhook dispatcher: connection lost; reconnecting", "error", err)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

func (d *Deliverer) listen(ctx context.Context, rc Inserter) error {
	conn, err := d.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer func() {
		c := conn.Hijack()            // it carries LISTEN state: never back to the pool
		c.Close(context.Background()) //nolint:errcheck
	}()
	if _, err := conn.Exec(ctx, `LISTEN "`+schema.ChannelWebhooks+`"`); err != nil {
		return err
	}
	lastRepair := time.Time{}
	for {
		if err := d.Dispatch(ctx, rc); err != nil && ctx.Err() == nil {
			d.log.Warn("webhook dispatch failed", "error", err)
		}
		if time.Since(lastRepair) > 30*time.Second {
			lastRepair = time.Now()
			if n, err := schema.New(d.pool).RequeueOrphanedDeliveries(ctx); err != nil && ctx.Err() == nil {
				d.log.Warn("webhook repair failed", "error", err)
			} else if n > 0 {
				d.log.Warn("webhook deliveries whose job was lost re-queued", "count", n)
				continue
			}
		}
		wctx, cancel := context.WithTimeout(ctx, d.cfg.Poll)
		_, err := conn.Conn().WaitForNotification(wctx)
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		if err != nil && wctx.Err() == nil {
			return err
		}
		if err != nil {
			pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err = conn.Ping(pctx)
			cancel()
			if err != nil {
				return fmt.Errorf("ping: %w", err)
			}
		}
	}
}

// Dispatch queues the head of every idle lane (in batches) as a River job.
func (d *Deliverer) Dispatch(ctx context.Context, rc Inserter) error {
	for {
		n := 0
		err := pgx.BeginFunc(ctx, d.pool, func(tx pgx.Tx) error {
			q := schema.New(tx)
			if err := q.LockWebhookDispatch(ctx); err != nil {
				return err
			}
			heads, err := q.QueueLaneHeads(ctx, dispatchBatch)
			if err != nil {
				return err
			}
			n = len(heads)
			return insertJobs(ctx, tx, rc, heads)
		})
		if err != nil || n < dispatchBatch {
			return err
		}
	}
}

// insertJobs inserts the jobs of newly queued deliveries and records them.
func insertJobs(ctx context.Context, tx pgx.Tx, rc Inserter, ds []schema.QueuedDelivery) error {
	if len(ds) == 0 {
		return nil
	}
	params := make([]river.InsertManyParams, len(ds))
	for i, x := range ds {
		params[i] = river.InsertManyParams{Args: jobs.WebhookDeliverArgs{DeliveryID: x.ID}}
	}
	res, err := rc.InsertManyTx(ctx, tx, params)
	if err != nil {
		return fmt.Errorf("insert webhook jobs: %w", err)
	}
	ids, jobIDs := make([]string, len(res)), make([]int64, len(res))
	for i, r := range res {
		ids[i], jobIDs[i] = ds[i].ID, r.Job.ID
	}
	return schema.New(tx).SetDeliveryJobs(ctx, ids, jobIDs)
}

func ptr[T any](v T) *T { return &v }

func deref(p *int) int {
	if p == nil {
		return 0
	}
	return *p
}
