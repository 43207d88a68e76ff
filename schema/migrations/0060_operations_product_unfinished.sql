-- A product's unfinished operations, counted (up to a bound) at every
-- enqueue to set its job's priority: a product with many operations in
-- flight queues behind one with few (lifecycle.Enqueue).
CREATE INDEX operations_product_unfinished_idx ON operations (product_id) WHERE status IN ('pending', 'running');
