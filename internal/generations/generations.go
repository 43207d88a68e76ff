// Package generations is a map bounded without scans, for caches and
// throttles that must not grow with hostile traffic.
package generations

// Map is a map bounded without scans: entries go into the current
// generation; when it holds size entries (or when its owner says it is
// old) it becomes the previous generation and the previous one is dropped
// whole. Lookups see both, so it holds at most 2*size entries, and an
// entry lives at least until size newer ones have been added after it.
// Fresh maps each time also keep Go's maps from growing under churn.
// Not safe for concurrent use.
type Map[K comparable, V any] struct {
	size      int
	cur, prev map[K]V
}

// New returns a Map whose generations hold size entries each.
func New[K comparable, V any](size int) Map[K, V] {
	return Map[K, V]{size: size}
}

// Get returns the value of k.
func (g *Map[K, V]) Get(k K) (V, bool) {
	if v, ok := g.cur[k]; ok {
		return v, true
	}
	v, ok := g.prev[k]
	return v, ok
}

// Put sets k, starting a new generation when the current one is full.
func (g *Map[K, V]) Put(k K, v V) {
	if _, ok := g.cur[k]; !ok && len(g.cur) >= g.size {
		g.Rotate()
	}
	if g.cur == nil {
		g.cur = make(map[K]V)
	}
	g.cur[k] = v
	delete(g.prev, k)
}

// Delete forgets k.
func (g *Map[K, V]) Delete(k K) {
	delete(g.cur, k)
	delete(g.prev, k)
}

// Rotate starts a new generation, forgetting the previous one.
func (g *Map[K, V]) Rotate() { g.prev, g.cur = g.cur, nil }

// Reset forgets everything.
func (g *Map[K, V]) Reset() { g.prev, g.cur = nil, nil }

// Len is the number of entries held.
func (g *Map[K, V]) Len() int { return len(g.cur) + len(g.prev) }
