package main

import (
	"bufio"
	"bytes"
	"io"
	"sync"
	"time"
)

// logWriter batches log lines: a busy API writes one access-log line per
// request, and a write system call each cost more than the rest of a warm
// admit's logging. Lines wait at most logFlushEvery (or until 64 KiB are
// buffered); a line at ERROR level is written at once, with everything
// before it, so what explains a crash is on stdout before the crash. Close
// flushes and stops the flusher.
type logWriter struct {
	mu   sync.Mutex
	w    *bufio.Writer
	stop chan struct{}
	done chan struct{}
}

const logFlushEvery = 100 * time.Millisecond

func newLogWriter(w io.Writer) *logWriter {
	lw := &logWriter{w: bufio.NewWriterSize(w, 64<<10), stop: make(chan struct{}), done: make(chan struct{})}
	go lw.flusher()
	return lw
}

func (lw *logWriter) Write(p []byte) (int, error) {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	n, err := lw.w.Write(p)
	if err == nil && (bytes.Contains(p, []byte(`"level":"ERROR"`)) || bytes.Contains(p, []byte("level=ERROR"))) {
		err = lw.w.Flush()
	}
	return n, err
}

func (lw *logWriter) flusher() {
	defer close(lw.done)
	t := time.NewTicker(logFlushEvery)
	defer t.Stop()
	for {
		select {
		case <-lw.stop:
			return
		case <-t.C:
			lw.Flush()
		}
	}
}

// Flush writes what is buffered.
func (lw *logWriter) Flush() {
	lw.mu.Lock()
	lw.w.Flush() //nolint:errcheck // stdout: nowhere to report it
	lw.mu.Unlock()
}

// Close flushes and stops the flusher.
func (lw *logWriter) Close() error {
	close(lw.stop)
	<-lw.done
	lw.Flush()
	return nil
}
