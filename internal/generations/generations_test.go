package generations

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestGenerationsBounded(t *testing.T) {
	g := New[int, int](100)
	for i := range 10000 {
		g.Put(i, i)
		require.LessOrEqual(t, g.Len(), 200)
	}
	for i := 10000 - 100; i < 10000; i++ {
		v, ok := g.Get(i)
		require.True(t, ok, "the newest size entries are kept")
		require.Equal(t, i, v)
	}
	_, ok := g.Get(0)
	require.False(t, ok)
	g.Put(9999, -1) // an update does not rotate
	v, _ := g.Get(9999)
	require.Equal(t, -1, v)
	g.Delete(9999)
	_, ok = g.Get(9999)
	require.False(t, ok)
	g.Reset()
	require.Zero(t, g.Len())
}
