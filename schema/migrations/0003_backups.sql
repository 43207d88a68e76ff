-- Brain backups (docs/backups.md). No foreign key to engines: a backup outlives
-- its engine, so a user's brain can be restored into the engine provisioned
-- after a destroy (disaster recovery looks backups up by product and user).
-- path is relative to ORCH_BACKUP_DIR: <product_id>/<user_id>/<timestamp>.tar.gz.
CREATE TABLE backups (
    id             uuid PRIMARY KEY,
    engine_id      uuid NOT NULL,
    product_id     uuid NOT NULL REFERENCES products (id),
    user_id        text NOT NULL,
    node           text NOT NULL,
    path           text NOT NULL UNIQUE,
    size_bytes     bigint NOT NULL,
    sha256         text NOT NULL,
    engine_version text NOT NULL,
    trigger        text NOT NULL CHECK (trigger IN ('scheduled', 'manual')),
    day            date,          -- scheduled backups: the (UTC) day they belong to
    paused_ms      bigint NOT NULL DEFAULT 0,
    duration_ms    bigint NOT NULL DEFAULT 0,
    operation_id   uuid,          -- manual backups: the operation a request followed
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX backups_user_idx ON backups (product_id, user_id, created_at DESC);
CREATE INDEX backups_created_idx ON backups (created_at);
-- Exactly one scheduled backup per engine per day, whatever the scheduler does.
CREATE UNIQUE INDEX backups_engine_day_key ON backups (engine_id, day) WHERE day IS NOT NULL;

-- Audit exports (docs/backups.md): gzip JSONL files in ORCH_AUDIT_EXPORT_DIR,
-- each with a manifest; seq orders the hash chain (prev_sha256 is the
-- previous export's sha256). Scheduled exports are contiguous ranges.
CREATE TABLE audit_exports (
    id           uuid PRIMARY KEY,
    seq          bigint UNIQUE,                   -- chain position, set when written
    product_id   uuid REFERENCES products (id),   -- only this product's rows; NULL = all
    from_ts      timestamptz NOT NULL,
    to_ts        timestamptz NOT NULL CHECK (to_ts > from_ts),
    trigger      text NOT NULL CHECK (trigger IN ('scheduled', 'manual')),
    tick         timestamptz UNIQUE,              -- scheduled: the scheduler tick (one export per tick)
    status       text NOT NULL CHECK (status IN ('pending', 'running', 'succeeded', 'failed')),
    file         text,                            -- data file name in ORCH_AUDIT_EXPORT_DIR
    sha256       text,
    prev_sha256  text,
    size_bytes   bigint,
    row_count    bigint,
    first_id     bigint,
    last_id      bigint,
    error        text,
    requested_by text NOT NULL,
    purged_rows  bigint NOT NULL DEFAULT 0,       -- audit rows the retention purge deleted, being in this export
    purged_at    timestamptz,                     -- every row of the export is past retention and purged
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX audit_exports_scheduled_idx ON audit_exports (to_ts) WHERE trigger = 'scheduled' AND status = 'succeeded';

-- Exports read the log by time across products.
CREATE INDEX audit_time_idx ON audit_log ("timestamp");
