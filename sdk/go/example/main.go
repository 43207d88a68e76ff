// Command example is a product's integration in one file: it registers a
// product with a policy, provisions a user's engine asynchronously and
// follows the operation, admits the user and talks to the engine directly,
// and handles the two refusals a product must expect: QUOTA_EXCEEDED
// (max_engines reached) and RATE_LIMITED (rate_limit_rpm reached; wait
// Retry-After).
//
//	go run ./sdk/go/example -url http://localhost:8000 -admin-key "$ORCH_ADMIN_KEY"
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"time"

	enginefleet "github.com/enginefleet/orchestrator/sdk/go"
)

func main() {
	url := flag.String("url", "http://localhost:8000", "orchestrator URL")
	adminKey := flag.String("admin-key", "", "the orchestrator's admin key")
	slug := flag.String("slug", fmt.Sprintf("example-%d", time.Now().Unix()), "product slug to register")
	maxWait := flag.Duration("max-wait", time.Minute, "longest Retry-After the example waits out before giving up")
	flag.Parse()
	if err := run(context.Background(), *url, *adminKey, *slug, *maxWait); err != nil {
		log.Fatal(err)
	}
}

func run(ctx context.Context, url, adminKey, slug string, maxWait time.Duration) error {
	admin, err := enginefleet.New(url, enginefleet.WithAdminKey(adminKey))
	if err != nil {
		return err
	}
	// One engine at most, five admits a minute: small, so both refusals show.
	maxEngines, rpm := int64(1), int64(5)
	product, err := admin.RegisterProductWithPolicy(ctx, slug, "SDK example",
		&enginefleet.Policy{MaxEngines: &maxEngines, RateLimitRpm: &rpm})
	if err != nil {
		return fmt.Errorf("register: %w", err)
	}
	fmt.Println("registered product", product.Slug)

	orch, err := enginefleet.New(url, enginefleet.WithPlatformKey(product.PlatformApiKey))
	if err != nil {
		return err
	}

	// Asynchronous: 202 at once with an operation to follow.
	started, err := orch.ProvisionAsync(ctx, "alice", "")
	if err != nil {
		return fmt.Errorf("provision alice: %w", err)
	}
	fmt.Println("provisioning alice: operation", *started.OperationId)
	if _, err := orch.Wait(ctx, *started.OperationId, 200*time.Millisecond); err != nil {
		// A failed operation is an *Error with the operation's code.
		if errors.Is(err, enginefleet.ErrBootTimeout) {
			return fmt.Errorf("alice's engine did not boot in time: %w", err)
		}
		return fmt.Errorf("provision alice: %w", err)
	}
	fmt.Println("alice's engine is running")

	// QUOTA_EXCEEDED: the policy allows one engine.
	if _, err := orch.Provision(ctx, "bob", ""); errors.Is(err, enginefleet.ErrQuotaExceeded) {
		fmt.Println("bob: quota exceeded (destroy an engine or raise max_engines)")
	} else if err != nil {
		return fmt.Errorf("provision bob: %w", err)
	} else {
		return errors.New("bob was provisioned beyond max_engines")
	}

	// Admit is what a product calls on every user request.
	engine, err := admit(ctx, orch, "alice", maxWait)
	if err != nil {
		return err
	}
	fmt.Println("alice's engine:", engine.Url)
	// From here on the product talks to the engine directly.
	req, _ := http.NewRequestWithContext(ctx, "POST", engine.Url+"/memories", bytes.NewBufferString(`{"content":"hello from the SDK example"}`))
	req.Header.Set("X-Engine-Key", engine.ApiKey)
	req.Header.Set("Content-Type", "application/json")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	fmt.Printf("engine answered %d: %s\n", res.StatusCode, bytes.TrimSpace(body))
	if res.StatusCode != http.StatusCreated {
		return fmt.Errorf("engine refused the memory: %d", res.StatusCode)
	}

	// RATE_LIMITED: more admits than rate_limit_rpm in one minute.
	for i := 0; i < 10; i++ {
		if _, err := admit(ctx, orch, "alice", maxWait); errors.Is(err, enginefleet.ErrRateLimited) {
			fmt.Println("admit: rate limited, gave up after waiting at most", maxWait)
			return nil
		} else if err != nil {
			return err
		}
	}
	return errors.New("ten admits were never rate limited")
}

// admit admits the user, waiting out RATE_LIMITED for as long as the
// orchestrator's Retry-After says when that is at most maxWait.
func admit(ctx context.Context, orch *enginefleet.Orchestrator, userID string, maxWait time.Duration) (*enginefleet.EngineDetail, error) {
	for {
		engine, denial, err := orch.Admit(ctx, userID, enginefleet.AdmitOptions{AutoProvision: true, AutoWake: true})
		if errors.Is(err, enginefleet.ErrRateLimited) {
			wait, _ := enginefleet.RetryAfter(err)
			fmt.Printf("admit %s: rate limited, Retry-After %s\n", userID, wait)
			if wait > maxWait {
				return nil, err
			}
			select {
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-time.After(wait):
			}
			continue
		}
		switch {
		case err != nil:
			return nil, fmt.Errorf("admit %s: %w", userID, err)
		case denial != nil:
			// engine_unhealthy: its auto-restarts gave up; an operator
			// (or a restart) is needed.
			return nil, fmt.Errorf("admit %s: not admitted: %s", userID, denial.Reason)
		}
		return engine, nil
	}
}
