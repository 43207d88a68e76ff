package orchestrator

import (
	"fmt"
	"time"
)

// RolloutStatus is where a fleet rollout stands.
type RolloutStatus string

// Rollout statuses. running, paused and rolling_back are active: the
// rollout owns its engines and its driver job works it.
const (
	RolloutRunning     RolloutStatus = "running"
	RolloutPaused      RolloutStatus = "paused"
	RolloutRollingBack RolloutStatus = "rolling_back"
	RolloutCompleted   RolloutStatus = "completed"
	RolloutRolledBack  RolloutStatus = "rolled_back"
	RolloutAborted     RolloutStatus = "aborted"
)

// Active reports whether the rollout is still being worked.
func (s RolloutStatus) Active() bool {
	return s == RolloutRunning || s == RolloutPaused || s == RolloutRollingBack
}

// RolloutEngineStatus is where one engine of a rollout stands (see the
// rollout_engines migration for each word).
type RolloutEngineStatus string

// Rollout engine statuses.
const (
	REPending        RolloutEngineStatus = "pending"
	REUpgrading      RolloutEngineStatus = "upgrading"
	REUpgraded       RolloutEngineStatus = "upgraded"
	RELazy           RolloutEngineStatus = "lazy"
	REFailed         RolloutEngineStatus = "failed"
	RESkipped        RolloutEngineStatus = "skipped"
	RERollingBack    RolloutEngineStatus = "rolling_back"
	RERolledBack     RolloutEngineStatus = "rolled_back"
	RERollbackLazy   RolloutEngineStatus = "rollback_lazy"
	RERollbackFailed RolloutEngineStatus = "rollback_failed"
	RECancelled      RolloutEngineStatus = "cancelled"
)

// RolloutEngineStatuses lists every engine status, in the order a rollout
// moves through them.
var RolloutEngineStatuses = []RolloutEngineStatus{REPending, REUpgrading, REUpgraded, RELazy, REFailed, RESkipped,
	RERollingBack, RERolledBack, RERollbackLazy, RERollbackFailed, RECancelled}

// Rollout is a fleet rollout as recorded.
type Rollout struct {
	ID            string
	ProductID     string // "" = every product
	Image         string
	Status        RolloutStatus
	Waves         []int // engines per wave
	Bake          time.Duration
	FailureBudget int
	MaxConcurrent int
	InUse         time.Duration // an engine active this recently is in use (0 = never)
	CurrentWave   int
	WaveStartedAt *time.Time
	WaveDoneAt    *time.Time
	StopReason    string
	Actor         string
	CreatedAt     time.Time
	UpdatedAt     time.Time
	FinishedAt    *time.Time
}

// WaveStep is one wave as asked for: a cumulative percentage of the
// rollout's engines reached by the end of the wave, or a number of engines
// in the wave itself.
type WaveStep struct {
	Percent float64
	Count   int
}

// ResolveWaves turns wave steps into engines per wave for total engines.
// Percentages are cumulative (1, 10, 50, 100: a 1 % canary, then up to
// 10 %, …), rounded up so a canary of a small fleet still has one engine;
// counts are the wave's own size. Engines left after the last step make a
// last wave, so a rollout always covers everything it was asked to. Empty
// waves are dropped. Errors: INVALID_REQUEST.
func ResolveWaves(steps []WaveStep, total int) ([]int, error) {
	if len(steps) == 0 {
		steps = []WaveStep{{Percent: 100}}
	}
	if len(steps) > 100 {
		return nil, Errorf(CodeInvalidRequest, "at most 100 waves")
	}
	var out []int
	reached := 0
	for i, s := range steps {
		switch {
		case s.Percent != 0 && s.Count != 0:
			return nil, Errorf(CodeInvalidRequest, "wave %d: give percent or count, not both", i+1)
		case s.Percent < 0 || s.Percent > 100:
			return nil, Errorf(CodeInvalidRequest, "wave %d: percent must be in (0, 100]", i+1)
		case s.Count < 0:
			return nil, Errorf(CodeInvalidRequest, "wave %d: count must be positive", i+1)
		case s.Percent == 0 && s.Count == 0:
			return nil, Errorf(CodeInvalidRequest, "wave %d: give percent or count", i+1)
		}
		target := reached + s.Count
		if s.Percent > 0 {
			target = ceilPercent(s.Percent, total)
		}
		target = min(target, total)
		if target > reached {
			out = append(out, target-reached)
			reached = target
		}
	}
	if reached < total {
		out = append(out, total-reached)
	}
	return out, nil
}

// ceilPercent is ⌈p % of n⌉, exact for the percentages people write.
func ceilPercent(p float64, n int) int {
	v := p * float64(n) / 100
	c := int(v)
	if float64(c) < v-1e-9 {
		c++
	}
	return c
}

// Validate checks a rollout's settings (INVALID_REQUEST).
func (r Rollout) Validate() error {
	switch {
	case r.Image == "":
		return Errorf(CodeInvalidRequest, "image is required")
	case r.Bake < 0 || r.Bake > 7*24*time.Hour:
		return Errorf(CodeInvalidRequest, "bake_seconds must be between 0 and one week")
	case r.FailureBudget < 0:
		return Errorf(CodeInvalidRequest, "failure_budget must not be negative")
	case r.MaxConcurrent < 1 || r.MaxConcurrent > 1000:
		return Errorf(CodeInvalidRequest, "max_concurrent must be between 1 and 1000")
	case r.InUse < 0 || r.InUse > 24*time.Hour:
		return Errorf(CodeInvalidRequest, "in_use_seconds must be between 0 and one day")
	}
	return nil
}

// RolloutWaveName names wave i (0-based) for people: "wave 1 of 4".
func RolloutWaveName(i, n int) string { return fmt.Sprintf("wave %d of %d", i+1, n) }
