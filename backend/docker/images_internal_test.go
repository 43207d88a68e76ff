package docker

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// An image seen is taken as present for imageMemoFor, then looked at
// again; forgetting it (a create found it gone) looks at once. Only a
// known image id can be marked as giving the user's fresh volumes.
func TestImageMemo(t *testing.T) {
	t.Parallel()
	now := time.Unix(1_000_000, 0)
	m := &imageMemo{now: func() time.Time { return now }}
	require.False(t, m.present("img:1"))
	m.saw("img:1", "sha256:a")
	require.True(t, m.present("img:1"))
	require.Equal(t, "sha256:a", m.id("img:1"))
	now = now.Add(imageMemoFor - time.Second)
	require.True(t, m.present("img:1"))
	now = now.Add(time.Second)
	require.False(t, m.present("img:1"), "looked at again after %s", imageMemoFor)
	m.saw("img:1", "sha256:a")
	m.forget("img:1")
	require.False(t, m.present("img:1"))
	require.Empty(t, m.id("img:1"))

	require.False(t, m.clean("sha256:a", "65532:65532"))
	m.markClean("sha256:a", "65532:65532")
	require.True(t, m.clean("sha256:a", "65532:65532"))
	require.False(t, m.clean("sha256:a", "4242:4242"), "per user")
	require.False(t, m.clean("sha256:b", "65532:65532"), "per image id")
	m.markClean("", "65532:65532")
	require.False(t, m.clean("", "65532:65532"), "an unknown id is never clean")
}
