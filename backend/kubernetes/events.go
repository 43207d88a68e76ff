package kubernetes

import (
	"context"
	"fmt"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/cache"

	orchestrator "github.com/enginefleet/orchestrator"
)

// eventBuffer is how many events a slow subscriber may fall behind before
// events are dropped (it is told in the log; the workers reconcile on
// re-subscription anyway).
const eventBuffer = 256

type subscriber struct {
	ch   chan orchestrator.RuntimeEvent
	once sync.Once
}

func (s *subscriber) close() { s.once.Do(func() { close(s.ch) }) }

// Events streams this node's engine events, derived from the pod informer:
// "start" when the engine container (re)starts running, "die" with the exit
// code when it terminates (a crash the kubelet restarts shows as a restart
// count that went up), "oom" before "die" when the kubelet says OOMKilled,
// and "stop" when the pod is deleted. The channel closes when ctx ends or
// the backend is closed. It fails at once when the API server cannot be
// reached or read.
func (b *Backend) Events(ctx context.Context) (<-chan orchestrator.RuntimeEvent, error) {
	if err := b.connect(ctx); err != nil {
		return nil, fmt.Errorf("subscribe to events: %w", err)
	}
	s := &subscriber{ch: make(chan orchestrator.RuntimeEvent, eventBuffer)}
	b.subMu.Lock()
	b.subs[s] = struct{}{}
	b.subMu.Unlock()
	go func() {
		<-ctx.Done()
		b.subMu.Lock()
		delete(b.subs, s)
		s.close()
		b.subMu.Unlock()
	}()
	return s.ch, nil
}

func (b *Backend) emit(ev orchestrator.RuntimeEvent) {
	b.subMu.Lock()
	defer b.subMu.Unlock()
	for s := range b.subs {
		select {
		case s.ch <- ev:
		default:
			b.log.Warn("runtime event dropped: subscriber too slow", "engine_id", ev.EngineID, "event", ev.Kind)
		}
	}
}

func (b *Backend) podEventHandler() cache.ResourceEventHandler {
	return cache.ResourceEventHandlerFuncs{
		UpdateFunc: func(oldObj, newObj any) {
			oldPod, ok1 := oldObj.(*corev1.Pod)
			newPod, ok2 := newObj.(*corev1.Pod)
			if ok1 && ok2 {
				b.podChanged(oldPod, newPod)
			}
		},
		DeleteFunc: func(obj any) {
			if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = d.Obj
			}
			if pod, ok := obj.(*corev1.Pod); ok {
				b.podDeleted(pod)
			}
		},
	}
}

func engineOf(pod *corev1.Pod) string {
	if pod.Labels[LabelRole] != RoleEngine {
		return ""
	}
	return pod.Labels[orchestrator.LabelEngineID]
}

func (b *Backend) podChanged(oldPod, newPod *corev1.Pod) {
	id := engineOf(newPod)
	if id == "" {
		return
	}
	now := time.Now()
	was, is := engineStatus(oldPod), engineStatus(newPod)
	if is == nil {
		return
	}
	if was == nil {
		was = &corev1.ContainerStatus{}
	}
	// A termination: the restart count went up (the kubelet restarted it
	// already) or the container is terminated now and was not before.
	var term *corev1.ContainerStateTerminated
	switch {
	case is.RestartCount > was.RestartCount:
		term = is.LastTerminationState.Terminated
		if term == nil {
			term = &corev1.ContainerStateTerminated{ExitCode: -1}
		}
	case is.State.Terminated != nil && was.State.Terminated == nil:
		term = is.State.Terminated
	}
	if term != nil {
		at := now
		if !term.FinishedAt.IsZero() {
			at = term.FinishedAt.Time
		}
		b.exitMu.Lock()
		b.lastExit[string(newPod.UID)] = int(term.ExitCode)
		b.exitMu.Unlock()
		if term.Reason == "OOMKilled" {
			b.emit(orchestrator.RuntimeEvent{EngineID: id, Kind: "oom", ExitCode: int(term.ExitCode), Time: at})
		}
		b.emit(orchestrator.RuntimeEvent{EngineID: id, Kind: "die", ExitCode: int(term.ExitCode), Time: at})
	}
	if r := is.State.Running; r != nil && (was.State.Running == nil || !was.State.Running.StartedAt.Equal(&r.StartedAt)) {
		at := now
		if !r.StartedAt.IsZero() {
			at = r.StartedAt.Time
		}
		b.emit(orchestrator.RuntimeEvent{EngineID: id, Kind: "start", Time: at})
	}
}

func (b *Backend) podDeleted(pod *corev1.Pod) {
	id := engineOf(pod)
	if id == "" {
		return
	}
	code := 0
	if cs := engineStatus(pod); cs != nil && cs.State.Terminated != nil {
		code = int(cs.State.Terminated.ExitCode)
	}
	b.emit(orchestrator.RuntimeEvent{EngineID: id, Kind: "stop", ExitCode: code, Time: time.Now()})
	// Forget exit codes of pods gone for a while (Stop reads them at once).
	go func(uid string) {
		time.Sleep(time.Minute)
		b.exitMu.Lock()
		delete(b.lastExit, uid)
		b.exitMu.Unlock()
	}(string(pod.UID))
}
