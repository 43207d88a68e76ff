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
	require.ErrorIs(t, err, enginefleet.ErrProductSlugExists)
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
	require.ErrorIs(t, err, enginefleet.ErrEngineNotRunning)
	_, denial, err = c.Admit(ctx, "ann", enginefleet.AdmitOptions{})
	require.NoError(t, err)
	require.Equal(t, "engine_sleeping", denial.Reason)
	st, err := c.Start(ctx, "ann")
	require.NoError(t, err)
	require.Equal(t, "running", st.Status)
	_, err = c.Start(ctx, "ann")
	require.ErrorIs(t, err, enginefleet.ErrEngineAlreadyRunning)

	_, err = c.Provision(ctx, "ann", "")
	require.ErrorIs(t, err, enginefleet.ErrEngineAlreadyExists)
	_, err = c.Provision(ctx, "bob", "")
	require.NoError(t, err)
	_, err = c.Provision(ctx, "cy", "")
	require.NoError(t, err)
	_, err = c.Provision(ctx, "dee", "")
	require.ErrorIs(t, err, enginefleet.ErrPortExhaustion)
	_, err = c.Provision(ctx, "bad id", "")
	require.ErrorIs(t, err, enginefleet.ErrInvalidRequest)

	d, err := c.Destroy(ctx, "ann")
	require.NoError(t, err)
	require.Equal(t, "destroyed", d.Status)
	_, err = c.Engine(ctx, "ann")
	require.ErrorIs(t, err, enginefleet.ErrEngineNotFound)

	bad, err := enginefleet.New(f.URL, enginefleet.WithPlatformKey("nope"))
	require.NoError(t, err)
	_, err = bad.Engine(ctx, "ann")
	require.ErrorIs(t, err, enginefleet.ErrInvalidPlatformKey)
	badAdmin, _ := enginefleet.New(f.URL, enginefleet.WithAdminKey("nope"))
	_, err = badAdmin.RegisterProduct(ctx, "x", "x")
	require.ErrorIs(t, err, enginefleet.ErrInvalidAdminKey)

	// A denial that asks the caller to wait says how long.
	one := 1
	_, limitedKey := f.product("limited", orch.Policy{RateLimitRPM: &one})
	lc, err := enginefleet.New(f.URL, enginefleet.WithPlatformKey(limitedKey))
	require.NoError(t, err)
	_, _, err = lc.Admit(ctx, "zed", enginefleet.AdmitOptions{})
	require.NoError(t, err)
	_, _, err = lc.Admit(ctx, "zed", enginefleet.AdmitOptions{})
	require.ErrorIs(t, err, enginefleet.ErrRateLimited)
	require.NotErrorIs(t, err, enginefleet.ErrQuotaExceeded)
	require.Equal(t, enginefleet.ErrorCodeRateLimited, enginefleet.Code(err))
	require.ErrorAs(t, err, &e)
	require.Equal(t, http.StatusTooManyRequests, e.Status)
	require.Greater(t, e.RetryAfter, time.Duration(0))
	require.LessOrEqual(t, e.RetryAfter, time.Minute)
	wait, ok := enginefleet.RetryAfter(err)
	require.True(t, ok)
	require.Equal(t, e.RetryAfter, wait)

	// QUOTA_EXCEEDED, and an asynchronous provision followed to its end.
	maxOne := 1
	_, quotaKey := f.product("quota", orch.Policy{MaxEngines: &maxOne})
	qc, err := enginefleet.New(f.URL, enginefleet.WithPlatformKey(quotaKey))
	require.NoError(t, err)
	started, err := qc.ProvisionAsync(ctx, "amy", "")
	require.NoError(t, err)
	require.NotNil(t, started.OperationId)
	op, err := qc.Wait(ctx, *started.OperationId, 50*time.Millisecond)
	require.NoError(t, err)
	require.Equal(t, enginefleet.OperationBodyStatusSucceeded, op.Status)
	got, err = qc.Engine(ctx, "amy")
	require.NoError(t, err)
	require.Equal(t, enginefleet.EngineDetailStatusRunning, got.Status)
	_, err = qc.Provision(ctx, "ben", "")
	require.ErrorIs(t, err, enginefleet.ErrQuotaExceeded)
	require.ErrorAs(t, err, &e)
	require.Equal(t, http.StatusTooManyRequests, e.Status)
	_, ok = enginefleet.RetryAfter(err)
	require.True(t, ok, "QUOTA_EXCEEDED carries Retry-After")
	_, err = qc.Wait(ctx, "00000000-0000-0000-0000-000000000000", 0)
	require.ErrorIs(t, err, enginefleet.ErrOperationNotFound)
}

// The example program runs against a live orchestrator.
func TestSDKExample(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{})
	cmd := exec.Command("go", "run", "./sdk/go/example", "-url", f.URL, "-admin-key", adminKey)
	cmd.Dir = testenv.RepoRoot(t)
	cmd.Args = append(cmd.Args, "-max-wait", "1s")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	for _, want := range []string{"provisioning alice: operation", "alice's engine is running", "bob: quota exceeded",
		"engine answered 201", "admit alice: rate limited, Retry-After", "admit: rate limited, gave up"} {
		require.Contains(t, string(out), want)
	}
}
