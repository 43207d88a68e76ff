package subprocess

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// procStat is what this package reads from /proc/<pid>/stat.
type procStat struct {
	state      byte   // R, S, D, T, Z, ...
	startTicks uint64 // start time after boot, in clock ticks
}

func readProcStat(pid int) (procStat, error) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return procStat{}, err
	}
	return parseProcStat(data)
}

// parseProcStat parses a /proc/<pid>/stat line. The command name (field 2)
// may hold spaces and parentheses, so fields are counted from the last ')'.
func parseProcStat(data []byte) (procStat, error) {
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return procStat{}, errors.New("malformed /proc stat")
	}
	f := strings.Fields(string(data[i+1:]))
	// f[0] is field 3 (state); field 22 (starttime) is f[19].
	if len(f) < 20 || len(f[0]) != 1 {
		return procStat{}, errors.New("malformed /proc stat")
	}
	ticks, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("malformed /proc stat: %w", err)
	}
	return procStat{state: f[0][0], startTicks: ticks}, nil
}

// probe reports whether the process of rec is still the engine and alive
// (zombies are dead), and whether it is stopped by a signal (paused).
func (b *Backend) probe(rec pidRecord) (alive, stopped bool) {
	if rec.PID <= 0 {
		return false, false
	}
	if !b.procfs {
		return syscall.Kill(rec.PID, 0) == nil, false
	}
	st, err := readProcStat(rec.PID)
	if err != nil {
		return false, false
	}
	switch st.state {
	case 'Z', 'X', 'x':
		return false, false
	}
	if rec.StartTicks != 0 && st.startTicks != rec.StartTicks {
		return false, false // the pid was recycled
	}
	return true, st.state == 'T'
}

// allStopped reports whether every thread of pid is stopped by a signal.
func allStopped(pid int) bool {
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	ents, err := os.ReadDir(dir)
	if err != nil || len(ents) == 0 {
		return false
	}
	for _, e := range ents {
		data, err := os.ReadFile(dir + "/" + e.Name() + "/stat")
		if err != nil {
			continue // thread gone
		}
		st, err := parseProcStat(data)
		if err != nil || st.state != 'T' {
			return false
		}
	}
	return true
}

// signalGroup sends sig to the process group led by pid; a group that is
// already gone is not an error.
func signalGroup(pid int, sig syscall.Signal) error {
	if pid <= 0 {
		return errors.New("invalid pid")
	}
	err := syscall.Kill(-pid, sig)
	if errors.Is(err, syscall.ESRCH) {
		return nil
	}
	return err
}

// child is an engine process started, and reaped, by this Backend.
type child struct {
	rec  pidRecord
	done chan struct{} // closed once reaped
	code int           // exit code, valid after done
}

func (b *Backend) childFor(id string, rec pidRecord) *child {
	b.childMu.Lock()
	defer b.childMu.Unlock()
	if c := b.children[id]; c != nil && c.rec.same(rec) {
		return c
	}
	return nil
}

// exitCode converts a process state to Docker's convention: the exit
// status, or 128+signal when a signal killed the process.
func exitCode(ps *os.ProcessState) int {
	if ps == nil {
		return -1
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ps.ExitCode()
}

// reap waits for a child, records its exit and emits "die".
func (b *Backend) reap(id string, cmd *exec.Cmd, c *child) {
	_ = cmd.Wait()
	c.code = exitCode(cmd.ProcessState)
	close(c.done)
	now := time.Now().UTC()
	b.log.Info("engine exited", "engine_id", id, "pid", c.rec.PID, "exit_code", c.code)
	b.emit(id, "die", c.code, now)

	// Record the exit unless the pid file moved on (Stop, Start, removal).
	unlock, err := b.locks.lock(context.Background(), id)
	if err == nil {
		if rec, ok, _ := b.readPid(id); ok && rec.same(c.rec) {
			if e, ok := b.readExit(id); !ok || !e.of(rec) {
				err := writeJSON(b.path(id, fileExit), exitRecord{
					PID: rec.PID, StartTicks: rec.StartTicks, ExitCode: c.code, FinishedAt: now,
				})
				if err != nil {
					b.log.Warn("record engine exit", "engine_id", id, "error", err)
				}
			}
		}
		unlock()
	}
	b.childMu.Lock()
	if b.children[id] == c {
		delete(b.children, id)
	}
	b.childMu.Unlock()
}

// waitDead waits up to d for the process of rec to die. It returns false
// when it is still alive at the deadline or when ctx ends.
func (b *Backend) waitDead(ctx context.Context, rec pidRecord, c *child, d time.Duration) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	if c != nil {
		select {
		case <-c.done:
			return true
		case <-timer.C:
			return false
		case <-ctx.Done():
			return false
		}
	}
	tick := 5 * time.Millisecond
	for {
		if alive, _ := b.probe(rec); !alive {
			return true
		}
		select {
		case <-timer.C:
			alive, _ := b.probe(rec)
			return !alive
		case <-ctx.Done():
			return false
		case <-time.After(tick):
		}
		if tick < 100*time.Millisecond {
			tick *= 2
		}
	}
}

// isExecutable reports whether path is a regular file with an execute bit.
func isExecutable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0
}
