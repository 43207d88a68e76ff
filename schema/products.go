package schema

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	orch "github.com/enginefleet/orchestrator"
)

const productCols = `id::text, slug, display_name, policy, created_at, updated_at`

func scanProduct(row pgx.Row) (orch.Product, error) {
	var p orch.Product
	var policy []byte
	if err := row.Scan(&p.ID, &p.Slug, &p.DisplayName, &policy, &p.CreatedAt, &p.UpdatedAt); err != nil {
		if errors.Is(err, pgx.ErrNoRows) {
			return p, orch.Errorf(orch.CodeProductNotFound, "product not found")
		}
		return p, fmt.Errorf("scan product: %w", err)
	}
	if err := json.Unmarshal(policy, &p.Policy); err != nil {
		return p, fmt.Errorf("decode policy of product %s: %w", p.ID, err)
	}
	return p, nil
}

// InsertProduct creates a product. PRODUCT_SLUG_EXISTS when the slug is taken.
func (q *Queries) InsertProduct(ctx context.Context, slug, displayName string, policy orch.Policy, keyHash string) (orch.Product, error) {
	b, err := json.Marshal(policy)
	if err != nil {
		return orch.Product{}, fmt.Errorf("encode policy: %w", err)
	}
	p, err := scanProduct(q.db.QueryRow(ctx, `INSERT INTO products (slug, display_name, policy, api_key_hash)
		VALUES ($1, $2, $3, $4) RETURNING `+productCols, slug, displayName, b, keyHash))
	if isUniqueViolation(err, "products_slug_key") {
		return p, orch.Errorf(orch.CodeProductSlugExists, "a product with slug %q already exists", slug)
	}
	return p, err
}

// GetProduct returns a product by id; PRODUCT_NOT_FOUND if none.
func (q *Queries) GetProduct(ctx context.Context, id string) (orch.Product, error) {
	if !isUUID(id) {
		return orch.Product{}, orch.Errorf(orch.CodeProductNotFound, "product not found")
	}
	return scanProduct(q.db.QueryRow(ctx, `SELECT `+productCols+` FROM products WHERE id = $1`, id))
}

// ListProducts returns products ordered by creation, and the total count.
func (q *Queries) ListProducts(ctx context.Context, limit, offset int) ([]orch.Product, int, error) {
	rows, err := q.db.Query(ctx, `SELECT `+productCols+` FROM products ORDER BY created_at, id LIMIT $1 OFFSET $2`, limit, offset)
	out, err := collect(rows, err, "list products", scanProduct)
	if err != nil {
		return nil, 0, err
	}
	var total int
	if err := q.db.QueryRow(ctx, `SELECT count(*) FROM products`).Scan(&total); err != nil {
		return nil, 0, fmt.Errorf("count products: %w", err)
	}
	return out, total, nil
}

// ProductByKeyHash finds the product whose current platform key, or whose
// previous key still inside its overlap window, hashes to hash. prevExpires
// is set when the match is a previous key. PRODUCT_NOT_FOUND otherwise.
func (q *Queries) ProductByKeyHash(ctx context.Context, hash string) (p orch.Product, prevExpires *time.Time, err error) {
	var isPrev bool
	var exp *time.Time
	var policy []byte
	err = q.db.QueryRow(ctx, `SELECT id::text, slug, display_name, policy, created_at, updated_at,
			api_key_hash <> $1, prev_api_key_expires_at
		FROM products
		WHERE api_key_hash = $1 OR (prev_api_key_hash = $1 AND prev_api_key_expires_at > now())`, hash).
		Scan(&p.ID, &p.Slug, &p.DisplayName, &policy, &p.CreatedAt, &p.UpdatedAt, &isPrev, &exp)
	if errors.Is(err, pgx.ErrNoRows) {
		return p, nil, orch.Errorf(orch.CodeProductNotFound, "no product for that key")
	}
	if err != nil {
		return p, nil, fmt.Errorf("product by key: %w", err)
	}
	if err := json.Unmarshal(policy, &p.Policy); err != nil {
		return p, nil, fmt.Errorf("decode policy of product %s: %w", p.ID, err)
	}
	if isPrev {
		return p, exp, nil
	}
	return p, nil, nil
}

// UpdatePolicy replaces a product's policy; PRODUCT_NOT_FOUND if none.
func (q *Queries) UpdatePolicy(ctx context.Context, id string, policy orch.Policy) (orch.Product, error) {
	if !isUUID(id) {
		return orch.Product{}, orch.Errorf(orch.CodeProductNotFound, "product not found")
	}
	b, err := json.Marshal(policy)
	if err != nil {
		return orch.Product{}, fmt.Errorf("encode policy: %w", err)
	}
	return scanProduct(q.db.QueryRow(ctx, `UPDATE products SET policy = $2, updated_at = now() WHERE id = $1 RETURNING `+productCols, id, b))
}

// RotatePlatformKey makes newHash the product's key; the current key stays
// valid until overlapUntil. PRODUCT_NOT_FOUND if none.
func (q *Queries) RotatePlatformKey(ctx context.Context, id, newHash string, overlapUntil time.Time) (orch.Product, error) {
	if !isUUID(id) {
		return orch.Product{}, orch.Errorf(orch.CodeProductNotFound, "product not found")
	}
	return scanProduct(q.db.QueryRow(ctx, `UPDATE products
		SET prev_api_key_hash = api_key_hash, prev_api_key_expires_at = $3, api_key_hash = $2, updated_at = now()
		WHERE id = $1 RETURNING `+productCols, id, newHash, overlapUntil))
}

func isUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i, c := range s {
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
				return false
			}
		}
	}
	return true
}

// GetProductForUpdate is GetProduct locking the row until the transaction
// ends (a policy update reads the policy it replaces). PRODUCT_NOT_FOUND if none.
func (q *Queries) GetProductForUpdate(ctx context.Context, id string) (orch.Product, error) {
	if !isUUID(id) {
		return orch.Product{}, orch.Errorf(orch.CodeProductNotFound, "product not found")
	}
	return scanProduct(q.db.QueryRow(ctx, `SELECT `+productCols+` FROM products WHERE id = $1 FOR UPDATE`, id))
}
