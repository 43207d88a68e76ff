-- This database's fleet id, one row. Workers put it on every container and
-- volume they create (label orchestrator.fleet) and only ever consider
-- their own fleet's, so deployments sharing a Docker host never touch each
-- other's engines, whatever their ORCH_NODE. A restore of this database
-- keeps the id (the restored deployment adopts its engines); a copy made to
-- run a second deployment must get its own:
--   UPDATE fleet SET id = gen_random_uuid();
CREATE TABLE fleet (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    id         uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO fleet DEFAULT VALUES;
