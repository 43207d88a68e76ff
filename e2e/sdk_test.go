package e2e_test

import (
	"context"
	"net/http"
	"os/exec"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
	enginefleet "github.com/enginefleet/orchestrator/sdk/go"
)

// The Go SDK against a live orchestrator: register, admit, get, list, stop,
// start, destroy, and every typed error.
func TestSDK(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{ports: 3})
	ctx := context.Background()

	admin, err := enginefleet.New(f.URL, enginefleet.WithAdminKey(adminKey))
	require.NoError(t, err)
	p, err := admin.RegisterProduct(ctx, "sdk", "SDK")
	require.NoError(t, err)
	_, err = admin.RegisterProduct(ctx, "sdk", "again")
	require.Equal(t, "PRODUCT_SLUG_EXISTS", enginefleet.Code(err))
	var e *enginefleet.Error
	require.ErrorAs(t, err, &e)
	require.Equal(t, http.StatusConflict, e.Status)

	c, err := enginefleet.New(f.URL, enginefleet.WithPlatformKey(p.PlatformApiKey))
	require.NoError(t, err)

	_, denial, err := c.Admit(ctx, "ann", enginefleet.AdmitOptions{})
	require.NoError(t, err)
	require.Equal(t, "engine_not_found", denial.Reason)

	eng, denial, err := c.Admit(ctx, "ann", enginefleet.AdmitOptions{AutoProvision: true})
	require.NoError(t, err)
	require.Nil(t, denial)
	require.Equal(t, http.StatusOK, engineCall(t, "GET", eng.Url+"/memories", eng.ApiKey, nil).Status)

	got, err := c.Engine(ctx, "ann")
	require.NoError(t, err)
	require.Equal(t, eng.ApiKey, got.ApiKey)
	list, err := c.Engines(ctx, "running", 10, 0)
	require.NoError(t, err)
	require.EqualValues(t, 1, list.Total)

	_, err = c.Stop(ctx, "ann")
	require.NoError(t, err)
	_, err = c.Stop(ctx, "ann")
	require.Equal(t, "ENGINE_NOT_RUNNING", enginefleet.Code(err))
	_, denial, err = c.Admit(ctx, "ann", enginefleet.AdmitOptions{})
	require.NoError(t, err)
	require.Equal(t, "engine_sleeping", denial.Reason)
	st, err := c.Start(ctx, "ann")
	require.NoError(t, err)
	require.Equal(t, "running", st.Status)
	_, err = c.Start(ctx, "ann")
	require.Equal(t, "ENGINE_ALREADY_RUNNING", enginefleet.Code(err))

	_, err = c.Provision(ctx, "ann", "")
	require.Equal(t, "ENGINE_ALREADY_EXISTS", enginefleet.Code(err))
	_, err = c.Provision(ctx, "bob", "")
	require.NoError(t, err)
	_, err = c.Provision(ctx, "cy", "")
	require.NoError(t, err)
	_, err = c.Provision(ctx, "dee", "")
	require.Equal(t, "PORT_EXHAUSTION", enginefleet.Code(err))
	_, err = c.Provision(ctx, "bad id", "")
	require.Equal(t, "INVALID_REQUEST", enginefleet.Code(err))

	d, err := c.Destroy(ctx, "ann")
	require.NoError(t, err)
	require.Equal(t, "destroyed", d.Status)
	_, err = c.Engine(ctx, "ann")
	require.Equal(t, "ENGINE_NOT_FOUND", enginefleet.Code(err))

	bad, err := enginefleet.New(f.URL, enginefleet.WithPlatformKey("nope"))
	require.NoError(t, err)
	_, err = bad.Engine(ctx, "ann")
	require.Equal(t, "INVALID_PLATFORM_KEY", enginefleet.Code(err))
	badAdmin, _ := enginefleet.New(f.URL, enginefleet.WithAdminKey("nope"))
	_, err = badAdmin.RegisterProduct(ctx, "x", "x")
	require.Equal(t, "INVALID_ADMIN_KEY", enginefleet.Code(err))

	// A denial that asks the caller to wait says how long.
	one := 1
	_, limitedKey := f.product("limited", orch.Policy{RateLimitRPM: &one})
	lc, err := enginefleet.New(f.URL, enginefleet.WithPlatformKey(limitedKey))
	require.NoError(t, err)
	_, _, err = lc.Admit(ctx, "zed", enginefleet.AdmitOptions{})
	require.NoError(t, err)
	_, _, err = lc.Admit(ctx, "zed", enginefleet.AdmitOptions{})
	require.Equal(t, "RATE_LIMITED", enginefleet.Code(err))
	require.ErrorAs(t, err, &e)
	require.Greater(t, e.RetryAfter, time.Duration(0))
	require.LessOrEqual(t, e.RetryAfter, time.Minute)
}

// The example program runs against a live orchestrator.
func TestSDKExample(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{})
	cmd := exec.Command("go", "run", "./sdk/go/example", "-url", f.URL, "-admin-key", adminKey)
	cmd.Dir = testenv.RepoRoot(t)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Contains(t, string(out), "engine answered 201")
}
