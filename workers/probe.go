package workers

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
)

// Probe checks an engine's GET /health: healthy is a 200 whose JSON body
// has "status": "ok" (SPEC §6); anything else is an error saying why.
func Probe(ctx context.Context, c *http.Client, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return fmt.Errorf("build probe: %w", err)
	}
	resp, err := c.Do(req)
	if err != nil {
		return fmt.Errorf("probe: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return fmt.Errorf("probe: read body: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("probe: status %d", resp.StatusCode)
	}
	var h struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal(body, &h); err != nil {
		return fmt.Errorf("probe: body is not JSON: %w", err)
	}
	if h.Status != "ok" {
		return fmt.Errorf("probe: status %q", h.Status)
	}
	return nil
}
