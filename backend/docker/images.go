package docker

import (
	"sync"
	"time"
)

// imageMemoFor is how long an image seen locally is taken as still there.
// An engine image is removed from a node rarely and never while its
// engines run; a create that finds it gone makes Ensure look again.
const imageMemoFor = 5 * time.Minute

// imageMemo remembers, per image reference, that the daemon has it (and
// its id) so that every Ensure does not ask; and, per image id and engine
// user, that a fresh volume of that image is already the user's, so that
// new engines' volumes are not read back to check their owners.
type imageMemo struct {
	mu    sync.Mutex
	now   func() time.Time // time.Now; tests move it
	seen  map[string]seenImage
	owned map[[2]string]bool // {image id, user}: a fresh volume was the user's
}

type seenImage struct {
	id string
	at time.Time
}

func (m *imageMemo) clock() time.Time {
	if m.now != nil {
		return m.now()
	}
	return time.Now()
}

// present reports whether ref was seen within imageMemoFor.
func (m *imageMemo) present(ref string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.seen[ref]
	return ok && m.clock().Sub(s.at) < imageMemoFor
}

// saw records that the daemon has ref, as image id.
func (m *imageMemo) saw(ref, id string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.seen == nil {
		m.seen = map[string]seenImage{}
	}
	m.seen[ref] = seenImage{id: id, at: m.clock()}
}

// forget drops what is known of ref.
func (m *imageMemo) forget(ref string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.seen, ref)
}

// id is the image id ref was last seen as ("" when unknown).
func (m *imageMemo) id(ref string) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.seen[ref].id
}

// clean reports whether a fresh volume of image id was found to belong to
// user throughout.
func (m *imageMemo) clean(id, user string) bool {
	if id == "" {
		return false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.owned[[2]string{id, user}]
}

// markClean records that a fresh volume of image id belonged to user.
func (m *imageMemo) markClean(id, user string) {
	if id == "" {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.owned == nil {
		m.owned = map[[2]string]bool{}
	}
	m.owned[[2]string{id, user}] = true
}
