package main

import (
	"fmt"
	"github.com/enginefleet/orchestrator/server"
	"strings"
)

// Connections each role may need from the process's pgxpool at once.
// Pools open connections as they are needed, so these are ceilings, and
// what a deployment must budget under Postgres's max_connections.
const (
	// apiListenConns: the NOTIFY listener holds one for good.
	apiListenConns = 1
	// apiRequestConns: requests querying at once (a request holds one
	// only while it queries, never while it waits for an operation).
	apiRequestConns = 20
	// apiMinRequestConns: fewer and requests queue for the pool.
	apiMinRequestConns = 4
	// workerOtherQueues: the job slots of the worker's queues besides its
	// node's (ORCH_WORKER_CONCURRENCY): fleet 10, default 10, backups 2
	// (workers.RiverConfig; a test keeps the two in step).
	workerOtherQueues = 22
	// riverOwnConns: River's own (its listener, a fetch per queue, the
	// elector, maintenance) and the worker's upkeep (events; the liveness
	// session is taken from the pool, then held outside it).
	riverOwnConns = 10
	// webhookConns: the webhook dispatcher's LISTEN connection and the
	// bookkeeping of delivery attempts (an attempt holds none while it
	// waits for the endpoint, so a slow one never starves the pool).
	webhookConns = 5
	// schedulerConns: enqueueing ticks (the leader lock has its own
	// connection, outside the pool).
	schedulerConns = 2
	// cliConns: migrate, keys rotate-master, backup list/restore.
	cliConns = 4
)

// poolNeeds is what the roles need from the pool: at least min (a worker
// must have a connection for every job it runs at once, or jobs holding
// one wait forever on those waiting for one), want by default.
func poolNeeds(cfg Config, r server.Roles) (min, want int, why string) {
	var parts []string
	if r.API {
		min += apiListenConns + apiMinRequestConns
		want += apiListenConns + apiRequestConns
		parts = append(parts, fmt.Sprintf("api %d", apiListenConns+apiMinRequestConns))
	}
	if r.Worker {
		n := cfg.WorkerConcurrency + workerOtherQueues + riverOwnConns + webhookConns
		min += n
		want += n
		parts = append(parts, fmt.Sprintf("worker %d = ORCH_WORKER_CONCURRENCY %d + %d for its other queues, webhooks and River's own connections",
			n, cfg.WorkerConcurrency, workerOtherQueues+riverOwnConns+webhookConns))
	}
	if r.Scheduler {
		min += schedulerConns
		want += schedulerConns
		parts = append(parts, fmt.Sprintf("scheduler %d", schedulerConns))
	}
	return min, want, strings.Join(parts, ", ")
}

// poolSize is the pool size for a process running roles:
// ORCH_DATABASE_MAX_CONNS when set (refused when too few for the roles),
// else what they want. A CLI command (nil) needs only a few.
func poolSize(cfg Config, r *server.Roles) (int, error) {
	if r == nil {
		return cliConns, nil
	}
	min, want, why := poolNeeds(cfg, *r)
	if cfg.DatabaseMaxConns == 0 {
		return want, nil
	}
	if cfg.DatabaseMaxConns < min {
		return 0, fmt.Errorf("ORCH_DATABASE_MAX_CONNS=%d is too few for --roles=%s: they need at least %d connections (%s); "+
			"raise it, lower ORCH_WORKER_CONCURRENCY, or unset it to use %d", cfg.DatabaseMaxConns, r, min, why, want)
	}
	return cfg.DatabaseMaxConns, nil
}
