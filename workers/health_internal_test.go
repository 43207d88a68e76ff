package workers

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/metrics"
)

func TestBackoff(t *testing.T) {
	t.Parallel()
	s := time.Second
	for _, c := range []struct {
		base, max time.Duration
		attempt   int
		want      time.Duration
	}{
		{5 * s, 300 * s, 1, 5 * s},
		{5 * s, 300 * s, 2, 10 * s},
		{5 * s, 300 * s, 3, 20 * s},
		{5 * s, 300 * s, 6, 160 * s},
		{5 * s, 300 * s, 7, 300 * s},
		{5 * s, 300 * s, 60, 300 * s},
		{s, 0, 4, 8 * s},
		{0, 300 * s, 3, 0},
		{5 * s, 300 * s, 0, 5 * s},
	} {
		require.Equal(t, c.want, Backoff(c.base, c.max, c.attempt), "base %s max %s attempt %d", c.base, c.max, c.attempt)
	}
}

// Each engine gets exactly one sampled health_check per audit window.
func TestHealthCheckSampling(t *testing.T) {
	t.Parallel()
	h := &Health{cfg: HealthConfig{Interval: 30 * time.Second}.withDefaults()}
	start := time.Date(2026, 3, 1, 10, 0, 0, 0, time.UTC)
	perEngine := map[string]int{}
	perSweep := map[int]int{}
	for e := 0; e < 1000; e++ {
		id := fmt.Sprintf("00000000-0000-4000-8000-%012d", e)
		for i := 0; i < 120; i++ { // one hour of sweeps
			if h.sampled(id, start.Add(time.Duration(i)*30*time.Second)) {
				perEngine[id]++
				perSweep[i]++
			}
		}
	}
	require.Len(t, perEngine, 1000)
	for id, n := range perEngine {
		require.Equal(t, 1, n, id)
	}
	for i, n := range perSweep {
		require.Less(t, n, 30, "sweep %d wrote %d rows: samples are spread", i, n)
	}
	every := &Health{cfg: HealthConfig{Interval: 2 * time.Hour}.withDefaults()}
	require.True(t, every.sampled("x", start), "intervals beyond the window sample every sweep")
}

// A sweep over an engine that fails its probe counts the failed probe in
// orchestrator_health_probe_failures_total (the dashboard's probe
// failures panel); healthy probes do not count.
func TestSweepCountsFailedProbes(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	m := metrics.New(metrics.Config{})
	r := newFakeRig(t, func(c *Config) { c.Metrics = m })
	sick := r.engine(t, "sick", orch.StateRunning)
	r.engine(t, "well", orch.StateRunning)
	r.be.setSick(sick.ID, true)
	failures := func() float64 {
		s := testenv.GatherMetric(t, m.Gatherer(), "orchestrator_health_probe_failures_total", nil)
		require.NotNil(t, s)
		return s.GetCounter().GetValue()
	}
	require.Zero(t, failures())

	res, err := r.w.Health.SweepNow(ctx, nil, "")
	require.NoError(t, err)
	require.Equal(t, BatchResult{Probed: 2, Healthy: 1, Failed: 1}, res)
	require.Equal(t, 1.0, failures())
	require.Equal(t, 1, r.row(t, sick.ID).HealthFailures)

	_, err = r.w.Health.SweepNow(ctx, nil, "")
	require.NoError(t, err)
	require.Equal(t, 2.0, failures(), "every failed probe counts")
}

// A sweep probe that times out says so in the audit row and the engine's
// last_error, in the stable words of a failed probe.
func TestSweepProbeTimeoutIsPublic(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	r := newFakeRig(t, func(c *Config) {
		c.Engines.ProbeTimeout = 200 * time.Millisecond
		c.Health.MaxFailures = 1
	})
	e := r.engine(t, "zoe", orch.StateRunning)
	r.be.setHanging(e.ID, true)

	res, err := r.w.Health.SweepNow(ctx, nil, "")
	require.NoError(t, err)
	require.Equal(t, 1, res.NowFailed)
	const want = "probe: timed out after 200ms"
	checks := r.audits(t, e.ID, orch.ActionHealthCheck)
	require.Len(t, checks, 1)
	require.Equal(t, want, checks[0]["error"])
	failed := r.audits(t, e.ID, orch.ActionHealthFailed)
	require.Len(t, failed, 1)
	require.Equal(t, want, failed[0]["error"])
	require.Equal(t, want, r.row(t, e.ID).LastError)
}
