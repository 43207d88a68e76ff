// Command example registers a product, admits a user (provisioning their
// engine) and talks to the engine directly, as a product would.
//
//	go run ./sdk/go/example -url http://localhost:8000 -admin-key "$ORCH_ADMIN_KEY"
package main

import (
	"bytes"
	"context"
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
	flag.Parse()
	if err := run(context.Background(), *url, *adminKey, *slug); err != nil {
		log.Fatal(err)
	}
}

func run(ctx context.Context, url, adminKey, slug string) error {
	admin, err := enginefleet.New(url, enginefleet.WithAdminKey(adminKey))
	if err != nil {
		return err
	}
	product, err := admin.RegisterProduct(ctx, slug, "SDK example")
	if err != nil {
		return fmt.Errorf("register: %w", err)
	}
	fmt.Println("registered product", product.Slug)

	orch, err := enginefleet.New(url, enginefleet.WithPlatformKey(product.PlatformApiKey))
	if err != nil {
		return err
	}
	engine, denial, err := orch.Admit(ctx, "alice", enginefleet.AdmitOptions{AutoProvision: true})
	switch {
	case err != nil:
		return fmt.Errorf("admit: %w (code %s)", err, enginefleet.Code(err))
	case denial != nil:
		return fmt.Errorf("not admitted: %s", denial.Reason)
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
	return nil
}
