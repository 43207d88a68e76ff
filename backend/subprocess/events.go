package subprocess

import (
	"context"
	"os"
	"path/filepath"
	"time"

	"github.com/enginefleet/orchestrator"
)

// eventBuffer is each subscriber's channel capacity; events beyond it are
// dropped for that subscriber rather than blocking the backend.
const eventBuffer = 256

// pollInterval is how often engines this process did not start are
// checked for liveness while someone listens to Events.
const pollInterval = time.Second

// Events streams runtime events until ctx ends, then closes the channel:
// "start" (Start), "die" (a process exited, for whatever reason, with its
// exit code or -1 when unknown) and "stop" (Stop). Every subscriber gets
// every event; a subscriber that does not keep up loses events (it should
// reconcile, as after re-subscribing). Deaths of engines this process
// started are reported at once; those of engines adopted from a previous
// orchestrator process within about a second.
func (b *Backend) Events(ctx context.Context) (<-chan orchestrator.RuntimeEvent, error) {
	ch := make(chan orchestrator.RuntimeEvent, eventBuffer)
	b.hubMu.Lock()
	b.subs[ch] = struct{}{}
	if b.watchStop == nil {
		b.watchStop = make(chan struct{})
		go b.watch(b.watchStop)
	}
	b.hubMu.Unlock()
	go func() {
		<-ctx.Done()
		b.hubMu.Lock()
		delete(b.subs, ch)
		close(ch)
		if len(b.subs) == 0 && b.watchStop != nil {
			close(b.watchStop)
			b.watchStop = nil
		}
		b.hubMu.Unlock()
	}()
	return ch, nil
}

// emit fans an event out to every subscriber without blocking.
func (b *Backend) emit(id, kind string, code int, t time.Time) {
	ev := orchestrator.RuntimeEvent{EngineID: id, Kind: kind, ExitCode: code, Time: t}
	b.hubMu.Lock()
	defer b.hubMu.Unlock()
	for ch := range b.subs {
		select {
		case ch <- ev:
		default:
			b.log.Warn("runtime event dropped: slow subscriber", "engine_id", id, "kind", kind)
		}
	}
}

// watch polls the engines this process did not start (they are not its
// children, so no Wait reports their death) and emits "die" when one that
// was alive is gone.
func (b *Backend) watch(stop <-chan struct{}) {
	alive := make(map[string]pidRecord)
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		b.scanAdopted(alive)
		b.scans.Add(1)
		select {
		case <-stop:
			return
		case <-t.C:
		}
	}
}

func (b *Backend) scanAdopted(alive map[string]pidRecord) {
	ents, err := os.ReadDir(filepath.Join(b.root, enginesDir))
	if err != nil {
		b.log.Warn("watch engines", "error", err)
		return
	}
	seen := make(map[string]bool, len(ents))
	for _, e := range ents {
		id := e.Name()
		if !e.IsDir() || !validID(id) {
			continue
		}
		rec, ok, err := b.readPid(id)
		if err != nil || !ok {
			continue
		}
		seen[id] = true
		if b.childFor(id, rec) != nil {
			delete(alive, id) // the reaper reports it
			continue
		}
		if ok, _ := b.probe(rec); ok {
			alive[id] = rec
			continue
		}
		prev, was := alive[id]
		if !was || !prev.same(rec) {
			delete(alive, id) // dead before we looked: reconcile's business
			continue
		}
		if b.recordAdoptedDeath(id, rec) {
			delete(alive, id)
		}
	}
	for id := range alive {
		if !seen[id] {
			delete(alive, id) // stopped or removed
		}
	}
}

// recordAdoptedDeath records and announces the death of an adopted
// engine. It returns false when the engine is busy (an operation holds its
// lock), to be retried on the next tick.
func (b *Backend) recordAdoptedDeath(id string, rec pidRecord) bool {
	unlock, ok := b.locks.tryLock(id)
	if !ok {
		return false
	}
	defer unlock()
	cur, ok, err := b.readPid(id)
	if err != nil || !ok || !cur.same(rec) {
		return true // an operation moved it on and reported it
	}
	now := time.Now().UTC()
	code := -1
	if e, ok := b.readExit(id); ok && e.of(rec) {
		code = e.ExitCode // recorded by the process that reaped it
	} else if err := writeJSON(b.path(id, fileExit), exitRecord{
		PID: rec.PID, StartTicks: rec.StartTicks, ExitCode: -1, FinishedAt: now,
	}); err != nil {
		b.log.Warn("record engine exit", "engine_id", id, "error", err)
	}
	b.log.Info("adopted engine exited", "engine_id", id, "pid", rec.PID)
	b.emit(id, "die", code, now)
	return true
}
