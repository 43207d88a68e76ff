package testenv

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"testing"
	"time"
)

// Tests wait for a condition, never for a guessed amount of time: a sleep
// long enough for a loaded CI machine makes every run slow, and one short
// enough to be quick fails when the machine is busy. Await (or Poll, where
// there is no test to fail) is the one way to wait for something that can
// only be observed by asking again; a sleep left in a test models the
// passage of time on purpose and says so.

// Poll calls cond until it returns nil, and returns nil then; if d passes
// first it returns cond's last error. cond runs on the caller's goroutine,
// one call at a time: it may use the test's t and share variables with it.
// Calls start 5 ms apart and back off to 100 ms.
func Poll(d time.Duration, cond func() error) error {
	deadline := time.Now().Add(d)
	every := 5 * time.Millisecond
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if !time.Now().Before(deadline) {
			return err
		}
		time.Sleep(min(every, time.Until(deadline)+time.Millisecond)) // between two polls: the condition is what we wait for
		every = min(every*2, 100*time.Millisecond)
	}
}

// Await waits up to d for cond to return nil, and fails the test, saying
// what it waited for and cond's last error, if it does not.
func Await(t testing.TB, d time.Duration, what string, cond func() error) {
	t.Helper()
	if err := Poll(d, cond); err != nil {
		t.Fatalf("not within %s: %s: %v", d, what, err)
	}
}

// Check turns a boolean condition into one for Poll and Await: nil when ok,
// else an error formatted from format and args (the state observed).
func Check(ok bool, format string, args ...any) error {
	if ok {
		return nil
	}
	if format == "" {
		return errors.New("condition false")
	}
	return fmt.Errorf(format, args...)
}

// Healthy is a condition for Await: nil once GET url (an engine's /health)
// answers 200 {"status":"ok"}, else what it answered.
func Healthy(url string) error {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var body struct {
		Status string `json:"status"`
	}
	derr := json.NewDecoder(resp.Body).Decode(&body)
	if resp.StatusCode != http.StatusOK || derr != nil || body.Status != "ok" {
		return fmt.Errorf("status %d, body status %q (%v)", resp.StatusCode, body.Status, derr)
	}
	return nil
}

// AwayFromMinuteEnd returns once the next need of time stays inside one
// wall-clock minute, sleeping into the next minute if needed. Rate-limit
// windows are wall-clock minutes: this sleep models the passage of time on
// purpose, there is no event to wait for.
func AwayFromMinuteEnd(need time.Duration) {
	now := time.Now()
	end := now.Truncate(time.Minute).Add(time.Minute)
	if end.Sub(now) < need {
		time.Sleep(end.Sub(now) + 100*time.Millisecond)
	}
}
