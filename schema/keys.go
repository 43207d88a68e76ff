package schema

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// KeyToken is one stored engine-key Fernet token and the id of the row
// holding it (an engine, or an operation whose payload carries a new key).
type KeyToken struct {
	ID    string
	Token string
}

// firstUUID sorts before every uuid: where a key re-encryption starts.
const firstUUID = "00000000-0000-0000-0000-000000000000"

// LockEngineKeys locks and returns up to limit engines' key tokens with id
// after `after` ("" = from the start), in id order, until the transaction
// ends. Master-key rotation walks the table with it in batches, so it only
// ever holds a batch of row locks and can resume anywhere.
func (q *Queries) LockEngineKeys(ctx context.Context, after string, limit int) ([]KeyToken, error) {
	if after == "" {
		after = firstUUID
	}
	return collectTokens(q.db.Query(ctx, `SELECT id::text, engine_key_enc FROM engines
		WHERE id > $1::uuid ORDER BY id LIMIT $2 FOR UPDATE`, after, limit))
}

// SetEngineKeyEnc replaces an engine's key token (same key, new encryption).
func (q *Queries) SetEngineKeyEnc(ctx context.Context, id, token string) error {
	if _, err := q.db.Exec(ctx, `UPDATE engines SET engine_key_enc = $2 WHERE id = $1`, id, token); err != nil {
		return fmt.Errorf("update engine key token: %w", err)
	}
	return nil
}

// LockOperationKeys is LockEngineKeys for operations whose payload carries
// an encrypted key (a rotate-key's new key, applied to the engine later).
func (q *Queries) LockOperationKeys(ctx context.Context, after string, limit int) ([]KeyToken, error) {
	if after == "" {
		after = firstUUID
	}
	return collectTokens(q.db.Query(ctx, `SELECT id::text, payload->>'key_enc' FROM operations
		WHERE id > $1::uuid AND coalesce(payload->>'key_enc', '') <> '' ORDER BY id LIMIT $2 FOR UPDATE`, after, limit))
}

// SetOperationKeyEnc replaces the key token in an operation's payload.
func (q *Queries) SetOperationKeyEnc(ctx context.Context, id, token string) error {
	if _, err := q.db.Exec(ctx, `UPDATE operations SET payload = jsonb_set(payload, '{key_enc}', to_jsonb($2::text)) WHERE id = $1`,
		id, token); err != nil {
		return fmt.Errorf("update operation key token: %w", err)
	}
	return nil
}

func collectTokens(rows pgx.Rows, err error) ([]KeyToken, error) {
	if err != nil {
		return nil, fmt.Errorf("lock key tokens: %w", err)
	}
	defer rows.Close()
	var out []KeyToken
	for rows.Next() {
		var t KeyToken
		if err := rows.Scan(&t.ID, &t.Token); err != nil {
			return nil, fmt.Errorf("scan key token: %w", err)
		}
		out = append(out, t)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("lock key tokens: %w", err)
	}
	return out, nil
}

// SampleEngineKeyTokens returns up to n random engine_key_enc tokens: the
// start-up check that the master keyring still opens stored keys.
func (q *Queries) SampleEngineKeyTokens(ctx context.Context, n int) ([]string, error) {
	rows, err := q.db.Query(ctx, `SELECT engine_key_enc FROM engines ORDER BY random() LIMIT $1`, n)
	if err != nil {
		return nil, fmt.Errorf("sample engine keys: %w", err)
	}
	toks, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("sample engine keys: %w", err)
	}
	return toks, nil
}
