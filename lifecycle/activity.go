package lifecycle

import (
	"context"
	"sync"
	"time"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/generations"
	"github.com/enginefleet/orchestrator/schema"
)

// activity throttles admit's activity writes to one per engine per
// minute. Bounded without scans: engines are spread over shards by hash,
// each with its own lock and two generations of "last written" times; a
// shard starts a new generation every activityEvery, so a generation
// dropped whole only holds times at least that old, whose engines are due
// anyway. A shard holds at most 2×activityShardSize engines; past that it
// rotates early, at the cost of an extra write for some engine, never of a
// lost one.
type activity struct {
	shards [activityShards]activityShard
}

type activityShard struct {
	mu      sync.Mutex
	ready   bool
	last    generations.Map[string, time.Time]
	rotated time.Time
}

const (
	activityEvery     = time.Minute
	activityShards    = 16
	activityShardSize = 4096
)

func (a *activity) due(engineID string, now time.Time) bool {
	h := uint32(2166136261) // FNV-1a: engine ids are ours (UUIDs), not a client's
	for i := 0; i < len(engineID); i++ {
		h = (h ^ uint32(engineID[i])) * 16777619
	}
	sh := &a.shards[h%activityShards]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if !sh.ready {
		sh.last, sh.ready = generations.New[string, time.Time](activityShardSize), true
	}
	if now.Sub(sh.rotated) >= activityEvery {
		sh.last.Rotate()
		sh.rotated = now
	}
	if t, ok := sh.last.Get(engineID); ok && now.Sub(t) < activityEvery {
		return false
	}
	sh.last.Put(engineID, now)
	return true
}

// touch records activity for idle detection, at most once a minute per
// engine, off the request's path.
func (c *Core) touch(e orch.Engine) {
	now := time.Now()
	if e.LastActiveAt != nil && now.Sub(*e.LastActiveAt) < activityEvery {
		return
	}
	if !c.activity.due(e.ID, now) {
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := schema.New(c.pool).TouchActivity(ctx, e.ID); err != nil {
			c.log.Warn("record activity", "engine_id", e.ID, "error", err)
		}
	}()
}
