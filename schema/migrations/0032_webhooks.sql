-- Signed lifecycle webhooks (webhooks package, docs/webhooks.md).
--
-- An endpoint is a product's URL with the event types it wants and its
-- signing secret (a Fernet token under the master keyring, like engine
-- keys; the previous secret keeps signing until previous_expires_at during
-- a rotation).
CREATE TABLE webhook_endpoints (
    id                  uuid PRIMARY KEY,
    product_id          uuid NOT NULL REFERENCES products (id) ON DELETE CASCADE,
    url                 text NOT NULL,
    description         text NOT NULL DEFAULT '',
    event_types         text[] NOT NULL DEFAULT '{}', -- empty = every type
    secret_enc          text NOT NULL,
    previous_secret_enc text,
    previous_expires_at timestamptz,
    status              text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'failing')),
    failing_since       timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_product_idx ON webhook_endpoints (product_id);

-- One event per audit row that means something to a product. seq is the
-- audit row's id: the order of events within an engine's lane.
CREATE TABLE webhook_events (
    id          uuid PRIMARY KEY,
    seq         bigint NOT NULL,
    product_id  uuid NOT NULL,
    type        text NOT NULL,
    user_id     text,
    engine_id   uuid,
    occurred_at timestamptz NOT NULL,
    data        jsonb NOT NULL
);

-- One delivery per (event, endpoint). A lane is an endpoint's events of
-- one engine: at most one delivery of a lane is queued (has a River job)
-- at a time, and the lane's oldest undelivered one goes first.
CREATE TABLE webhook_deliveries (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    event_id         uuid NOT NULL REFERENCES webhook_events (id) ON DELETE CASCADE,
    endpoint_id      uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    product_id       uuid NOT NULL,
    lane             text NOT NULL,
    seq              bigint NOT NULL,
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'queued', 'delivered', 'failed')),
    job_id           bigint, -- the River job of a queued delivery
    attempts         integer NOT NULL DEFAULT 0,
    redelivery_of    uuid,
    last_attempt_at  timestamptz,
    next_attempt_at  timestamptz,
    response_status  integer,
    response_excerpt text,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
CREATE INDEX webhook_deliveries_open_idx ON webhook_deliveries (endpoint_id, lane, seq) WHERE state IN ('pending', 'queued');
CREATE INDEX webhook_deliveries_pending_idx ON webhook_deliveries (seq) WHERE state = 'pending';
CREATE UNIQUE INDEX webhook_deliveries_lane_queued_idx ON webhook_deliveries (endpoint_id, lane) WHERE state = 'queued';
CREATE INDEX webhook_deliveries_endpoint_idx ON webhook_deliveries (endpoint_id, created_at DESC);
CREATE INDEX webhook_deliveries_event_idx ON webhook_deliveries (event_id);

-- webhook_event_type is the one mapping from an audit row to a webhook
-- event type (NULL = no event). webhooks.Types lists the same names; a
-- test writes each action and checks what comes out. Rollouts: an audit
-- action rollout_<what> becomes rollout.<what>.
CREATE FUNCTION webhook_event_type(action text, md jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN action = 'provision' AND NOT md ? 'error_code' THEN 'engine.provisioned'
        WHEN action = 'provision_failed' THEN 'engine.failed'
        WHEN action IN ('provision', 'start', 'wake', 'restart', 'upgrade') AND md ? 'error_code' THEN 'engine.failed'
        WHEN action = 'health_failed' THEN 'engine.crashed'
        WHEN action = 'health_check' AND md->>'reason' = 'crash' THEN 'engine.crashed'
        WHEN action IN ('restart', 'auto_restart_success') THEN 'engine.restarted'
        WHEN action = 'auto_restart_gave_up' THEN 'engine.gave_up'
        WHEN action = 'sleep' THEN 'engine.slept'
        WHEN action = 'wake' THEN 'engine.woke'
        WHEN action = 'upgrade' THEN 'engine.upgraded'
        WHEN action = 'destroy' AND NOT md ? 'error_code' THEN 'engine.destroyed'
        WHEN action = 'backup' AND md ? 'pruned' THEN NULL
        WHEN action = 'backup' AND md ? 'error_code' THEN 'backup.failed'
        WHEN action = 'backup' THEN 'backup.completed'
        WHEN action = 'restore' AND NOT md ? 'error_code' THEN 'restore.completed'
        WHEN action LIKE 'rollout\_%' THEN 'rollout.' || substr(action, 9)
    END
$$;

-- The event and its deliveries are written by the audit row's own
-- transaction: a rolled-back operation sends nothing, a committed one
-- cannot lose its event. A product without endpoints pays one index probe.
CREATE FUNCTION audit_log_webhooks() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    t  text;
    ev uuid;
BEGIN
    IF NEW.product_id IS NULL THEN
        RETURN NULL;
    END IF;
    t := webhook_event_type(NEW.action, NEW.metadata);
    IF t IS NULL OR NOT EXISTS (SELECT 1 FROM webhook_endpoints
            WHERE product_id = NEW.product_id AND (event_types = '{}' OR t = ANY (event_types))) THEN
        RETURN NULL;
    END IF;
    ev := gen_random_uuid();
    INSERT INTO webhook_events (id, seq, product_id, type, user_id, engine_id, occurred_at, data)
    VALUES (ev, NEW.id, NEW.product_id, t, NEW.user_id, NEW.engine_id, NEW."timestamp",
            NEW.metadata || jsonb_build_object('action', NEW.action, 'actor', NEW.actor)
                || CASE WHEN NEW.duration_ms IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('duration_ms', NEW.duration_ms) END);
    INSERT INTO webhook_deliveries (event_id, endpoint_id, product_id, lane, seq)
    SELECT ev, e.id, NEW.product_id, coalesce(NEW.engine_id::text, ''), NEW.id
    FROM webhook_endpoints e
    WHERE e.product_id = NEW.product_id AND (e.event_types = '{}' OR t = ANY (e.event_types));
    PERFORM pg_notify('orch_webhooks', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER audit_log_webhooks AFTER INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_webhooks();
