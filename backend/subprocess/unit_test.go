package subprocess

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/enginefleet/orchestrator"
)

func TestParseProcStat(t *testing.T) {
	line := "4242 (weird) name (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 987654 1000 10 18446744073709551615\n"
	st, err := parseProcStat([]byte(line))
	if err != nil {
		t.Fatal(err)
	}
	if st.state != 'S' || st.startTicks != 987654 {
		t.Errorf("parseProcStat = %+v", st)
	}
	if _, err := parseProcStat([]byte("garbage")); err == nil {
		t.Error("garbage parsed")
	}
}

func TestEmitDropsForSlowSubscriber(t *testing.T) {
	b, err := New(Config{DataRoot: t.TempDir()}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	slow, _ := b.Events(ctx) // never read until the end
	fast, _ := b.Events(ctx)
	var read atomic.Int64
	acks := make(chan struct{}, eventBuffer*2) // one per event the fast subscriber read
	got := make(chan int64)
	go func() {
		for ev := range fast {
			if ev.Kind == "die" {
				n := read.Add(1)
				acks <- struct{}{}
				if n == eventBuffer*2 {
					break
				}
			}
		}
		got <- read.Load()
	}()
	done := make(chan struct{})
	go func() {
		acked := int64(0)
		for i := int64(1); i <= eventBuffer*2; i++ {
			b.emit("e", "die", 1, time.Now())
			for ; acked < i-eventBuffer/2; acked++ { // keep the fast one within its buffer
				<-acks
			}
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("emit blocked on a slow subscriber")
	}
	select {
	case n := <-got:
		if n != eventBuffer*2 {
			t.Errorf("fast subscriber got %d events", n)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("fast subscriber starved")
	}
	if len(slow) != eventBuffer {
		t.Errorf("slow subscriber holds %d events, want %d", len(slow), eventBuffer)
	}
	cancel()
	for range slow {
	}
}

func TestBackendInterface(t *testing.T) {
	var be orchestrator.Backend
	b, err := New(Config{DataRoot: t.TempDir()}, nil)
	if err != nil {
		t.Fatal(err)
	}
	be = b
	if be.Name() != "subprocess" {
		t.Error(be.Name())
	}
}
