package e2e_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/backend/docker"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/metrics"
	"github.com/enginefleet/orchestrator/workers"
)

// Benchmarks run with `make bench` (-benchtime 1x): each takes its own
// fixed sample (≥ 20) and reports medians/percentiles as metrics, side by
// side with the baseline the issue names.

func pct(ds []time.Duration, p float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(float64(len(s)-1) * p)
	return s[i]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// benchT adapts a *testing.B to the fleet helpers, which take a *testing.T.
func benchFleet(b *testing.B, o fleetOpts) *fleet {
	b.Helper()
	return newFleetTB(b, o)
}

// stepTimes snapshots the fleet's operation step histogram (sum, count per
// step), so a benchmark can report the mean of each step over its own
// samples: the timeline of where an operation's time goes.
type stepTimes map[string][2]float64

func (f *fleet) steps() stepTimes {
	f.t.Helper()
	out := stepTimes{}
	for _, s := range metrics.Steps {
		m := testenv.GatherMetric(f.t, f.Proc.Metrics.Gatherer(), "orchestrator_operation_step_duration_seconds", map[string]string{"step": s})
		if m != nil {
			out[s] = [2]float64{m.GetHistogram().GetSampleSum(), float64(m.GetHistogram().GetSampleCount())}
		}
	}
	return out
}

// reportSteps reports each step's mean (ms) since before, as step-<name>-ms.
func (f *fleet) reportSteps(b *testing.B, before stepTimes) {
	now := f.steps()
	for _, s := range metrics.Steps {
		if n := now[s][1] - before[s][1]; n > 0 {
			b.ReportMetric((now[s][0]-before[s][0])/n*1000, "step-"+s+"-ms")
		}
	}
}

// pollHealth polls url until it answers 200, every 5 ms (the baselines'
// poll: as eager as ours).
func pollHealth(url string) {
	hc := &http.Client{Timeout: 2 * time.Second}
	for {
		r, err := hc.Get(url)
		if err == nil {
			io.Copy(io.Discard, r.Body) //nolint:errcheck
			r.Body.Close()
			if r.StatusCode == 200 {
				return
			}
		}
		time.Sleep(5 * time.Millisecond) // a measurement: the poll period is its resolution, so no backoff
	}
}

// engineRunArgs are the `docker run` flags that start the engine image the
// way the docker backend does with production's defaults (backend/docker
// containerOptions): on the engines' isolated network, as the engine
// user, without capabilities, read-only with a /tmp tmpfs, limited.
func engineRunArgs(network string) []string {
	return []string{"--network", network, "--user", docker.DefaultUser, "--cap-drop", "ALL",
		"--security-opt", "no-new-privileges:true", "--read-only", "--tmpfs", "/tmp:rw,nosuid,nodev,noexec,size=" + docker.DefaultTmpfsSize,
		"--restart", "unless-stopped", "--memory", fmt.Sprintf("%dm", docker.DefaultMemoryMB), "--memory-swap", fmt.Sprintf("%dm", docker.DefaultMemoryMB),
		"--cpus", fmt.Sprint(docker.DefaultCPUs), "--pids-limit", fmt.Sprint(docker.DefaultPids)}
}

// dockerRun times `docker run -d` of image on port plus polling its
// /health until ok, then removes the container and its volume.
func dockerRun(b *testing.B, image string, port int, extra ...string) time.Duration {
	name := "bench-docker-run-" + randHex(4)
	args := append([]string{"run", "-d", "--name", name, "--label", "orchestrator.test=true",
		"-p", fmt.Sprintf("127.0.0.1:%d:8000", port), "-e", "ENGINE_KEY_HASH=" + keys.Hash("k"),
		"-v", name + ":/data"}, extra...)
	args = append(args, image)
	start := time.Now()
	out, err := exec.Command("docker", args...).CombinedOutput()
	if err != nil {
		exec.Command("docker", "rm", "-f", "-v", name).Run()     //nolint:errcheck
		exec.Command("docker", "volume", "rm", "-f", name).Run() //nolint:errcheck
		b.Fatalf("docker run: %v %s", err, out)
	}
	pollHealth(fmt.Sprintf("http://127.0.0.1:%d/health", port))
	d := time.Since(start)
	exec.Command("docker", "rm", "-f", "-v", name).Run()     //nolint:errcheck
	exec.Command("docker", "volume", "rm", "-f", name).Run() //nolint:errcheck
	return d
}

// Cold admit (new user → healthy engine URL) vs the same image started by
// `docker run` plus polling /health until ok, two ways: plain (default
// bridge, no limits), and as the backend runs engines (its isolated
// network, user, no capabilities, read-only): the daemon's own cost of
// that configuration is not the orchestrator's. Interleaved, so load
// from elsewhere hits all three alike. The timeline of our admits is
// reported beside (step-*-ms). Target: ≤ 1.10× the same-config run.
func BenchmarkColdAdmitVsDockerRun(b *testing.B) {
	const samples = 20
	f := benchFleet(b, fleetOpts{backend: "docker", ports: 60, limits: true})
	_, key := f.product("bench", orch.Policy{})
	admit := func(user string) time.Duration {
		start := time.Now()
		r := f.call("POST", "/engines/"+user+"/admit", key, map[string]any{"auto_provision": true})
		d := time.Since(start)
		if r.Body["admitted"] != true {
			b.Fatalf("admit: %v", r.Body)
		}
		return d
	}
	// A first admit outside the sample creates the network and looks at
	// the image (a fleet's first engine only).
	f.provisionUser(key, "cold-warmup")
	f.call("DELETE", "/engines/cold-warmup", key, nil)
	network := isolatedNetwork(b)

	var ours, plain, same []time.Duration
	basePort := f.PortMax - 5
	before := f.steps()
	for i := 0; i < samples; i++ {
		user := fmt.Sprintf("cold-%d", i)
		ours = append(ours, admit(user))
		f.call("DELETE", "/engines/"+user, key, nil)
		plain = append(plain, dockerRun(b, f.Image, basePort))
		same = append(same, dockerRun(b, f.Image, basePort, engineRunArgs(network)...))
	}
	f.reportSteps(b, before)
	b.ReportMetric(ms(pct(ours, 0.5)), "admit-p50-ms")
	b.ReportMetric(ms(pct(plain, 0.5)), "dockerrun-p50-ms")
	b.ReportMetric(ms(pct(same, 0.5)), "dockerrun-sameconfig-p50-ms")
	b.ReportMetric(float64(pct(ours, 0.5))/float64(pct(plain, 0.5)), "ratio-plain")
	b.ReportMetric(float64(pct(ours, 0.5))/float64(pct(same, 0.5)), "ratio")
}

// isolatedNetwork creates a network like the engines' (a bridge whose
// containers cannot reach each other) for the benchmark's baselines, and
// removes it after.
func isolatedNetwork(b *testing.B) string {
	name := "bench-isolated-" + randHex(4)
	out, err := exec.Command("docker", "network", "create", "--driver", "bridge", "--label", "orchestrator.test=true",
		"-o", docker.OptionICC+"=false", name).CombinedOutput()
	if err != nil {
		b.Fatalf("docker network create: %v %s", err, out)
	}
	b.Cleanup(func() { exec.Command("docker", "network", "rm", name).Run() }) //nolint:errcheck
	return name
}

type pickupArgs struct {
	Inserted time.Time `json:"inserted"`
}

func (pickupArgs) Kind() string { return "bench_pickup" }

// Job pickup latency (enqueue committed → worker starts) with the workers'
// tuned River configuration. Target p50 ≤ 15 ms.
func BenchmarkJobPickup(b *testing.B) {
	const samples = 200
	url := testenv.DB(b)
	pool := testenv.Pool(b, url)
	w := workers.New(workers.Config{Node: "bench", Engines: workers.EngineConfig{BootTimeout: time.Minute}}, pool, nil, testenv.Quiet())
	cfg := w.RiverConfig(testenv.Quiet())
	lat := make(chan time.Duration, samples)
	river.AddWorker(cfg.Workers, river.WorkFunc(func(ctx context.Context, j *river.Job[pickupArgs]) error {
		lat <- time.Since(j.Args.Inserted)
		return nil
	}))
	rc, err := river.NewClient(riverpgxv5.New(pool), cfg)
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	if err := rc.Start(ctx); err != nil {
		b.Fatal(err)
	}
	defer rc.StopAndCancel(ctx) //nolint:errcheck
	insert := func() {
		err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			_, err := rc.InsertTx(ctx, tx, pickupArgs{Inserted: time.Now()}, &river.InsertOpts{Queue: jobs.NodeQueue("bench")})
			return err
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	// Warm up: a first job picked up shows the producer is fetching (its
	// latency, which includes River's start, is not counted).
	insert()
	select {
	case <-lat:
	case <-time.After(30 * time.Second):
		b.Fatal("the warm-up job was not picked up within 30 s")
	}
	var ds []time.Duration
	for i := 0; i < samples; i++ {
		insert()
		ds = append(ds, <-lat)
		time.Sleep(20 * time.Millisecond) // spaced on purpose, as jobs arrive in production: one job's pickup, not a burst's
	}
	b.ReportMetric(ms(pct(ds, 0.5)), "pickup-p50-ms")
	b.ReportMetric(ms(pct(ds, 0.99)), "pickup-p99-ms")
}

// Warm admit (running engine) from a load generator on loopback: target
// ≥ 3,000 requests/s with p99 ≤ 20 ms on this 2-core machine.
func BenchmarkWarmAdmit(b *testing.B) {
	const (
		conc     = 32
		duration = 5 * time.Second
	)
	f := benchFleet(b, fleetOpts{})
	_, key := f.product("bench", orch.Policy{})
	for i := 0; i < 10; i++ {
		if r := f.call("POST", fmt.Sprintf("/engines/warm-%d/admit", i), key, map[string]any{"auto_provision": true}); r.Body["admitted"] != true {
			b.Fatalf("admit: %v", r.Body)
		}
	}
	tr := &http.Transport{MaxIdleConnsPerHost: conc, MaxConnsPerHost: conc}
	hc := &http.Client{Transport: tr}
	var n atomic.Int64
	var mu sync.Mutex
	var all []time.Duration
	deadline := time.Now().Add(duration)
	var wg sync.WaitGroup
	for g := 0; g < conc; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			for i := 0; time.Now().Before(deadline); i++ {
				req, _ := http.NewRequest("POST", fmt.Sprintf("%s/engines/warm-%d/admit", f.URL, (g+i)%10), nil)
				req.Header.Set("X-Platform-Key", key)
				start := time.Now()
				r, err := hc.Do(req)
				if err != nil {
					b.Error(err)
					return
				}
				io.Copy(io.Discard, r.Body) //nolint:errcheck
				r.Body.Close()
				if r.StatusCode != 200 {
					b.Errorf("status %d", r.StatusCode)
					return
				}
				mine = append(mine, time.Since(start))
				n.Add(1)
			}
			mu.Lock()
			all = append(all, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	b.ReportMetric(float64(n.Load())/duration.Seconds(), "req/s")
	b.ReportMetric(ms(pct(all, 0.5)), "p50-ms")
	b.ReportMetric(ms(pct(all, 0.99)), "p99-ms")
}

// Noisy neighbour: product B's cold admit p50 alone, then while product A
// has a burst of provisions in flight (admits with auto_provision, all at
// once). Subprocess engines, so that the figure is the queue's (job
// priority by product, lifecycle.Priority) and not the Docker daemon's
// contention. The burst is 80, not the 500: a test fleet's port
// range is at most 100 ports. Target: loaded ≤ 1.5× unloaded.
func BenchmarkNoisyNeighbour(b *testing.B) {
	const (
		burst   = 80
		samples = 5
	)
	f := benchFleet(b, fleetOpts{ports: burst + 2*samples + 5})
	_, keyA := f.product("noisy", orch.Policy{})
	_, keyB := f.product("quiet", orch.Policy{})
	coldB := func(user string) time.Duration {
		start := time.Now()
		r := f.call("POST", "/engines/"+user+"/admit", keyB, map[string]any{"auto_provision": true})
		if r.Body["admitted"] != true {
			b.Fatalf("admit %s: %v", user, r.Body)
		}
		return time.Since(start)
	}
	var alone, loaded []time.Duration
	for i := range samples {
		alone = append(alone, coldB(fmt.Sprintf("alone-%d", i)))
	}
	var wg sync.WaitGroup
	var done atomic.Int64
	for i := range burst {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := f.call("POST", fmt.Sprintf("/engines/burst-%d/admit", i), keyA, map[string]any{"auto_provision": true})
			if r.Body["admitted"] == true {
				done.Add(1)
			}
		}()
	}
	// Let the burst's admits reach the queue, then admit B's users one
	// after another while A's provisions are still queued.
	require.Eventually(b, func() bool {
		var n int
		f.Pool.QueryRow(context.Background(), `SELECT count(*) FROM operations WHERE status IN ('pending', 'running')`).Scan(&n) //nolint:errcheck
		return n >= burst/2
	}, time.Minute, 10*time.Millisecond)
	var queued []int
	for i := range samples {
		var n int
		f.Pool.QueryRow(context.Background(), `SELECT count(*) FROM operations WHERE status = 'pending'`).Scan(&n) //nolint:errcheck
		queued = append(queued, n)
		loaded = append(loaded, coldB(fmt.Sprintf("loaded-%d", i)))
	}
	wg.Wait()
	b.ReportMetric(ms(pct(alone, 0.5)), "alone-p50-ms")
	b.ReportMetric(ms(pct(loaded, 0.5)), "loaded-p50-ms")
	b.ReportMetric(float64(pct(loaded, 0.5))/float64(pct(alone, 0.5)), "ratio")
	b.ReportMetric(float64(slices.Min(queued)), "a-queued-min")
	b.ReportMetric(float64(done.Load()), "a-admitted")
}
