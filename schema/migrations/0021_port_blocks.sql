-- Host ports a node refused (another program listens there, or a container
-- this database does not know publishes it). The port allocator skips a
-- blocked port until blocked_until, so a port freed meanwhile comes back.
-- Written by workers when an engine's start fails on its port, in the
-- transaction that moves the engine to a free port (under the node's port
-- lock).
CREATE TABLE port_blocks (
    node          text NOT NULL,
    port          integer NOT NULL,
    reason        text NOT NULL,
    blocked_until timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (node, port)
);
