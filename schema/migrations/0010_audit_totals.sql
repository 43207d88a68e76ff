-- Lifetime audit totals per product and action, maintained on insert so
-- GET /metrics answers in O(1) however large the log grows. The retention
-- purge deletes old rows but never decrements: totals stay lifetime totals.
CREATE TABLE audit_totals (
    product_id uuid NOT NULL,
    action     text NOT NULL,
    n          bigint NOT NULL,
    PRIMARY KEY (product_id, action)
);

-- Statement-level, over the transition table: one upsert per (product,
-- action) per INSERT statement, so a bulk insert stays linear.
CREATE FUNCTION audit_totals_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_totals (product_id, action, n)
    SELECT product_id, action, count(*) FROM new_rows
    WHERE product_id IS NOT NULL AND action IN ('provision', 'destroy')
    GROUP BY product_id, action
    ON CONFLICT (product_id, action) DO UPDATE SET n = audit_totals.n + EXCLUDED.n;
    RETURN NULL;
END;
$$;
CREATE TRIGGER audit_log_totals AFTER INSERT ON audit_log
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION audit_totals_count();
