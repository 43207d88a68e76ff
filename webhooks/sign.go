package webhooks

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"strconv"
	"strings"
	"time"
)

// Headers of every delivery.
const (
	HeaderID        = "Webhook-Id"        // the event id (dedupe key)
	HeaderEvent     = "Webhook-Event"     // the event type
	HeaderSignature = "Webhook-Signature" // t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">[,v1=…]
)

// Tolerance is how old a signature's timestamp a receiver should accept
// (docs/webhooks.md): older is a replay. The timestamp is that of the
// attempt, so a retried delivery is signed afresh.
const Tolerance = 5 * time.Minute

// Sign returns the Webhook-Signature header of body sent at t: one v1 per
// secret (the current one first, then the previous one during a rotation's
// overlap), so a receiver holding either verifies it.
func Sign(t time.Time, body []byte, secrets ...string) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	var b strings.Builder
	b.WriteString("t=")
	b.WriteString(ts)
	for _, s := range secrets {
		b.WriteString(",v1=")
		b.WriteString(hex.EncodeToString(mac(s, ts, body)))
	}
	return b.String()
}

func mac(secret, ts string, body []byte) []byte {
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte(ts))
	m.Write([]byte{'.'})
	m.Write(body)
	return m.Sum(nil)
}
