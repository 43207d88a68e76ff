-- Engines without a host port (the kubernetes backend: a Service gives each
-- engine a stable address, nothing is published on a host) are stored with
-- port 0. The one-port-per-node rule keeps holding for real ports only, so
-- any number of port-less engines share a node; the index keeps the old
-- constraint's name, which the unique-violation mapping matches.
ALTER TABLE engines DROP CONSTRAINT engines_node_port_key;
CREATE UNIQUE INDEX engines_node_port_key ON engines (node, port) WHERE port <> 0;
ALTER TABLE engines ADD CONSTRAINT engines_port_range CHECK (port BETWEEN 0 AND 65535);
