package schema_test

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/schema"
)

// engineRow inserts a product and one engine; returns the engine id.
func engineRow(t *testing.T, q *schema.Queries) string {
	t.Helper()
	ctx := context.Background()
	p, err := q.InsertProduct(ctx, "p-"+uuid.NewString()[:8], "P", orch.Policy{}, uuid.NewString())
	require.NoError(t, err)
	id := uuid.NewString()
	require.NoError(t, q.InsertEngine(ctx, orch.Engine{ID: id, ProductID: p.ID, UserID: "u", Status: orch.StateRunning,
		Node: "n", Port: 9001, EngineVersion: "img", KeyHash: "h", KeyEnc: "e"}))
	return id
}

// The engine lease names the attempt: a retry of the same job waits for the
// attempt before it (fencing), and an attempt whose lease was taken over
// can no longer tell itself it holds it.
func TestLeaseFencesAttempts(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := testenv.Pool(t, testenv.DB(t))
	q := schema.New(pool)
	id := engineRow(t, q)
	until := time.Now().Add(time.Minute)

	first := schema.Lease{Job: 7, Attempt: 1, Owner: "w1"}
	retry := schema.Lease{Job: 7, Attempt: 2, Owner: "w2"}
	got, err := q.AcquireLease(ctx, id, first, until)
	require.NoError(t, err)
	require.True(t, got)
	got, err = q.AcquireLease(ctx, id, first, until)
	require.NoError(t, err)
	require.True(t, got, "the holder itself may take it again")
	got, err = q.AcquireLease(ctx, id, retry, until)
	require.NoError(t, err)
	require.False(t, got, "a retry of the same job does not overlap the attempt it replaces")
	got, err = q.AcquireLease(ctx, id, schema.Lease{Job: 7, Attempt: 1, Owner: "w9"}, until)
	require.NoError(t, err)
	require.False(t, got, "same job and attempt in another process is another holder")

	// The first attempt is presumed dead: its lease is cleared (as the
	// rescuer does) and the retry takes over.
	_, err = pool.Exec(ctx, `UPDATE engines SET lease_job_id = NULL, lease_attempt = NULL, lease_owner = NULL WHERE id = $1`, id)
	require.NoError(t, err)
	got, err = q.AcquireLease(ctx, id, retry, until)
	require.NoError(t, err)
	require.True(t, got)
	_, holds, err := q.LockLeasedEngine(ctx, id, first)
	require.NoError(t, err)
	require.False(t, holds, "the old attempt's commit is fenced")
	require.NoError(t, q.ReleaseLease(ctx, id, first))
	e, holds, err := q.LockLeasedEngine(ctx, id, retry)
	require.NoError(t, err)
	require.True(t, holds, "releasing someone else's lease is a no-op")
	require.Equal(t, id, e.ID)

	// An expired lease is free for anyone.
	require.NoError(t, q.ReleaseLease(ctx, id, retry))
	got, err = q.AcquireLease(ctx, id, first, time.Now().Add(-time.Second))
	require.NoError(t, err)
	require.True(t, got)
	got, err = q.AcquireLease(ctx, id, retry, until)
	require.NoError(t, err)
	require.True(t, got)
}

// insertRunningJob puts a River job in the running state, attempted by
// session, started `ago`.
func insertRunningJob(t *testing.T, pool interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, session string, ago time.Duration) int64 {
	t.Helper()
	var id int64
	require.NoError(t, pool.QueryRow(context.Background(), `INSERT INTO river_job (args, kind, max_attempts, queue, state,
		attempt, attempted_at, attempted_by, scheduled_at)
		VALUES ('{}', 'test_kind', 5, 'default', 'running', 1, now() - make_interval(secs => $2), ARRAY[$1], now())
		RETURNING id`, session, ago.Seconds()).Scan(&id))
	return id
}

// RescueLostJobs re-queues the running jobs of a dead session (lock free,
// heartbeat stale) and the jobs a live session lost, releases their engine
// leases, and leaves alone live sessions' jobs and sessions it cannot judge.
func TestRescueLostJobs(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := testenv.Pool(t, testenv.DB(t))
	q := schema.New(pool)
	eid := engineRow(t, q)

	// A live session: lock held on a dedicated connection, fresh heartbeat.
	conn, err := pool.Acquire(ctx)
	require.NoError(t, err)
	defer conn.Release()
	lq := schema.New(conn)
	got, err := lq.LockWorkerSession(ctx, 4242)
	require.NoError(t, err)
	require.True(t, got)
	require.NoError(t, lq.UpsertWorkerSession(ctx, schema.WorkerSession{ID: "live", Node: "n", LockKey: 4242}))
	// A dead session: no lock, seen 10 s ago.
	require.NoError(t, q.UpsertWorkerSession(ctx, schema.WorkerSession{ID: "dead", Node: "n", LockKey: 4343}))
	_, err = pool.Exec(ctx, `UPDATE worker_sessions SET seen_at = now() - interval '10 seconds' WHERE id = 'dead'`)
	require.NoError(t, err)
	// A session whose lock dropped a moment ago (a Postgres blip): not yet dead.
	require.NoError(t, q.UpsertWorkerSession(ctx, schema.WorkerSession{ID: "blip", Node: "n", LockKey: 4444}))

	liveJob := insertRunningJob(t, pool, "live", time.Minute)
	lostJob := insertRunningJob(t, pool, "live", time.Minute)
	deadJob := insertRunningJob(t, pool, "dead", time.Second)
	blipJob := insertRunningJob(t, pool, "blip", time.Second)
	unknownJob := insertRunningJob(t, pool, "no-such-session", time.Minute)
	found, err := lq.HeartbeatWorkerSession(ctx, "live", []int64{liveJob})
	require.NoError(t, err)
	require.True(t, found)
	got, err = q.AcquireLease(ctx, eid, schema.Lease{Job: deadJob, Attempt: 1, Owner: "dead"}, time.Now().Add(time.Hour))
	require.NoError(t, err)
	require.True(t, got)

	rescued, err := q.RescueLostJobs(ctx, 2*time.Second, 5*time.Second)
	require.NoError(t, err)
	ids := map[int64]schema.RescuedJob{}
	for _, j := range rescued {
		ids[j.ID] = j
	}
	require.Len(t, ids, 2, "%v", rescued)
	require.True(t, ids[deadJob].Dead)
	require.False(t, ids[lostJob].Dead)
	state := func(id int64) (string, int) {
		var s string
		var max int
		require.NoError(t, pool.QueryRow(ctx, `SELECT state::text, max_attempts FROM river_job WHERE id = $1`, id).Scan(&s, &max))
		return s, max
	}
	for _, id := range []int64{deadJob, lostJob} {
		s, max := state(id)
		require.Equal(t, "available", s)
		require.Equal(t, 6, max, "a rescue does not consume an attempt")
	}
	for _, id := range []int64{liveJob, blipJob, unknownJob} {
		s, _ := state(id)
		require.Equal(t, "running", s)
	}
	got, err = q.AcquireLease(ctx, eid, schema.Lease{Job: deadJob, Attempt: 2, Owner: "live"}, time.Now().Add(time.Hour))
	require.NoError(t, err)
	require.True(t, got, "the dead attempt's lease was released")

	// A job that keeps killing its workers ends discarded, not in a loop.
	_, err = pool.Exec(ctx, `UPDATE river_job SET state = 'running', attempted_by = ARRAY['dead'],
		metadata = jsonb_build_object('orch:rescues', 10) WHERE id = $1`, deadJob)
	require.NoError(t, err)
	_, err = q.RescueLostJobs(ctx, 2*time.Second, 5*time.Second)
	require.NoError(t, err)
	s, _ := state(deadJob)
	require.Equal(t, "discarded", s)

	n, err := q.PruneWorkerSessions(ctx, 5*time.Second)
	require.NoError(t, err)
	require.EqualValues(t, 1, n, "only the long-dead session is pruned")
}
