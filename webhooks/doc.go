// Package webhooks tells products what happened to their users' engines:
// signed HTTP POSTs of lifecycle events to the endpoints a product
// registers (docs/webhooks.md is the product engineer's guide).
//
// Events come from the audit stream: a trigger on audit_log (migration
// 0032) writes the event and one delivery per subscribed endpoint in the
// audit row's own transaction, so a committed operation cannot lose its
// event and a rolled-back one sends nothing. The dispatcher (Run) turns
// deliveries into River jobs on their own queue; a delivery's job signs
// and POSTs it (Deliverer).
//
// Guarantees:
//   - At least once: a delivery is retried until the endpoint answers 2xx
//     or its retry window ends; a worker that dies mid-attempt has its job
//     re-run. Receivers dedupe on the event id (Webhook-Id).
//   - Ordered per engine and endpoint: an endpoint gets one engine's events
//     one at a time, in the order they were recorded (audit order); the
//     next is not sent until the previous was acknowledged or gave up.
//     Different engines' events are independent. Redeliveries asked for by
//     the product are not ordered.
//   - Isolated: deliveries run on the webhooks queue (never a lifecycle
//     queue's workers) and each product has at most ProductConcurrency
//     attempts in flight per worker process, so a slow or dead endpoint
//     delays only its own product's deliveries.
package webhooks
