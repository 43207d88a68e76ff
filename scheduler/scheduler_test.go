package scheduler_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/jobs"
	"github.com/enginefleet/orchestrator/scheduler"
)

type tickArgs struct {
	Tick time.Time `json:"tick"`
}

func (tickArgs) Kind() string { return "test_tick" }

func tickSchedule() scheduler.Schedule {
	return scheduler.Every("test_tick", time.Second, func(t time.Time) river.JobArgs { return tickArgs{Tick: t} })
}

// replica is one scheduler process: its own pool, River client and elector.
type replica struct {
	s    *scheduler.Scheduler
	stop context.CancelFunc
	done chan struct{}
}

func startReplica(t *testing.T, dbURL, name string, key int64) *replica {
	t.Helper()
	pool := testenv.Pool(t, dbURL)
	rc, err := river.NewClient(riverpgxv5.New(pool), &river.Config{Logger: testenv.Quiet()})
	require.NoError(t, err)
	s, err := scheduler.New(scheduler.Config{Instance: name, Poll: 200 * time.Millisecond, LockKey: key}, pool, rc,
		testenv.Quiet(), tickSchedule())
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	r := &replica{s: s, stop: cancel, done: make(chan struct{})}
	go func() { defer close(r.done); s.Run(ctx) }() //nolint:errcheck
	t.Cleanup(func() { r.stop(); <-r.done })
	return r
}

// ticks returns the enqueued test ticks, oldest first, and how many job
// rows there are (more rows than distinct ticks = a doubled tick).
func ticks(t *testing.T, pool *pgxpool.Pool) ([]time.Time, int) {
	t.Helper()
	ctx := context.Background()
	rows, err := pool.Query(ctx, `SELECT DISTINCT (args->>'tick')::timestamptz AS t FROM river_job WHERE kind = 'test_tick' ORDER BY t`)
	require.NoError(t, err)
	ts, err := pgx.CollectRows(rows, pgx.RowTo[time.Time])
	require.NoError(t, err)
	var n int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM river_job WHERE kind = 'test_tick'`).Scan(&n))
	return ts, n
}

// waitTicks waits until at least n ticks are enqueued.
func waitTicks(t *testing.T, pool *pgxpool.Pool, n int) {
	t.Helper()
	testenv.Await(t, time.Duration(n+5)*time.Second, fmt.Sprintf("%d ticks enqueued", n), func() error {
		ts, _ := ticks(t, pool)
		return testenv.Check(len(ts) >= n, "%d ticks", len(ts))
	})
}

// requireContiguous checks one job per second, none missing, none doubled.
func requireContiguous(t *testing.T, ts []time.Time, rows int) {
	t.Helper()
	require.Equal(t, len(ts), rows, "a tick was enqueued twice")
	for i := 1; i < len(ts); i++ {
		require.Equal(t, time.Second, ts[i].Sub(ts[i-1]), "tick lost between %s and %s", ts[i-1], ts[i])
	}
}

// Two replicas on one database: one leads and fires each tick once; when
// the leader's connection is killed the other leads within 5 s, and
// across the hand-over no tick is lost or doubled.
func TestTwoReplicasHandOver(t *testing.T) {
	t.Parallel()
	dbURL := testenv.DB(t)
	pool := testenv.Pool(t, dbURL)
	a := startReplica(t, dbURL, "a-"+t.Name(), 0)
	b := startReplica(t, dbURL, "b-"+t.Name(), 0)

	require.Eventually(t, func() bool { return a.s.Leader() != b.s.Leader() }, 5*time.Second, 50*time.Millisecond)
	waitTicks(t, pool, 3)
	require.True(t, a.s.Leader() != b.s.Leader(), "exactly one leader")
	leader, follower := a, b
	if b.s.Leader() {
		leader, follower = b, a
	}
	before, rows := ticks(t, pool)
	require.GreaterOrEqual(t, len(before), 3)
	requireContiguous(t, before, rows)

	// Kill the leader's elector connection (its session and lock end).
	killed := time.Now()
	var n int
	require.NoError(t, pool.QueryRow(context.Background(), `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
		WHERE application_name = $1`, "orchestrator-scheduler:"+leader.s.Instance()).Scan(&n))
	require.Equal(t, 1, n)
	require.Eventually(t, follower.s.Leader, 5*time.Second, 20*time.Millisecond, "the other replica leads within 5 s")
	handover := time.Since(killed)
	require.Eventually(t, func() bool { return !leader.s.Leader() }, 2*time.Second, 20*time.Millisecond)
	t.Logf("hand-over took %s", handover)

	waitTicks(t, pool, len(before)+3) // ticks keep coming after the hand-over
	require.True(t, follower.s.Leader())
	require.False(t, leader.s.Leader(), "the old leader reconnected as a follower")
	after, rows := ticks(t, pool)
	requireContiguous(t, after, rows)
	require.GreaterOrEqual(t, len(after), len(before)+3, "ticks kept coming after the hand-over")
	// The last tick is recent: the new leader keeps firing.
	require.WithinDuration(t, time.Now(), after[len(after)-1], 3*time.Second)
}

// Two replicas that both believe they lead (different lock keys) still
// enqueue each tick once: the jobs are unique per period.
func TestTwoLeadersDoNotDoubleWork(t *testing.T) {
	t.Parallel()
	dbURL := testenv.DB(t)
	pool := testenv.Pool(t, dbURL)
	a := startReplica(t, dbURL, "a-"+t.Name(), 1)
	b := startReplica(t, dbURL, "b-"+t.Name(), 2)
	require.Eventually(t, func() bool { return a.s.Leader() && b.s.Leader() }, 5*time.Second, 50*time.Millisecond)
	waitTicks(t, pool, 4) // both leaders had three periods to double a tick
	ts, rows := ticks(t, pool)
	require.GreaterOrEqual(t, len(ts), 3)
	requireContiguous(t, ts, rows)
}

// A new leader replays the ticks missed while no replica ran (up to
// CatchUp), with the right ticks.
func TestCatchUpAfterDowntime(t *testing.T) {
	t.Parallel()
	dbURL := testenv.DB(t)
	pool := testenv.Pool(t, dbURL)
	a := startReplica(t, dbURL, "a-"+t.Name(), 0)
	require.Eventually(t, a.s.Leader, 5*time.Second, 20*time.Millisecond)
	waitTicks(t, pool, 2)
	a.stop()
	<-a.done
	// Downtime is what is tested: two periods or so with no scheduler.
	time.Sleep(2200 * time.Millisecond)
	b := startReplica(t, dbURL, "b-"+t.Name(), 0)
	require.Eventually(t, b.s.Leader, 5*time.Second, 20*time.Millisecond)
	// The new leader replays the missed ticks when elected, before its
	// first own tick: once that one is in, the replay is too.
	led := time.Now().Truncate(time.Second)
	testenv.Await(t, 5*time.Second, "a tick fired by the new leader", func() error {
		ts, _ := ticks(t, pool)
		return testenv.Check(len(ts) > 0 && !ts[len(ts)-1].Before(led), "last tick %v, elected at %v", ts, led)
	})
	ts, rows := ticks(t, pool)
	requireContiguous(t, ts, rows)
	require.WithinDuration(t, time.Now(), ts[len(ts)-1], 3*time.Second)
}

func TestFleetSchedules(t *testing.T) {
	t.Parallel()
	names := func(ss []scheduler.Schedule) []string {
		var out []string
		for _, s := range ss {
			out = append(out, s.Name)
		}
		return out
	}
	require.Equal(t, []string{"health_sweep", "reconcile"}, names(scheduler.Fleet(scheduler.FleetConfig{})))
	ss := scheduler.Fleet(scheduler.FleetConfig{Nodes: []string{"a", "b"}, HealthInterval: 7 * time.Second, IdleAfter: time.Hour})
	require.Equal(t, []string{"health_sweep", "reconcile", "idle_sweep"}, names(ss))
	require.Equal(t, 7*time.Second, ss[0].Every)
	tick := time.Date(2026, 1, 1, 0, 0, 7, 0, time.UTC)
	require.Equal(t, []river.JobArgs{jobs.HealthSweep{Tick: tick}}, ss[0].Jobs(tick))
	require.Equal(t, []river.JobArgs{jobs.Reconcile{Node: "a"}, jobs.Reconcile{Node: "b"}}, ss[1].Jobs(tick))
	require.Equal(t, time.Minute, ss[2].Every)
}

func TestNewRejectsBadSchedules(t *testing.T) {
	t.Parallel()
	job := func(time.Time) river.JobArgs { return tickArgs{} }
	for name, s := range map[string][]scheduler.Schedule{
		"duplicate":  {scheduler.Every("x", time.Second, job), scheduler.Every("x", time.Second, job)},
		"sub-second": {scheduler.Every("x", 100*time.Millisecond, job)},
		"bad cron":   {scheduler.Cron("x", "every day", job)},
		"neither":    {{Name: "x", Jobs: func(time.Time) []river.JobArgs { return nil }}},
	} {
		_, err := scheduler.New(scheduler.Config{}, nil, nil, testenv.Quiet(), s...)
		require.Error(t, err, name)
	}
}

// A leader stalled for a few periods (here: its insert blocked by a lock
// on the tick table) fires the periods it slept through when it resumes:
// no tick is lost.
func TestStalledLeaderLosesNoTick(t *testing.T) {
	t.Parallel()
	dbURL := testenv.DB(t)
	pool := testenv.Pool(t, dbURL)
	a := startReplica(t, dbURL, "a-"+t.Name(), 0)
	require.Eventually(t, a.s.Leader, 5*time.Second, 20*time.Millisecond)
	waitTicks(t, pool, 1)

	ctx := context.Background()
	tx, err := pool.Begin(ctx)
	require.NoError(t, err)
	_, err = tx.Exec(ctx, `LOCK TABLE scheduler_ticks IN EXCLUSIVE MODE`)
	require.NoError(t, err)
	// The stall is what is tested: about two periods without a tick recorded.
	time.Sleep(2500 * time.Millisecond)
	require.NoError(t, tx.Rollback(ctx))
	resumed := time.Now().Truncate(time.Second)
	// The slept-through periods are fired before the current one.
	testenv.Await(t, 10*time.Second, "five ticks, one after the stall", func() error {
		ts, _ := ticks(t, pool)
		return testenv.Check(len(ts) >= 5 && !ts[len(ts)-1].Before(resumed), "ticks %v, resumed at %v", ts, resumed)
	})

	ts, rows := ticks(t, pool)
	require.GreaterOrEqual(t, len(ts), 5)
	requireContiguous(t, ts, rows)
}
