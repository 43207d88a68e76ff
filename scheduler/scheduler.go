// Package scheduler is the orchestrator's scheduler role: gocron runs the
// schedules on every scheduler replica, and an Elector (a Postgres session
// advisory lock on a dedicated connection) lets exactly one replica fire.
// A tick only enqueues River jobs, unique per period (River UniqueOpts
// ByArgs + ByPeriod, the tick itself in the args), so even two leaders at
// once never double the work. Every-schedules fire just after each
// multiple of their period (UTC), cron schedules on their expression
// (UTC). Each tick is recorded in scheduler_ticks; a newly elected leader
// replays the ticks missed since (up to Config.CatchUp per schedule), so a
// hand-over neither loses nor doubles a tick.
//
// Adding a schedule is one line in Fleet (fleet.go):
//
//	Cron("backup", c.BackupCron, func(t time.Time) river.JobArgs { return jobs.BackupAll{Tick: t} }),
package scheduler

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/go-co-op/gocron/v2"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"
	"github.com/robfig/cron/v3"

	"github.com/enginefleet/orchestrator/schema"
)

// Schedule is one recurring enqueue: either Every (fired at every multiple
// of it, UTC; at least 1 s) or Cron (five fields, UTC). Jobs returns the
// jobs of the tick that starts at tick.
type Schedule struct {
	Name  string // permanent: keys the tick bookkeeping
	Every time.Duration
	Cron  string
	Jobs  func(tick time.Time) []river.JobArgs

	cron cron.Schedule
}

// Every is a schedule firing one job at every multiple of every.
func Every(name string, every time.Duration, job func(tick time.Time) river.JobArgs) Schedule {
	return Schedule{Name: name, Every: every, Jobs: func(t time.Time) []river.JobArgs { return []river.JobArgs{job(t)} }}
}

// Cron is a schedule firing one job on a cron expression (UTC).
func Cron(name, expr string, job func(tick time.Time) river.JobArgs) Schedule {
	return Schedule{Name: name, Cron: expr, Jobs: func(t time.Time) []river.JobArgs { return []river.JobArgs{job(t)} }}
}

// period is the uniqueness period of the schedule's jobs; cron ticks are
// minutes.
func (s Schedule) period() time.Duration {
	if s.Every > 0 {
		return s.Every
	}
	return time.Minute
}

// tickOf is the start of the period t falls in.
func (s Schedule) tickOf(t time.Time) time.Time { return t.UTC().Truncate(s.period()) }

// Config tunes a scheduler replica. Zero values take the defaults.
type Config struct {
	Instance string        // this replica's name in logs and pg_stat_activity (hostname-pid-random)
	LockKey  int64         // the advisory lock the replicas compete for
	Poll     time.Duration // election and leader-liveness period (1 s)
	CatchUp  int           // missed ticks per schedule a new leader replays (3)
	Offset   time.Duration // how long after a period boundary Every-schedules fire (50 ms)
}

// DefaultLockKey is the advisory lock key of the scheduler role.
const DefaultLockKey int64 = 0x6f7263687363686c // "orchschl"

// Scheduler runs schedules on one replica; only the leader fires.
type Scheduler struct {
	cfg       Config
	pool      *pgxpool.Pool
	river     *river.Client[pgx.Tx]
	log       *slog.Logger
	schedules []Schedule
	elector   *Elector

	mu    sync.Mutex
	fired map[string]time.Time // the latest tick this replica enqueued, per schedule
}

// New validates the schedules and builds a replica. rc only inserts (it
// needs no workers); the elector connects with pool's configuration.
func New(cfg Config, pool *pgxpool.Pool, rc *river.Client[pgx.Tx], log *slog.Logger, schedules ...Schedule) (*Scheduler, error) {
	if cfg.Instance == "" {
		host, _ := os.Hostname()
		cfg.Instance = host + "-" + strconv.Itoa(os.Getpid()) + "-" + uuid.NewString()[:8]
	}
	if cfg.LockKey == 0 {
		cfg.LockKey = DefaultLockKey
	}
	if cfg.Poll <= 0 {
		cfg.Poll = time.Second
	}
	if cfg.CatchUp <= 0 {
		cfg.CatchUp = 3
	}
	if cfg.Offset <= 0 {
		cfg.Offset = 50 * time.Millisecond
	}
	seen := map[string]bool{}
	for i := range schedules {
		s := &schedules[i]
		switch {
		case s.Name == "" || seen[s.Name]:
			return nil, fmt.Errorf("schedule %q: names must be unique and non-empty", s.Name)
		case s.Jobs == nil:
			return nil, fmt.Errorf("schedule %q: no jobs", s.Name)
		case (s.Every > 0) == (s.Cron != ""):
			return nil, fmt.Errorf("schedule %q: set exactly one of Every and Cron", s.Name)
		case s.Every > 0 && s.Every < time.Second:
			return nil, fmt.Errorf("schedule %q: Every must be at least 1 s", s.Name)
		}
		if s.Cron != "" {
			c, err := cron.ParseStandard(s.Cron)
			if err != nil {
				return nil, fmt.Errorf("schedule %q: cron %q: %w", s.Name, s.Cron, err)
			}
			s.cron = c
		}
		seen[s.Name] = true
	}
	s := &Scheduler{cfg: cfg, pool: pool, river: rc, log: log, schedules: schedules}
	s.elector = NewElector(pool.Config().ConnConfig, cfg.LockKey, cfg.Instance, cfg.Poll, log)
	s.elector.onElected = s.catchUp
	return s, nil
}

// Leader reports whether this replica leads now.
func (s *Scheduler) Leader() bool { return s.elector.Leader() }

// Instance is this replica's name.
func (s *Scheduler) Instance() string { return s.cfg.Instance }

// Run fires the schedules (when leading) until ctx ends, then stops gocron
// and releases leadership.
func (s *Scheduler) Run(ctx context.Context) error {
	gs, err := gocron.NewScheduler(gocron.WithDistributedElector(s.elector), gocron.WithLocation(time.UTC),
		gocron.WithLogger(s.log))
	if err != nil {
		return fmt.Errorf("gocron: %w", err)
	}
	now := time.Now()
	for _, sch := range s.schedules {
		var def gocron.JobDefinition
		opts := []gocron.JobOption{gocron.WithName(sch.Name), gocron.WithContext(ctx),
			gocron.WithSingletonMode(gocron.LimitModeReschedule)}
		if sch.Every > 0 {
			def = gocron.DurationJob(sch.Every)
			first := sch.tickOf(now).Add(sch.Every).Add(s.cfg.Offset)
			opts = append(opts, gocron.WithStartAt(gocron.WithStartDateTime(first)))
		} else {
			def = gocron.CronJob(sch.Cron, false)
		}
		task := gocron.NewTask(func(ctx context.Context) {
			now := time.Now()
			tick := sch.tickOf(now)
			ticks := []time.Time{tick}
			if last, ok := s.lastFired(sch.Name); ok && sch.Every > 0 {
				// A run that starts late (a stalled process, a busy
				// database) must not skip the periods it slept through.
				if ticks = s.missed(sch, map[string]time.Time{sch.Name: last}, now); len(ticks) == 0 {
					return
				}
			}
			if err := s.fire(ctx, sch, ticks, tick); err != nil && ctx.Err() == nil {
				s.log.Warn("schedule tick", "schedule", sch.Name, "tick", tick, "error", err)
			}
		})
		if _, err := gs.NewJob(def, task, opts...); err != nil {
			return fmt.Errorf("schedule %q: %w", sch.Name, err)
		}
	}
	gs.Start()
	s.log.Info("scheduler started", "instance", s.cfg.Instance, "schedules", len(s.schedules))
	s.elector.Run(ctx) // until ctx ends; resigns
	if err := gs.Shutdown(); err != nil {
		s.log.Warn("gocron shutdown", "error", err)
	}
	s.log.Info("scheduler stopped", "instance", s.cfg.Instance)
	return nil
}

// catchUp runs when this replica becomes leader: each schedule's ticks
// missed since its last recorded tick are enqueued (at most CatchUp, the
// most recent), and an Every-schedule never fired before fires for the
// current period at once.
func (s *Scheduler) catchUp(ctx context.Context) {
	last, err := schema.New(s.pool).LastTicks(ctx)
	if err != nil {
		s.log.Warn("scheduler catch-up", "error", err)
		return
	}
	now := time.Now().UTC()
	for _, sch := range s.schedules {
		ticks := s.missed(sch, last, now)
		if len(ticks) == 0 {
			continue
		}
		if err := s.fire(ctx, sch, ticks, sch.tickOf(now)); err != nil {
			s.log.Warn("scheduler catch-up", "schedule", sch.Name, "error", err)
		}
	}
}

// missed lists the ticks of sch after its last recorded one, up to now.
func (s *Scheduler) missed(sch Schedule, last map[string]time.Time, now time.Time) []time.Time {
	l, ok := last[sch.Name]
	var ticks []time.Time
	switch {
	case sch.Every > 0 && !ok:
		return []time.Time{sch.tickOf(now)}
	case sch.Every > 0:
		cur := sch.tickOf(now)
		for t := cur; t.After(l) && len(ticks) < s.cfg.CatchUp; t = t.Add(-sch.Every) {
			ticks = append([]time.Time{t}, ticks...)
		}
	case ok:
		for t := sch.cron.Next(l.UTC()); !t.After(now); t = sch.cron.Next(t) {
			ticks = append(ticks, sch.tickOf(t))
			if len(ticks) > s.cfg.CatchUp {
				ticks = ticks[1:]
			}
		}
	}
	return ticks
}

// fire enqueues the jobs of ticks in one transaction and records the
// latest tick. Ticks before current are late: their jobs are scheduled at
// the tick, so their unique period is the tick's even now.
func (s *Scheduler) fire(ctx context.Context, sch Schedule, ticks []time.Time, current time.Time) error {
	var params []river.InsertManyParams
	for _, t := range ticks {
		for _, args := range sch.Jobs(t) {
			opts := &river.InsertOpts{UniqueOpts: river.UniqueOpts{ByArgs: true, ByPeriod: sch.period(),
				ByState: rivertype.UniqueOptsByStateDefault()}}
			if t.Before(current) {
				opts.ScheduledAt = t
			}
			params = append(params, river.InsertManyParams{Args: args, InsertOpts: opts})
		}
	}
	if len(params) == 0 {
		return nil
	}
	var inserted, skipped int
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		res, err := s.river.InsertManyTx(ctx, tx, params)
		if err != nil {
			return err
		}
		for _, r := range res {
			if r.UniqueSkippedAsDuplicate {
				skipped++
			} else {
				inserted++
			}
		}
		return schema.New(tx).RecordTick(ctx, sch.Name, ticks[len(ticks)-1], s.cfg.Instance)
	})
	if err != nil {
		return fmt.Errorf("enqueue %s: %w", sch.Name, err)
	}
	s.mu.Lock()
	if s.fired == nil {
		s.fired = map[string]time.Time{}
	}
	if t := ticks[len(ticks)-1]; t.After(s.fired[sch.Name]) {
		s.fired[sch.Name] = t
	}
	s.mu.Unlock()
	s.log.Debug("schedule tick", "schedule", sch.Name, "ticks", len(ticks), "inserted", inserted, "duplicates", skipped)
	return nil
}

func (s *Scheduler) lastFired(name string) (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.fired[name]
	return t, ok
}

// errNoSchedule is returned by Fire for an unknown schedule.
var errNoSchedule = errors.New("scheduler: no such schedule")

// Fire enqueues a schedule's job for the current period now, whether or
// not this replica leads (operators and tests; uniqueness still holds).
func (s *Scheduler) Fire(ctx context.Context, name string) error {
	for _, sch := range s.schedules {
		if sch.Name == name {
			t := sch.tickOf(time.Now())
			return s.fire(ctx, sch, []time.Time{t}, t)
		}
	}
	return errNoSchedule
}
