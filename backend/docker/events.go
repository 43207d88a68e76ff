package docker

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/moby/moby/api/types/events"
	"github.com/moby/moby/client"

	orchestrator "github.com/enginefleet/orchestrator"
)

// eventActions are the container actions Events reports, by RuntimeEvent
// Kind.
var eventActions = []events.Action{events.ActionDie, events.ActionOOM, events.ActionStart, events.ActionStop}

// Events streams die, oom, start and stop events of this node's managed
// engine containers (filtered by label in the daemon), this fleet's or of
// no fleet, until ctx ends or the
// stream breaks; then the channel closes and the caller re-subscribes and
// reconciles (events in between are not replayed). It fails at once when
// the daemon cannot be reached.
func (b *Backend) Events(ctx context.Context) (<-chan orchestrator.RuntimeEvent, error) {
	if err := b.Ping(ctx); err != nil {
		return nil, fmt.Errorf("subscribe to events: %w", err)
	}
	f := b.managedFilters().Add("type", string(events.ContainerEventType))
	for _, a := range eventActions {
		f.Add("event", string(a))
	}
	sctx, cancel := context.WithCancel(ctx)
	res := b.cli.Events(sctx, client.EventsListOptions{Filters: f})
	out := make(chan orchestrator.RuntimeEvent, 64)
	go func() {
		defer close(out)
		defer cancel()
		for {
			select {
			case <-ctx.Done():
				return
			case err := <-res.Err:
				if err != nil && !errors.Is(err, context.Canceled) && ctx.Err() == nil {
					b.log.Warn("docker event stream ended", "error", err)
				}
				return
			case m := <-res.Messages:
				ev, ok := toRuntimeEvent(m)
				if mine, _ := b.ours(m.Actor.Attributes); !ok || !mine {
					continue
				}
				select {
				case out <- ev:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return out, nil
}

func toRuntimeEvent(m events.Message) (orchestrator.RuntimeEvent, bool) {
	if m.Type != events.ContainerEventType {
		return orchestrator.RuntimeEvent{}, false
	}
	attrs := m.Actor.Attributes
	id := attrs[orchestrator.LabelEngineID]
	if id == "" || attrs[LabelRole] == RoleHelper {
		return orchestrator.RuntimeEvent{}, false
	}
	ev := orchestrator.RuntimeEvent{EngineID: id, Kind: string(m.Action)}
	switch m.Action {
	case events.ActionDie, events.ActionOOM, events.ActionStart, events.ActionStop:
	default:
		return orchestrator.RuntimeEvent{}, false
	}
	if code, ok := attrs["exitCode"]; ok {
		ev.ExitCode, _ = strconv.Atoi(code)
	}
	switch {
	case m.TimeNano != 0:
		ev.Time = time.Unix(0, m.TimeNano)
	case m.Time != 0:
		ev.Time = time.Unix(m.Time, 0)
	default:
		ev.Time = time.Now()
	}
	return ev, true
}
