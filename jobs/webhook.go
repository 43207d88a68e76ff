package jobs

import "github.com/riverqueue/river"

// QueueWebhooks serves webhook deliveries only, so a slow endpoint never
// holds a worker a lifecycle job could use.
const QueueWebhooks = "webhooks"

// WebhookDeliverArgs delivers one webhook delivery (its lane's head).
type WebhookDeliverArgs struct {
	DeliveryID string `json:"delivery_id"`
}

// Kind is permanent.
func (WebhookDeliverArgs) Kind() string { return "webhook_deliver" }

// InsertOpts: the webhooks queue. Retries are the worker's own (snoozes on
// its schedule, which consume no attempt); attempts count database
// trouble only, and the dispatcher re-queues a delivery whose job was
// discarded.
func (WebhookDeliverArgs) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: QueueWebhooks, MaxAttempts: 25}
}
