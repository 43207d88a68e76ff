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

// liveness holds this process's session and rescues the jobs of dead
// worker processes (see the top of this file).
type liveness struct{ *runner }

// run holds the session and rescues lost jobs until ctx ends.
func (l *liveness) run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); l.holdSession(ctx) }()
	go func() { defer wg.Done(); l.rescueLoop(ctx) }()
	wg.Wait()
}

// end deletes the session: a clean exit.
func (l *liveness) end() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := schema.New(l.pool).DeleteWorkerSession(ctx, l.session.id); err != nil {
		l.log.Warn("delete worker session", "session", l.session.id, "error", err)
	}
}

// holdSession keeps the session's lock and heartbeat, reconnecting with a
// backoff when its connection breaks.
func (l *liveness) holdSession(ctx context.Context) {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := l.holdOnce(ctx)
		l.session.setLocked(false)
		if ctx.Err() != nil {
			return
		}
		l.log.Warn("worker session lost its connection; reconnecting", "session", l.session.id, "error", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 2*time.Second)
	}
}

func (l *liveness) holdOnce(ctx context.Context) error {
	pc, err := l.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	// The connection carries the lock: never hand it back to the pool.
	conn := pc.Hijack()
	defer conn.Close(context.Background()) //nolint:errcheck
	q := schema.New(conn)
	for {
		got, err := q.LockWorkerSession(ctx, l.session.key)
		if err != nil {
			return err
		}
		if got {
			break
		}
		l.session.key = randKey() // another session drew the same key
	}
	hostname, _ := os.Hostname()
	rec := schema.WorkerSession{ID: l.session.id, Node: l.session.node, LockKey: l.session.key, Hostname: hostname, PID: os.Getpid()}
	if err := q.UpsertWorkerSession(ctx, rec); err != nil {
		return err
	}
	l.session.setLocked(true)
	t := time.NewTicker(heartbeatEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		hctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		found, err := q.HeartbeatWorkerSession(hctx, l.session.id, l.session.listed())
		if err == nil && !found {
			err = q.UpsertWorkerSession(hctx, rec)
		}
		if err == nil {
			l.retryReleases(hctx, q)
		}
		cancel()
		if err != nil {
			return err
		}
	}
}

// rescueLoop re-queues the jobs of dead (or job-losing) sessions.
func (l *liveness) rescueLoop(ctx context.Context) {
	prune := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(rescueEvery + time.Duration(mrand.Int64N(int64(rescueEvery/4)))):
		}
		if !l.session.stable() {
			continue
		}
		q := schema.New(l.pool)
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		rescued, err := q.RescueLostJobs(rctx, staleAfter, orphanAfter)
		if err == nil && time.Since(prune) > time.Minute {
			prune = time.Now()
			_, err = q.PruneWorkerSessions(rctx, time.Hour)
		}
		cancel()
		if err != nil {
			if ctx.Err() == nil {
				l.log.Warn("rescue lost jobs", "error", err)
			}
			continue
		}
		for _, j := range rescued {
			l.log.Warn("job rescued from a lost worker", "job_id", j.ID, "job_kind", j.Kind, "worker_session", j.Session,
				"worker_dead", j.Dead, "next_state", j.State)
		}
		l.metrics.JobsRescued(len(rescued))
	}
}

// retryReleases retries the releases that failed.
func (l *liveness) retryReleases(ctx context.Context, q *schema.Queries) {
	l.session.mu.Lock()
	pending := make([]leaseKey, 0, len(l.session.releases))
	for k := range l.session.releases {
		pending = append(pending, k)
	}
	l.session.mu.Unlock()
	for _, k := range pending {
		if q.ReleaseLease(ctx, k.engineID, k.lease) == nil {
			l.session.mu.Lock()
			delete(l.session.releases, k)
			l.session.mu.Unlock()
		}
	}
}
