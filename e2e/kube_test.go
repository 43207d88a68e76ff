package e2e_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/backend/kubernetes"
	"github.com/enginefleet/orchestrator/internal/kubeenv"
	"github.com/enginefleet/orchestrator/internal/testenv"
)

// kubeURLTemplate is the kubernetes backend's default engine URL: the
// engine's Service through cluster DNS.
const kubeURLTemplate = "http://{service}.{namespace}.svc:8000"

// kubeBackends maps a kubernetes fleet's namespace to its backend, for
// kubeDial.
var kubeBackends sync.Map

// kubeFleet makes a kubernetes backend for a test fleet: a namespace of
// its own on the shared control plane, engines on the node agent's node
// (which runs the engine binary for each pod, on a loopback address of its
// own), brains on the environment's provisioner.
func kubeFleet(t testing.TB, node, fleet string, startTimeout time.Duration) (string, *kubernetes.Backend) {
	t.Helper()
	env := kubeenv.Require(t)
	kubeenv.RequireAgent(t)
	ns := env.Namespace(t)
	b, err := kubernetes.New(kubernetes.Config{
		RESTConfig: env.Config, Namespace: ns, Node: node, Fleet: fleet,
		StorageClass: kubeenv.StorageClass, ReplaceGrace: 2 * time.Second, StartTimeout: startTimeout,
		NodeSelector: map[string]string{kubeenv.LabelNodeKind: "agent"},
		Tolerations:  []kubernetes.Toleration{{Key: kubeenv.AgentTaintKey, Operator: "Exists", Effect: "NoSchedule"}},
		Labels:       map[string]string{"orchestrator.test": "e2e"},
	}, testenv.Quiet())
	require.NoError(t, err)
	kubeBackends.Store(ns, b)
	t.Cleanup(func() { kubeBackends.Delete(ns); b.Close() }) //nolint:errcheck
	return ns, b
}

// kubeDial dials like net.Dialer, except that a Service name of a
// kubernetes fleet (engine-<id>.<namespace>.svc:8000) goes to the address
// of the engine's pod, as cluster DNS and the Service's proxying would
// take it there (the test environment has neither). A Service with no
// pod refuses the connection.
func kubeDial(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	host, _, err := net.SplitHostPort(addr)
	if err != nil || !strings.HasSuffix(host, ".svc") {
		return d.DialContext(ctx, network, addr)
	}
	parts := strings.Split(host, ".")
	v, ok := kubeBackends.Load(parts[1])
	if len(parts) != 3 || !ok || !strings.HasPrefix(parts[0], "engine-") {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	pod, err := v.(*kubernetes.Backend).Address(ctx, strings.TrimPrefix(parts[0], "engine-"))
	if err != nil {
		return nil, err
	}
	if pod == "" {
		return nil, &net.OpError{Op: "dial", Net: network, Err: fmt.Errorf("service %s has no ready pod: connection refused", host)}
	}
	return d.DialContext(ctx, network, pod)
}

// kubeProxy is an HTTP forward proxy resolving Service names with
// kubeDial: a worker in another process (HTTP_PROXY=its URL) reaches
// engines through it.
func kubeProxy(t testing.TB) string {
	t.Helper()
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.DialContext, tr.Proxy = kubeDial, nil
	rp := &httputil.ReverseProxy{Transport: tr, Rewrite: func(pr *httputil.ProxyRequest) {
		pr.Out.URL.Scheme, pr.Out.URL.Host = "http", pr.In.Host
	}}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := &http.Server{Handler: rp, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(l)                   //nolint:errcheck
	t.Cleanup(func() { srv.Close() }) //nolint:errcheck
	return "http://" + l.Addr().String()
}
