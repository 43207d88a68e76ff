-- The operator console lists the failed operations of the last days, newest
-- first, and counts those of the last hour on every refresh: without this
-- index both would scan every operation ever recorded.
CREATE INDEX operations_failed_idx ON operations (updated_at DESC) WHERE status = 'failed';
