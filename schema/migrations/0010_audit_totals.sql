-- Lifetime audit totals per product and action, maintained on insert so
-- GET /metrics answers in O(1) however large the log grows. The retention
-- purge deletes old rows but never decrements: totals stay lifetime totals.
CREATE TABLE audit_totals (
    product_id uuid NOT NULL,
    action     text NOT NULL,
    n          bigint NOT NULL,
    PRIMARY KEY (product_id, action)
);

CREATE FUNCTION audit_totals_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.product_id IS NOT NULL AND NEW.action IN ('provision', 'destroy') THEN
        INSERT INTO audit_totals (product_id, action, n) VALUES (NEW.product_id, NEW.action, 1)
        ON CONFLICT (product_id, action) DO UPDATE SET n = audit_totals.n + 1;
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER audit_log_totals AFTER INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_totals_count();
