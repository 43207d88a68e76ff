-- Worker liveness and fencing: a killed worker's jobs are re-queued in
-- seconds, not after River's stuck-job rescue, and a retried attempt never
-- overlaps the attempt it replaces.

-- One row per worker process (its River client id). The process holds the
-- session-level advisory lock (worker_lock_space, lock_key) on a dedicated
-- connection and refreshes seen_at and running (the job ids it is working,
-- plus those it finished moments ago) every second. A process whose lock is
-- free and whose seen_at is stale is dead: its running jobs are re-queued.
CREATE TABLE worker_sessions (
    id         text PRIMARY KEY,
    node       text NOT NULL,
    lock_key   integer NOT NULL,
    hostname   text NOT NULL DEFAULT '',
    pid        integer NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now(),
    running    bigint[] NOT NULL DEFAULT '{}'
);

-- worker_session_locked reports whether a session's advisory lock is held
-- (on this database): the lock goes with its connection, so a free lock
-- means the process is gone or lost its connection. 1869767543 is "orcw".
CREATE FUNCTION worker_session_locked(lock_key integer) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted
          AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
          AND l.classid = 1869767543::oid AND l.objid = lock_key::oid AND l.objsubid = 2)
$$;

-- The engine lease names the attempt that holds it, not only the job: a
-- retry of the same job is a different attempt and waits for (or, when its
-- worker died, replaces) the one before. lease_owner is the worker session.
ALTER TABLE engines ADD COLUMN lease_attempt integer;
ALTER TABLE engines ADD COLUMN lease_owner text;
CREATE INDEX engines_lease_owner_idx ON engines (lease_owner) WHERE lease_owner IS NOT NULL;

-- Every operation ends by its deadline whatever happens to its job: the
-- operation sweep fails (or, for destroy, finishes) an unfinished operation
-- whose job is finalised or gone, or whose deadline passed.
ALTER TABLE operations ADD COLUMN deadline timestamptz;
CREATE INDEX operations_unfinished_idx ON operations (created_at) WHERE status IN ('pending', 'running');
