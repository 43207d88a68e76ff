package workers

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	mrand "math/rand/v2"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"

	"github.com/enginefleet/orchestrator/schema"
)

// Liveness: a killed worker process must not hold its jobs (and their
// engines' leases) until River's stuck-job rescue, minutes later. Each
// worker process is a session: it holds a session-level advisory lock on a
// connection of its own, and every second it writes the ids of the jobs it
// is working (and those it finished in the last minute, which River may
// not have marked completed yet). Every worker process also runs the
// rescuer: a session whose lock is free and whose heartbeat is stale is
// dead, and its running jobs are re-queued at once, their engine leases
// released; a running job its live session does not list has been lost
// (its completion never reached the database) and is re-queued too.
// Re-queued attempts are fenced from the ones they replace by the engine
// lease, which names the attempt (schema.Lease).
const (
	heartbeatEvery = time.Second
	// staleAfter: a session with a free lock not seen for this long is dead.
	staleAfter = 2 * time.Second
	// orphanAfter: a running job its live session has not listed for this
	// long after the attempt began is lost.
	orphanAfter = 5 * time.Second
	// rescueEvery paces the rescuer; it only acts once its own session has
	// held the lock for stableFor, so that after a Postgres restart (every
	// lock dropped at once) the other sessions have had time to come back.
	rescueEvery = time.Second
	stableFor   = staleAfter + 2*heartbeatEvery
	// keepFinished: finished jobs stay listed this long.
	keepFinished = time.Minute
)

// session is this worker process in the liveness table.
type session struct {
	id   string // also the River client id, so river_job.attempted_by names it
	node string
	key  int32

	mu       sync.Mutex
	jobs     map[int64]time.Time // job id → when it finished (zero: still running)
	lockAt   time.Time           // when the lock was last taken; zero while not held
	releases map[leaseKey]bool   // leases whose release failed (database away): retried
}

// leaseKey is an engine lease to release.
type leaseKey struct {
	engineID string
	lease    schema.Lease
}

func newSession(node string) *session {
	b := make([]byte, 6)
	rand.Read(b) //nolint:errcheck
	s := &session{id: "worker-" + node + "-" + hex.EncodeToString(b), node: node, jobs: map[int64]time.Time{},
		releases: map[leaseKey]bool{}}
	s.key = randKey()
	return s
}

func randKey() int32 {
	var b [4]byte
	rand.Read(b[:])                                            //nolint:errcheck
	return int32(binary.BigEndian.Uint32(b[:])&0x7fffffff) | 1 // positive: pg_locks shows it as an oid
}

func (s *session) started(id int64) {
	s.mu.Lock()
	s.jobs[id] = time.Time{}
	s.mu.Unlock()
}

func (s *session) finished(id int64) {
	s.mu.Lock()
	s.jobs[id] = time.Now()
	s.mu.Unlock()
}

// listed returns the job ids to publish, forgetting those finished long ago.
func (s *session) listed() []int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	ids := make([]int64, 0, len(s.jobs))
	for id, done := range s.jobs {
		if !done.IsZero() && time.Since(done) > keepFinished {
			delete(s.jobs, id)
			continue
		}
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

func (s *session) setLocked(ok bool) {
	s.mu.Lock()
	if ok {
		s.lockAt = time.Now()
	} else {
		s.lockAt = time.Time{}
	}
	s.mu.Unlock()
}

// stable reports whether the session has held its lock for stableFor.
func (s *session) stable() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.lockAt.IsZero() && time.Since(s.lockAt) >= stableFor
}

// retryReleases retries the releases that failed.
func (w *Workers) retryReleases(ctx context.Context, q *schema.Queries) {
	w.session.mu.Lock()
	pending := make([]leaseKey, 0, len(w.session.releases))
	for k := range w.session.releases {
		pending = append(pending, k)
	}
	w.session.mu.Unlock()
	for _, k := range pending {
		if q.ReleaseLease(ctx, k.engineID, k.lease) == nil {
			w.session.mu.Lock()
			delete(w.session.releases, k)
			w.session.mu.Unlock()
		}
	}
}

// SessionID is this worker process's liveness session (and River client) id.
func (w *Workers) SessionID() string { return w.session.id }

// RunLiveness holds this process's session, rescues the jobs of dead
// workers and ends abandoned operations, until ctx ends; then it deletes
// the session (a clean exit). Start it with the River client and stop it
// after River has stopped: while it runs, this process counts as alive.
func (w *Workers) RunLiveness(ctx context.Context, rc *river.Client[pgx.Tx]) {
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); w.holdSession(ctx) }()
	go func() { defer wg.Done(); w.rescueLoop(ctx) }()
	go func() { defer wg.Done(); w.Reconcile.sweepOperationsLoop(ctx, rc) }()
	wg.Wait()
	dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := schema.New(w.pool).DeleteWorkerSession(dctx, w.session.id); err != nil {
		w.log.Warn("delete worker session", "session", w.session.id, "error", err)
	}
}

// holdSession keeps the session's lock and heartbeat, reconnecting with a
// backoff when its connection breaks.
func (w *Workers) holdSession(ctx context.Context) {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := w.holdOnce(ctx)
		w.session.setLocked(false)
		if ctx.Err() != nil {
			return
		}
		w.log.Warn("worker session lost its connection; reconnecting", "session", w.session.id, "error", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 2*time.Second)
	}
}

func (w *Workers) holdOnce(ctx context.Context) error {
	pc, err := w.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	// The connection carries the lock: never hand it back to the pool.
	conn := pc.Hijack()
	defer conn.Close(context.Background()) //nolint:errcheck
	q := schema.New(conn)
	for {
		got, err := q.LockWorkerSession(ctx, w.session.key)
		if err != nil {
			return err
		}
		if got {
			break
		}
		w.session.key = randKey() // another session drew the same key
	}
	hostname, _ := os.Hostname()
	rec := schema.WorkerSession{ID: w.session.id, Node: w.session.node, LockKey: w.session.key, Hostname: hostname, PID: os.Getpid()}
	if err := q.UpsertWorkerSession(ctx, rec); err != nil {
		return err
	}
	w.session.setLocked(true)
	t := time.NewTicker(heartbeatEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		hctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		found, err := q.HeartbeatWorkerSession(hctx, w.session.id, w.session.listed())
		if err == nil && !found {
			err = q.UpsertWorkerSession(hctx, rec)
		}
		if err == nil {
			w.retryReleases(hctx, q)
		}
		cancel()
		if err != nil {
			return err
		}
	}
}

// rescueLoop re-queues the jobs of dead (or job-losing) sessions.
func (w *Workers) rescueLoop(ctx context.Context) {
	prune := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(rescueEvery + time.Duration(mrand.Int64N(int64(rescueEvery/4)))):
		}
		if !w.session.stable() {
			continue
		}
		q := schema.New(w.pool)
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		rescued, err := q.RescueLostJobs(rctx, staleAfter, orphanAfter)
		if err == nil && time.Since(prune) > time.Minute {
			prune = time.Now()
			_, err = q.PruneWorkerSessions(rctx, time.Hour)
		}
		cancel()
		if err != nil {
			if ctx.Err() == nil {
				w.log.Warn("rescue lost jobs", "error", err)
			}
			continue
		}
		for _, j := range rescued {
			w.log.Warn("job rescued from a lost worker", "job_id", j.ID, "job_kind", j.Kind, "worker_session", j.Session,
				"worker_dead", j.Dead, "next_state", j.State)
		}
		w.cfg.Metrics.JobsRescued(len(rescued))
	}
}
