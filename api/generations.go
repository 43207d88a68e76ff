package api

// generations is a map bounded without scans: entries go into the current
// generation; when it holds size entries (or when its owner says it is
// old) it becomes the previous generation and the previous one is dropped
// whole. Lookups see both, so it holds at most 2*size entries, and an
// entry lives at least until size newer ones have been added after it.
// Fresh maps each time also keep Go's maps from growing under churn.
// Not safe for concurrent use.
type generations[K comparable, V any] struct {
	size      int
	cur, prev map[K]V
}

func newGenerations[K comparable, V any](size int) generations[K, V] {
	return generations[K, V]{size: size}
}

func (g *generations[K, V]) get(k K) (V, bool) {
	if v, ok := g.cur[k]; ok {
		return v, true
	}
	v, ok := g.prev[k]
	return v, ok
}

func (g *generations[K, V]) put(k K, v V) {
	if _, ok := g.cur[k]; !ok && len(g.cur) >= g.size {
		g.rotate()
	}
	if g.cur == nil {
		g.cur = make(map[K]V)
	}
	g.cur[k] = v
	delete(g.prev, k)
}

func (g *generations[K, V]) delete(k K) {
	delete(g.cur, k)
	delete(g.prev, k)
}

// rotate starts a new generation, forgetting the previous one.
func (g *generations[K, V]) rotate() { g.prev, g.cur = g.cur, nil }

// reset forgets everything.
func (g *generations[K, V]) reset() { g.prev, g.cur = nil, nil }

func (g *generations[K, V]) len() int { return len(g.cur) + len(g.prev) }
