package main

import (
	"bytes"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
	n  int // writes
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.n++
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Lines are batched into few writes, nothing is lost, an ERROR line goes
// out at once with what came before it, and Close flushes the rest.
func TestLogWriterBatches(t *testing.T) {
	var out lockedBuffer
	lw := newLogWriter(&out)
	for range 1000 {
		_, err := lw.Write([]byte(`{"level":"INFO","msg":"request"}` + "\n"))
		require.NoError(t, err)
	}
	_, err := lw.Write([]byte(`{"level":"ERROR","msg":"boom"}` + "\n"))
	require.NoError(t, err)
	require.Contains(t, out.String(), `"msg":"boom"`, "an error line is written at once")
	require.Equal(t, 1001, bytes.Count([]byte(out.String()), []byte("\n")))
	out.mu.Lock()
	writes := out.n
	out.mu.Unlock()
	require.Less(t, writes, 10, "1001 lines in a handful of writes")

	_, err = lw.Write([]byte(`{"level":"INFO","msg":"late"}` + "\n"))
	require.NoError(t, err)
	require.Eventually(t, func() bool { return bytes.Contains([]byte(out.String()), []byte("late")) },
		5*time.Second, 10*time.Millisecond, "flushed within logFlushEvery")
	_, err = lw.Write([]byte(`{"level":"INFO","msg":"last"}` + "\n"))
	require.NoError(t, err)
	require.NoError(t, lw.Close())
	require.Contains(t, out.String(), "last")
}
