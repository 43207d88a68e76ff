-- River's job table as far as our queries read it (River's migrations
-- create the real one). For sqlc only: never applied.
CREATE TYPE river_job_state AS ENUM ('available', 'cancelled', 'completed', 'discarded', 'pending', 'retryable', 'running', 'scheduled');
CREATE TABLE river_job (
    id bigserial PRIMARY KEY,
    state river_job_state NOT NULL,
    attempt smallint NOT NULL,
    max_attempts smallint NOT NULL,
    attempted_at timestamptz,
    attempted_by text[],
    created_at timestamptz NOT NULL,
    errors jsonb[],
    finalized_at timestamptz,
    kind text NOT NULL,
    metadata jsonb NOT NULL,
    scheduled_at timestamptz NOT NULL
);
