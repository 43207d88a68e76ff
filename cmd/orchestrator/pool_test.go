package main

import (
	"github.com/enginefleet/orchestrator/server"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/workers"
)

func TestPoolSize(t *testing.T) {
	env := map[string]string{"ORCH_DATABASE_URL": "postgresql://u:p@localhost:5432/db",
		"ORCH_MASTER_KEY": keys.GenerateMasterKey(), "ORCH_ADMIN_KEY": keys.Generate()}
	cfg, err := loadConfig(envOf(env))
	require.NoError(t, err)
	require.Zero(t, cfg.DatabaseMaxConns)
	all := server.Roles{API: true, Worker: true, Scheduler: true}
	for _, tc := range []struct {
		r    server.Roles
		want int
	}{
		{all, 21 + 50 + 37 + 2},
		{server.Roles{API: true}, 21},
		{server.Roles{Worker: true}, 50 + 37},
		{server.Roles{Scheduler: true}, 2},
	} {
		n, err := poolSize(cfg, &tc.r)
		require.NoError(t, err)
		require.Equal(t, tc.want, n, tc.r.String())
	}
	n, err := poolSize(cfg, nil)
	require.NoError(t, err)
	require.Equal(t, cliConns, n)

	// The default concurrency (50) no longer outruns the pool: every job
	// slot of the worker has a connection.
	w := workers.New(workerConfig(cfg), nil, nil, testenv.Quiet())
	slots := 0
	for _, q := range w.RiverConfig(testenv.Quiet()).Queues {
		slots += q.MaxWorkers
	}
	require.Equal(t, cfg.WorkerConcurrency+workerOtherQueues, slots, "workerOtherQueues is out of step with workers.RiverConfig")
	n, _ = poolSize(cfg, &server.Roles{Worker: true})
	require.Greater(t, n, slots)

	// Set explicitly: taken when enough, refused with one message when not.
	env["ORCH_DATABASE_MAX_CONNS"] = "200"
	cfg, err = loadConfig(envOf(env))
	require.NoError(t, err)
	n, err = poolSize(cfg, &all)
	require.NoError(t, err)
	require.Equal(t, 200, n)
	env["ORCH_DATABASE_MAX_CONNS"] = "45"
	cfg, err = loadConfig(envOf(env))
	require.NoError(t, err)
	_, err = poolSize(cfg, &all)
	require.EqualError(t, err, "ORCH_DATABASE_MAX_CONNS=45 is too few for --roles=api,worker,scheduler: they need at least 94 connections "+
		"(api 5, worker 87 = ORCH_WORKER_CONCURRENCY 50 + 37 for its other queues, webhooks and River's own connections, scheduler 2); "+
		"raise it, lower ORCH_WORKER_CONCURRENCY, or unset it to use 110")
	n, err = poolSize(cfg, &server.Roles{API: true})
	require.NoError(t, err, "enough for an API replica")
	require.Equal(t, 45, n)
	env["ORCH_WORKER_CONCURRENCY"] = "1"
	cfg, err = loadConfig(envOf(env))
	require.NoError(t, err)
	n, err = poolSize(cfg, &all)
	require.NoError(t, err, "5 + 1 + 37 + 2 = 45 fit")
	require.Equal(t, 45, n)
}

// serve refuses to start with too small a pool, before connecting.
func TestServeRefusesSmallPool(t *testing.T) {
	env := map[string]string{"ORCH_DATABASE_URL": "postgresql://u:p@127.0.0.1:1/db",
		"ORCH_MASTER_KEY": keys.GenerateMasterKey(), "ORCH_ADMIN_KEY": keys.Generate(), "ORCH_DATABASE_MAX_CONNS": "10"}
	var stdout, stderr strings.Builder
	err := run([]string{"serve", "--roles=worker"}, &stdout, &stderr, envOf(env))
	require.ErrorContains(t, err, "ORCH_DATABASE_MAX_CONNS=10 is too few for --roles=worker")
}
