package metrics

import "github.com/prometheus/client_golang/prometheus"

// Results of a failed authentication, the label of
// orchestrator_auth_failures_total.
const (
	AuthInvalid   = "invalid"   // a missing or wrong key, answered 401
	AuthThrottled = "throttled" // refused unchecked (429): the client failed too often
)

// apiGuards are the API's protections against abusive clients: failed
// authentications and admit denials whose audit was dropped.
type apiGuards struct {
	authFailures  *prometheus.CounterVec
	deniedDropped prometheus.Counter
}

func (m *Metrics) registerAPIGuards() {
	m.authFailures = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: "auth_failures_total",
		Help: "Requests refused for their key, by result (invalid: a missing or wrong key, 401; throttled: refused unchecked with 429 because the client failed too often)."},
		[]string{"result"})
	m.deniedDropped = prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Name: "admit_denied_audit_dropped_total",
		Help: "Admit denials left out of the audit log because its writer's queue was full."})
	m.reg.MustRegister(m.authFailures, m.deniedDropped)
	for _, r := range []string{AuthInvalid, AuthThrottled} {
		m.authFailures.WithLabelValues(r)
	}
}

// AuthFailure counts one request refused for its key (AuthInvalid,
// AuthThrottled).
func (m *Metrics) AuthFailure(result string) {
	if m == nil {
		return
	}
	m.authFailures.WithLabelValues(result).Inc()
}

// AdmitDeniedDropped counts admit denials the audit could not take.
func (m *Metrics) AdmitDeniedDropped() {
	if m == nil {
		return
	}
	m.deniedDropped.Inc()
}
