// Package schema owns the database: the embedded SQL migrations (ours and
// River's, applied under an advisory lock) and Queries, the only code that
// holds SQL. The core queries (engines, operations, worker liveness and
// leases) are named SQL in queries/*.sql, turned into Go by sqlc into
// internal/dbsqlc (`make gen`); the rest are hand-written here. Either way
// callers see domain types: Queries take a DBTX (pool, connection or
// transaction) so callers compose transactions, and pgx.ErrNoRows becomes
// a domain error (ENGINE_NOT_FOUND, OPERATION_NOT_FOUND, ...) here.
package schema
