-- Fleet rollouts: a new engine image reaches a product's engines (or every
-- engine) in health-gated waves through the per-engine upgrade operation,
-- and rolls itself back when a wave exceeds its failure budget. A rollout
-- is these rows plus its driver job (rollout_drive): any process may die
-- and the next attempt of the driver carries on from the rows.
CREATE TABLE rollouts (
    id              uuid PRIMARY KEY,
    product_id      uuid REFERENCES products (id), -- NULL: every product's engines
    image           text NOT NULL,
    status          text NOT NULL CHECK (status IN ('running','paused','rolling_back','completed','rolled_back','aborted')),
    waves           integer[] NOT NULL,            -- engines per wave, resolved at creation
    bake_seconds    integer NOT NULL CHECK (bake_seconds >= 0),
    failure_budget  integer NOT NULL CHECK (failure_budget >= 0), -- failures a wave tolerates
    max_concurrent  integer NOT NULL CHECK (max_concurrent > 0),
    in_use_seconds  integer NOT NULL CHECK (in_use_seconds >= 0), -- "in use": activity this recent
    current_wave    integer NOT NULL DEFAULT 0,    -- 0-based index into waves
    wave_started_at timestamptz,
    wave_done_at    timestamptz,                   -- the wave's engines are all settled: baking since
    stop_reason     text,                          -- why it stopped (paused, rolled back, aborted)
    actor           text NOT NULL,
    progress_at     timestamptz NOT NULL DEFAULT now(), -- an engine or a wave last moved (stuck-rollout alert)
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
CREATE INDEX rollouts_created_idx ON rollouts (created_at DESC);
CREATE INDEX rollouts_active_idx ON rollouts (id) WHERE status IN ('running','paused','rolling_back');

-- One row per engine a rollout covers (those not already on its image when
-- it was created), with its wave. status:
--   pending       not started
--   upgrading     its upgrade operation is in flight (operation_id)
--   upgraded      on the new image
--   lazy          sleeping or stopped: upgraded by its next wake/start
--   failed        its upgrade failed, or it went unhealthy/crashed after it (counts against the budget)
--   skipped       not upgraded: destroyed, or failed before the rollout reached it
--   rolling_back  its rollback upgrade (to from_image) is in flight
--   rolled_back   back on from_image
--   rollback_lazy sleeping: goes back to from_image on its next wake/start
--   rollback_failed its rollback did not boot (the engine is failed; its brain is kept)
--   cancelled     the rollout ended before this engine was upgraded
CREATE TABLE rollout_engines (
    rollout_id   uuid NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    engine_id    uuid NOT NULL,   -- no foreign key: an engine may be destroyed meanwhile
    product_id   uuid NOT NULL,
    user_id      text NOT NULL,
    wave         integer NOT NULL,
    from_image   text NOT NULL,
    status       text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending','upgrading','upgraded','lazy','failed',
                     'skipped','rolling_back','rolled_back','rollback_lazy','rollback_failed','cancelled')),
    operation_id uuid,
    error        text,
    -- active: the rollout still owns this engine (it may upgrade it, roll it
    -- back, or hand it a new image on wake).
    active       boolean NOT NULL DEFAULT true,
    upgraded_at  timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rollout_id, engine_id)
);
-- Two rollouts over the same engine can never run at once: creating one
-- that covers an engine another still owns fails on this index.
CREATE UNIQUE INDEX rollout_engines_one_active ON rollout_engines (engine_id) WHERE active;
CREATE INDEX rollout_engines_wave_idx ON rollout_engines (rollout_id, wave, status);
