package console

import (
	"math"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/metrics"
)

func TestQuantile(t *testing.T) {
	bs := []bucket{{le: 0.001, count: 50}, {le: 0.01, count: 90}, {le: 0.1, count: 100}, {le: math.Inf(1), count: 100}}
	require.InDelta(t, 1.0, *quantile(0.5, bs), 0.001)   // the 50th of 100 is the top of the first bucket
	require.InDelta(t, 55.0, *quantile(0.95, bs), 0.001) // half-way through (10 ms, 100 ms]
	require.Nil(t, quantile(0.5, []bucket{{le: 1, count: 0}, {le: math.Inf(1), count: 0}}))
	require.InDelta(t, 1000.0, *quantile(0.99, []bucket{{le: 1, count: 0}, {le: math.Inf(1), count: 5}}), 0.001,
		"above the last bound: the last bound")
}

// The admit latency is the difference of two snapshots of the histogram:
// what happened in the window only.
func TestAdmitSamplerWindow(t *testing.T) {
	m := metrics.New(metrics.Config{})
	a := admitSampler{gatherer: m.Gatherer()}
	for range 100 {
		m.ObserveAdmit(metrics.AdmitWarm, 200*time.Millisecond) // before the window: must not count
	}
	t0 := time.Now()
	first := a.latency(t0)
	require.NotNil(t, first)
	require.Zero(t, first.Count, "one snapshot is no window")
	for range 90 {
		m.ObserveAdmit(metrics.AdmitWarm, 800*time.Microsecond)
	}
	for range 10 {
		m.ObserveAdmit(metrics.AdmitWarm, 40*time.Millisecond)
	}
	m.ObserveAdmit(metrics.AdmitCold, 2*time.Second)
	l := a.latency(t0.Add(61 * time.Second))
	require.Equal(t, uint64(101), l.Count)
	require.Equal(t, uint64(1), l.Cold)
	require.Equal(t, float64(61), l.WindowS)
	require.NotNil(t, l.WarmP50)
	require.Less(t, *l.WarmP50, 1.0)
	require.Greater(t, *l.WarmP95, 25.0)
	require.LessOrEqual(t, *l.WarmP95, 50.0)
	// A read within sampleEvery reuses the last snapshot.
	again := a.latency(t0.Add(62 * time.Second))
	require.Equal(t, l.Count, again.Count)
	require.Nil(t, (&admitSampler{}).latency(t0), "no registry: no latency")
}
