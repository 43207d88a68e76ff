-- Fleet upkeep (health sweeps, auto-restart, idle sleep, the scheduler).

-- The last tick each schedule enqueued. A newly elected scheduler leader
-- replays the ticks missed during a hand-over from here; the River jobs
-- themselves are unique per period, so replaying one twice is harmless.
CREATE TABLE scheduler_ticks (
    schedule   text PRIMARY KEY,
    last_tick  timestamptz NOT NULL,
    leader     text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The River job that works an operation, when something may need to
-- cancel it: a manual start/restart/stop/destroy cancels a pending
-- auto-restart in its own transaction.
ALTER TABLE operations ADD COLUMN job_id bigint;

-- Health sweeps list the running engines node by node.
CREATE INDEX engines_running_node_idx ON engines (node, id) WHERE status = 'running';
