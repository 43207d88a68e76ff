package workers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
)

// Probe checks an engine's GET /health: healthy is a 200 whose JSON body
// has "status": "ok"; anything else is an error saying why.
//
// The error's text goes into audit rows and last_error, which products
// read: it says what went wrong in a few stable words ("timed out",
// "HTTP 503") and never carries the probe URL, addresses or container
// names of the orchestrator's network (the cause stays wrapped).
func Probe(ctx context.Context, c *http.Client, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return probeErr("misconfigured", err)
	}
	resp, err := c.Do(req)
	if err != nil {
		var ne net.Error
		switch {
		case errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()):
			return probeErr("timed out", err)
		case errors.Is(err, syscall.ECONNREFUSED):
			return probeErr("connection refused", err)
		case errors.Is(err, context.Canceled):
			return probeErr("cancelled", err)
		}
		return probeErr("unreachable", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return probeErr("answer cut off", err)
	}
	if resp.StatusCode != http.StatusOK {
		return probeErr(fmt.Sprintf("HTTP %d", resp.StatusCode), nil)
	}
	var h struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal(body, &h); err != nil {
		return probeErr("answer is not JSON", err)
	}
	if h.Status != "ok" {
		s := strings.ToValidUTF8(h.Status, "?")
		if len(s) > 40 {
			s = s[:40] + "…"
		}
		return probeErr(fmt.Sprintf("status %q", s), nil)
	}
	return nil
}

// ProbeError is a failed probe: Error is the public text, Unwrap the cause.
type ProbeError struct {
	What string
	Err  error
}

func (e *ProbeError) Error() string { return "probe: " + e.What }
func (e *ProbeError) Unwrap() error { return e.Err }

func probeErr(what string, cause error) error { return &ProbeError{What: what, Err: cause} }
