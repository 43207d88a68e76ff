-- Products (tenants). Platform keys are stored only as SHA-256 hex; during a
-- rotation overlap the previous hash keeps working until it expires.
CREATE TABLE products (
    id                      uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    slug                    text NOT NULL UNIQUE,
    display_name            text NOT NULL,
    policy                  jsonb NOT NULL DEFAULT '{}',
    api_key_hash            text NOT NULL UNIQUE,
    prev_api_key_hash       text UNIQUE,
    prev_api_key_expires_at timestamptz,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);

-- One engine per (product, user). The port is unique per node, enforced
-- here so concurrent provisions on several replicas can never share one.
CREATE TABLE engines (
    id                   uuid PRIMARY KEY,
    product_id           uuid NOT NULL REFERENCES products (id),
    user_id              text NOT NULL,
    status               text NOT NULL CHECK (status IN ('provisioning','running','sleeping','stopped','failed','destroying')),
    node                 text NOT NULL DEFAULT 'local',
    port                 integer NOT NULL,
    engine_version       text NOT NULL,
    engine_key_hash      text NOT NULL,
    engine_key_enc       text NOT NULL,
    prev_key_hash        text,
    prev_key_expires_at  timestamptz,
    boot_duration_ms     bigint,
    health_failures      integer NOT NULL DEFAULT 0,
    restart_attempts     integer NOT NULL DEFAULT 0,
    last_health_at       timestamptz,
    last_active_at       timestamptz,
    sleep_reason         text,
    slept_at             timestamptz,
    state_deadline       timestamptz,
    operation_id         uuid,
    lease_job_id         bigint,      -- the River job currently working on this engine
    lease_until          timestamptz, -- lease expiry, so a dead worker's lease lapses
    last_error           text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (product_id, user_id),
    UNIQUE (node, port)
);
CREATE INDEX engines_product_status_idx ON engines (product_id, status);
CREATE INDEX engines_status_idx ON engines (status);
CREATE INDEX engines_deadline_idx ON engines (state_deadline) WHERE state_deadline IS NOT NULL;

-- Lifecycle operations: what a waiting request or GET /operations/{id}
-- reads. engine_id has no foreign key: a destroy's operation outlives the row.
CREATE TABLE operations (
    id            uuid PRIMARY KEY,
    product_id    uuid NOT NULL REFERENCES products (id),
    engine_id     uuid NOT NULL,
    user_id       text NOT NULL,
    kind          text NOT NULL,
    status        text NOT NULL CHECK (status IN ('pending','running','succeeded','failed')),
    actor         text NOT NULL,
    error_code    text,
    error_message text,
    payload       jsonb NOT NULL DEFAULT '{}', -- per-kind inputs: new key (encrypted), image
    result        jsonb NOT NULL DEFAULT '{}', -- per-kind outputs shown to GET /operations
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX operations_engine_idx ON operations (engine_id, created_at DESC);

-- The audit log: append-only. Only the retention purge, which sets
-- orchestrator.audit_purge = 'on' in its transaction, may delete.
CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    "timestamp" timestamptz NOT NULL DEFAULT clock_timestamp(),
    product_id  uuid,
    user_id     text,
    engine_id   uuid,
    action      text NOT NULL,
    actor       text NOT NULL,
    metadata    jsonb NOT NULL DEFAULT '{}',
    duration_ms bigint
);
CREATE INDEX audit_product_time_idx ON audit_log (product_id, "timestamp");
CREATE INDEX audit_product_action_time_idx ON audit_log (product_id, action, "timestamp");
CREATE INDEX audit_product_user_time_idx ON audit_log (product_id, user_id, "timestamp");

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('orchestrator.audit_purge', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

-- Admit rate limiting shared by every API replica: one counter per product
-- per minute window. Replicas lease permits in small batches.
CREATE TABLE rate_windows (
    product_id   uuid NOT NULL,
    window_start timestamptz NOT NULL,
    used         integer NOT NULL,
    PRIMARY KEY (product_id, window_start)
);
