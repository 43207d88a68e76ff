// Package schema owns the database: embedded SQL migrations (ours and
// River's, applied under an advisory lock) and the Store, the only code that
// holds SQL. Queries take a DBTX (pool or transaction) so callers compose
// transactions; pgx.ErrNoRows becomes a domain error here.
package schema
