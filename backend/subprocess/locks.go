package subprocess

import (
	"context"
	"sync"
)

// engineLocks serializes operations per engine id. Entries are reference
// counted so that the map does not grow with every engine ever seen.
type engineLocks struct {
	mu sync.Mutex
	m  map[string]*engineLock
}

type engineLock struct {
	ch   chan struct{}
	refs int
}

func (l *engineLocks) acquire(id string) *engineLock {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.m == nil {
		l.m = make(map[string]*engineLock)
	}
	e := l.m[id]
	if e == nil {
		e = &engineLock{ch: make(chan struct{}, 1)}
		l.m[id] = e
	}
	e.refs++
	return e
}

func (l *engineLocks) release(id string, e *engineLock) {
	l.mu.Lock()
	defer l.mu.Unlock()
	e.refs--
	if e.refs == 0 {
		delete(l.m, id)
	}
}

// lock takes the engine's lock, giving up when ctx ends.
func (l *engineLocks) lock(ctx context.Context, id string) (unlock func(), err error) {
	e := l.acquire(id)
	select {
	case e.ch <- struct{}{}:
		return func() { <-e.ch; l.release(id, e) }, nil
	case <-ctx.Done():
		l.release(id, e)
		return nil, ctx.Err()
	}
}

// tryLock takes the engine's lock if it is free.
func (l *engineLocks) tryLock(id string) (unlock func(), ok bool) {
	e := l.acquire(id)
	select {
	case e.ch <- struct{}{}:
		return func() { <-e.ch; l.release(id, e) }, true
	default:
		l.release(id, e)
		return nil, false
	}
}

// lockEngine validates an engine id and serializes work on that engine
// until unlock; it gives up when ctx ends.
func (b *Backend) lockEngine(ctx context.Context, id string) (unlock func(), err error) {
	if err := checkID(id); err != nil {
		return nil, err
	}
	return b.locks.lock(ctx, id)
}
