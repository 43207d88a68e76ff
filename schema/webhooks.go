package schema

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	orch "github.com/enginefleet/orchestrator"
)

// ChannelWebhooks is NOTIFYed (empty payload) when deliveries may be ready
// to queue: the audit trigger wrote some, a lane freed up, or a product
// asked for a redelivery.
const ChannelWebhooks = "orch_webhooks"

// Webhook endpoint statuses.
const (
	WebhookActive  = "active"
	WebhookFailing = "failing" // a delivery gave up; new ones get one attempt each until one succeeds
)

// Webhook delivery states.
const (
	DeliveryPending   = "pending"   // waiting for its lane
	DeliveryQueued    = "queued"    // its lane's head: a River job delivers it
	DeliveryDelivered = "delivered" // the endpoint answered 2xx
	DeliveryFailed    = "failed"    // retries exhausted (or one attempt on a failing endpoint)
)

// WebhookEndpoint is a product's webhook endpoint. The secrets are Fernet
// tokens under the master keyring.
type WebhookEndpoint struct {
	ID                string
	ProductID         string
	URL               string
	Description       string
	EventTypes        []string // empty = every type
	SecretEnc         string
	PreviousSecretEnc string
	PreviousExpiresAt *time.Time
	Status            string
	FailingSince      *time.Time
	CreatedAt         time.Time
}

const endpointCols = `id::text, product_id::text, url, description, event_types, secret_enc,
	coalesce(previous_secret_enc, ''), previous_expires_at, status, failing_since, created_at`

func scanEndpoint(row pgx.Row) (WebhookEndpoint, error) {
	var e WebhookEndpoint
	err := row.Scan(&e.ID, &e.ProductID, &e.URL, &e.Description, &e.EventTypes, &e.SecretEnc,
		&e.PreviousSecretEnc, &e.PreviousExpiresAt, &e.Status, &e.FailingSince, &e.CreatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return e, orch.Errorf(orch.CodeWebhookNotFound, "webhook endpoint not found")
	}
	if err != nil {
		return e, fmt.Errorf("scan webhook endpoint: %w", err)
	}
	return e, nil
}

// InsertWebhookEndpoint records a new endpoint.
func (q *Queries) InsertWebhookEndpoint(ctx context.Context, e WebhookEndpoint) (WebhookEndpoint, error) {
	types := e.EventTypes
	if types == nil {
		types = []string{}
	}
	return scanEndpoint(q.db.QueryRow(ctx, `INSERT INTO webhook_endpoints (id, product_id, url, description, event_types, secret_enc)
		VALUES ($1, $2, $3, $4, $5, $6) RETURNING `+endpointCols, e.ID, e.ProductID, e.URL, e.Description, types, e.SecretEnc))
}

// LockProductWebhooks serializes endpoint creation of a product until the
// transaction ends (the per-product limit is counted under it).
func (q *Queries) LockProductWebhooks(ctx context.Context, productID string) error {
	if _, err := q.db.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtext('orch_webhooks:' || $1))`, productID); err != nil {
		return fmt.Errorf("lock product webhooks: %w", err)
	}
	return nil
}

// WebhookEndpoints lists a product's endpoints, oldest first.
func (q *Queries) WebhookEndpoints(ctx context.Context, productID string) ([]WebhookEndpoint, error) {
	rows, err := q.db.Query(ctx, `SELECT `+endpointCols+` FROM webhook_endpoints WHERE product_id = $1 ORDER BY created_at, id`, productID)
	return collect(rows, err, "list webhook endpoints", scanEndpoint)
}

// WebhookEndpoint returns one of a product's endpoints; WEBHOOK_NOT_FOUND
// if it has none with that id.
func (q *Queries) WebhookEndpoint(ctx context.Context, productID, id string) (WebhookEndpoint, error) {
	if !isUUID(id) {
		return WebhookEndpoint{}, orch.Errorf(orch.CodeWebhookNotFound, "webhook endpoint not found")
	}
	return scanEndpoint(q.db.QueryRow(ctx, `SELECT `+endpointCols+` FROM webhook_endpoints WHERE product_id = $1 AND id = $2`, productID, id))
}

// DeleteWebhookEndpoint removes an endpoint with its deliveries (a queued
// one's job finds nothing and ends).
func (q *Queries) DeleteWebhookEndpoint(ctx context.Context, productID, id string) error {
	if !isUUID(id) {
		return orch.Errorf(orch.CodeWebhookNotFound, "webhook endpoint not found")
	}
	tag, err := q.db.Exec(ctx, `DELETE FROM webhook_endpoints WHERE product_id = $1 AND id = $2`, productID, id)
	if err != nil {
		return fmt.Errorf("delete webhook endpoint: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return orch.Errorf(orch.CodeWebhookNotFound, "webhook endpoint not found")
	}
	return nil
}

// RotateWebhookSecret makes newEnc the endpoint's secret; the current one
// keeps signing until previousUntil.
func (q *Queries) RotateWebhookSecret(ctx context.Context, productID, id, newEnc string, previousUntil time.Time) (WebhookEndpoint, error) {
	if !isUUID(id) {
		return WebhookEndpoint{}, orch.Errorf(orch.CodeWebhookNotFound, "webhook endpoint not found")
	}
	return scanEndpoint(q.db.QueryRow(ctx, `UPDATE webhook_endpoints
		SET previous_secret_enc = secret_enc, previous_expires_at = $4, secret_enc = $3
		WHERE product_id = $1 AND id = $2 RETURNING `+endpointCols, productID, id, newEnc, previousUntil))
}

// SetWebhookStatus marks an endpoint failing (from now, if it was not) or
// active again.
func (q *Queries) SetWebhookStatus(ctx context.Context, id, status string) error {
	_, err := q.db.Exec(ctx, `UPDATE webhook_endpoints SET status = $2,
			failing_since = CASE WHEN $2 = 'failing' THEN coalesce(failing_since, now()) END
		WHERE id = $1 AND status <> $2`, id, status)
	if err != nil {
		return fmt.Errorf("set webhook status: %w", err)
	}
	return nil
}

// WebhookDelivery is one delivery of an event to an endpoint, with its
// event's type.
type WebhookDelivery struct {
	ID              string
	EventID         string
	EventType       string
	EndpointID      string
	ProductID       string
	Lane            string
	Seq             int64
	State           string
	Attempts        int
	RedeliveryOf    string
	LastAttemptAt   *time.Time
	NextAttemptAt   *time.Time
	ResponseStatus  *int
	ResponseExcerpt string
	LastError       string
	CreatedAt       time.Time
	FinishedAt      *time.Time
}

const deliveryCols = `d.id::text, d.event_id::text, ev.type, d.endpoint_id::text, d.product_id::text, d.lane, d.seq,
	d.state, d.attempts, coalesce(d.redelivery_of::text, ''), d.last_attempt_at, d.next_attempt_at, d.response_status,
	coalesce(d.response_excerpt, ''), coalesce(d.last_error, ''), d.created_at, d.finished_at`

func scanDelivery(row pgx.Row) (WebhookDelivery, error) {
	var d WebhookDelivery
	err := row.Scan(&d.ID, &d.EventID, &d.EventType, &d.EndpointID, &d.ProductID, &d.Lane, &d.Seq,
		&d.State, &d.Attempts, &d.RedeliveryOf, &d.LastAttemptAt, &d.NextAttemptAt, &d.ResponseStatus,
		&d.ResponseExcerpt, &d.LastError, &d.CreatedAt, &d.FinishedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return d, orch.Errorf(orch.CodeDeliveryNotFound, "webhook delivery not found")
	}
	if err != nil {
		return d, fmt.Errorf("scan webhook delivery: %w", err)
	}
	return d, nil
}

// DeliveryFilter selects an endpoint's deliveries (newest first).
type DeliveryFilter struct {
	EndpointID string
	State      string // "" = every state
	EventID    string // "" = every event
	Before     *time.Time
	Limit      int
}

// WebhookDeliveries lists an endpoint's deliveries matching f, newest first.
func (q *Queries) WebhookDeliveries(ctx context.Context, f DeliveryFilter) ([]WebhookDelivery, error) {
	rows, err := q.db.Query(ctx, `SELECT `+deliveryCols+` FROM webhook_deliveries d JOIN webhook_events ev ON ev.id = d.event_id
		WHERE d.endpoint_id = $1 AND ($2 = '' OR d.state = $2) AND ($3 = '' OR d.event_id::text = $3)
		  AND ($4::timestamptz IS NULL OR d.created_at < $4)
		ORDER BY d.created_at DESC, d.seq DESC LIMIT $5`, f.EndpointID, f.State, f.EventID, f.Before, f.Limit)
	return collect(rows, err, "list webhook deliveries", scanDelivery)
}

// WebhookDelivery returns one delivery of an endpoint; DELIVERY_NOT_FOUND
// if none.
func (q *Queries) WebhookDelivery(ctx context.Context, endpointID, id string) (WebhookDelivery, error) {
	if !isUUID(id) {
		return WebhookDelivery{}, orch.Errorf(orch.CodeDeliveryNotFound, "webhook delivery not found")
	}
	return scanDelivery(q.db.QueryRow(ctx, `SELECT `+deliveryCols+` FROM webhook_deliveries d JOIN webhook_events ev ON ev.id = d.event_id
		WHERE d.endpoint_id = $1 AND d.id = $2`, endpointID, id))
}

// Redeliver records a new delivery of a delivery's event to the same
// endpoint, in a lane of its own (it neither waits for nor holds up the
// engine's other events), and NOTIFYs the dispatcher.
func (q *Queries) Redeliver(ctx context.Context, endpointID, id string) (WebhookDelivery, error) {
	if !isUUID(id) {
		return WebhookDelivery{}, orch.Errorf(orch.CodeDeliveryNotFound, "webhook delivery not found")
	}
	d, err := scanDelivery(q.db.QueryRow(ctx, `WITH orig AS (
			SELECT event_id, endpoint_id, product_id, seq FROM webhook_deliveries WHERE endpoint_id = $1 AND id = $2
		), ins AS (
			INSERT INTO webhook_deliveries (id, event_id, endpoint_id, product_id, lane, seq, redelivery_of)
			SELECT n.id, orig.event_id, orig.endpoint_id, orig.product_id, 'redelivery:' || n.id, orig.seq, $2
			FROM orig, (SELECT gen_random_uuid() AS id) n
			RETURNING *
		)
		SELECT `+deliveryCols+` FROM ins d JOIN webhook_events ev ON ev.id = d.event_id`, endpointID, id))
	if err != nil {
		return d, err
	}
	return d, q.Notify(ctx, ChannelWebhooks, "")
}

// QueuedDelivery is a delivery just made its lane's head: a River job must
// be inserted for it in the same transaction.
type QueuedDelivery struct {
	ID        string
	ProductID string
}

// QueueLaneHeads marks up to limit deliveries queued, each the oldest open
// delivery of a lane with none queued, oldest first. Rows another
// transaction holds are skipped (it is queueing them).
func (q *Queries) QueueLaneHeads(ctx context.Context, limit int) ([]QueuedDelivery, error) {
	rows, err := q.db.Query(ctx, `WITH heads AS (
			SELECT d.id FROM webhook_deliveries d
			WHERE d.state = 'pending' AND NOT EXISTS (
				SELECT 1 FROM webhook_deliveries o
				WHERE o.endpoint_id = d.endpoint_id AND o.lane = d.lane AND o.state IN ('pending', 'queued')
				  AND (o.state = 'queued' OR o.seq < d.seq OR (o.seq = d.seq AND o.id < d.id)))
			ORDER BY d.seq LIMIT $1
			FOR UPDATE SKIP LOCKED
		)
		UPDATE webhook_deliveries d SET state = 'queued' FROM heads WHERE d.id = heads.id
		RETURNING d.id::text, d.product_id::text`, limit)
	return collect(rows, err, "queue webhook lane heads", func(r pgx.Row) (QueuedDelivery, error) {
		var x QueuedDelivery
		return x, r.Scan(&x.ID, &x.ProductID)
	})
}

// QueueNextInLane marks the next open delivery of a lane queued (none
// when the lane is empty or another is queued).
func (q *Queries) QueueNextInLane(ctx context.Context, endpointID, lane string) ([]QueuedDelivery, error) {
	rows, err := q.db.Query(ctx, `UPDATE webhook_deliveries d SET state = 'queued'
		WHERE d.id = (SELECT id FROM webhook_deliveries WHERE endpoint_id = $1 AND lane = $2 AND state = 'pending'
				ORDER BY seq, id LIMIT 1 FOR UPDATE)
		  AND NOT EXISTS (SELECT 1 FROM webhook_deliveries WHERE endpoint_id = $1 AND lane = $2 AND state = 'queued')
		RETURNING d.id::text, d.product_id::text`, endpointID, lane)
	return collect(rows, err, "queue next webhook delivery", func(r pgx.Row) (QueuedDelivery, error) {
		var x QueuedDelivery
		return x, r.Scan(&x.ID, &x.ProductID)
	})
}

// SetDeliveryJobs records the River jobs of queued deliveries (ids[i]
// has jobIDs[i]).
func (q *Queries) SetDeliveryJobs(ctx context.Context, ids []string, jobIDs []int64) error {
	_, err := q.db.Exec(ctx, `UPDATE webhook_deliveries d SET job_id = x.job
		FROM unnest($1::uuid[], $2::bigint[]) AS x(id, job) WHERE d.id = x.id`, ids, jobIDs)
	if err != nil {
		return fmt.Errorf("set delivery jobs: %w", err)
	}
	return nil
}

// LockWebhookDispatch serializes the dispatchers of every worker process
// until the transaction ends.
func (q *Queries) LockWebhookDispatch(ctx context.Context) error {
	if _, err := q.db.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtext('orch_webhook_dispatch'))`); err != nil {
		return fmt.Errorf("lock webhook dispatch: %w", err)
	}
	return nil
}

// RequeueOrphanedDeliveries puts back to pending the queued deliveries
// whose River job is gone or finished without finishing them (discarded
// after repeated database failures, say), so their lanes move again.
func (q *Queries) RequeueOrphanedDeliveries(ctx context.Context) (int64, error) {
	tag, err := q.db.Exec(ctx, `UPDATE webhook_deliveries d SET state = 'pending', job_id = NULL
		WHERE d.state = 'queued' AND NOT EXISTS (
			SELECT 1 FROM river_job j WHERE j.id = d.job_id
			  AND j.state IN ('available', 'pending', 'running', 'retryable', 'scheduled'))`)
	if err != nil {
		return 0, fmt.Errorf("requeue orphaned deliveries: %w", err)
	}
	return tag.RowsAffected(), nil
}

// DeliveryJob is what a delivery job needs: the delivery, its event and
// its endpoint, read in one statement.
type DeliveryJob struct {
	Delivery    WebhookDelivery
	Endpoint    WebhookEndpoint
	ProductSlug string
	UserID      string
	EngineID    string
	OccurredAt  time.Time
	Data        json.RawMessage
}

// DeliveryForJob reads a delivery for its job; DELIVERY_NOT_FOUND when
// it is gone (its endpoint was deleted).
func (q *Queries) DeliveryForJob(ctx context.Context, id string) (DeliveryJob, error) {
	var j DeliveryJob
	var data []byte
	d, e := &j.Delivery, &j.Endpoint
	err := q.db.QueryRow(ctx, `SELECT `+deliveryCols+`, p.slug, coalesce(ev.user_id, ''), coalesce(ev.engine_id::text, ''),
			ev.occurred_at, ev.data, e.id::text, e.product_id::text, e.url, e.description, e.event_types, e.secret_enc,
			coalesce(e.previous_secret_enc, ''), e.previous_expires_at, e.status, e.failing_since, e.created_at
		FROM webhook_deliveries d JOIN webhook_events ev ON ev.id = d.event_id
		JOIN webhook_endpoints e ON e.id = d.endpoint_id JOIN products p ON p.id = d.product_id
		WHERE d.id = $1`, id).Scan(&d.ID, &d.EventID, &d.EventType, &d.EndpointID, &d.ProductID, &d.Lane, &d.Seq,
		&d.State, &d.Attempts, &d.RedeliveryOf, &d.LastAttemptAt, &d.NextAttemptAt, &d.ResponseStatus,
		&d.ResponseExcerpt, &d.LastError, &d.CreatedAt, &d.FinishedAt,
		&j.ProductSlug, &j.UserID, &j.EngineID, &j.OccurredAt, &data,
		&e.ID, &e.ProductID, &e.URL, &e.Description, &e.EventTypes, &e.SecretEnc,
		&e.PreviousSecretEnc, &e.PreviousExpiresAt, &e.Status, &e.FailingSince, &e.CreatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return j, orch.Errorf(orch.CodeDeliveryNotFound, "webhook delivery not found")
	}
	if err != nil {
		return j, fmt.Errorf("read webhook delivery: %w", err)
	}
	j.Data = data
	return j, nil
}

// DeliveryAttempt is the outcome of one attempt.
type DeliveryAttempt struct {
	Status   *int   // the HTTP status, nil when no response came
	Excerpt  string // the start of the response body
	Error    string // why it failed ("" on success)
	Next     *time.Time
	NewState string // queued (to be retried at Next), delivered or failed
}

// RecordDeliveryAttempt records an attempt of a queued delivery; false
// when the delivery is no longer queued (another attempt finished it).
func (q *Queries) RecordDeliveryAttempt(ctx context.Context, id string, a DeliveryAttempt) (bool, error) {
	tag, err := q.db.Exec(ctx, `UPDATE webhook_deliveries SET attempts = attempts + 1, last_attempt_at = now(),
			response_status = $2, response_excerpt = nullif($3, ''), last_error = nullif($4, ''), next_attempt_at = $5,
			state = $6, finished_at = CASE WHEN $6 IN ('delivered', 'failed') THEN now() END,
			job_id = CASE WHEN $6 IN ('delivered', 'failed') THEN NULL ELSE job_id END
		WHERE id = $1 AND state = 'queued'`, id, a.Status, a.Excerpt, a.Error, a.Next, a.NewState)
	if err != nil {
		return false, fmt.Errorf("record delivery attempt: %w", err)
	}
	return tag.RowsAffected() == 1, nil
}
