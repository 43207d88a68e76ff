package main

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

func ring(t *testing.T, current string, previous ...string) *keys.Keyring {
	t.Helper()
	kr, err := keys.NewKeyring(current, previous)
	require.NoError(t, err)
	return kr
}

// seedKeys records n engines and one pending rotate-key operation whose
// keys are encrypted by kr, and returns every stored token's plaintext by
// "engine <id>" / "operation <id>".
func seedKeys(t *testing.T, pool *pgxpool.Pool, kr *keys.Keyring, n int) map[string]string {
	t.Helper()
	ctx := context.Background()
	q := schema.New(pool)
	p, err := q.InsertProduct(ctx, "acme", "Acme", orch.Policy{}, keys.Hash(keys.Generate()))
	require.NoError(t, err)
	plain := map[string]string{}
	var last orch.Engine
	for i := range n {
		key := keys.Generate()
		enc, err := kr.Encrypt(key)
		require.NoError(t, err)
		last = orch.Engine{ID: uuid.NewString(), ProductID: p.ID, UserID: fmt.Sprintf("user-%d", i), Status: orch.StateRunning,
			Node: "local", Port: 10000 + i, EngineVersion: "enginefleet/engine:test", KeyHash: keys.Hash(key), KeyEnc: enc}
		require.NoError(t, q.InsertEngine(ctx, last))
		plain["engine "+last.ID] = key
	}
	key := keys.Generate()
	enc, err := kr.Encrypt(key)
	require.NoError(t, err)
	op := orch.Operation{ID: uuid.NewString(), ProductID: p.ID, EngineID: last.ID, UserID: last.UserID, Kind: orch.OpRotateKey, Actor: "acme"}
	require.NoError(t, q.InsertOperation(ctx, op, schema.OpPayload{KeyHash: keys.Hash(key), KeyEnc: enc}, 0))
	plain["operation "+op.ID] = key
	return plain
}

// storedTokens reads every stored key token, by "engine <id>" / "operation <id>".
func storedTokens(t *testing.T, pool *pgxpool.Pool) map[string]string {
	t.Helper()
	rows, err := pool.Query(context.Background(), `SELECT 'engine ' || id, engine_key_enc FROM engines
		UNION ALL SELECT 'operation ' || id, payload->>'key_enc' FROM operations WHERE payload ? 'key_enc'`)
	require.NoError(t, err)
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var id, tok string
		require.NoError(t, rows.Scan(&id, &tok))
		out[id] = tok
	}
	require.NoError(t, rows.Err())
	return out
}

func currentCount(kr *keys.Keyring, toks map[string]string) int {
	n := 0
	for _, tok := range toks {
		if kr.IsCurrent(tok) {
			n++
		}
	}
	return n
}

// rotationAudits returns the metadata of every master_key_rotated row.
func rotationAudits(t *testing.T, pool *pgxpool.Pool) []map[string]any {
	t.Helper()
	rows, err := pool.Query(context.Background(), `SELECT actor, metadata FROM audit_log WHERE action = 'master_key_rotated' ORDER BY id`)
	require.NoError(t, err)
	defer rows.Close()
	var out []map[string]any
	for rows.Next() {
		var actor string
		var md map[string]any
		require.NoError(t, rows.Scan(&actor, &md))
		require.Equal(t, orch.ActorAdmin, actor)
		out = append(out, md)
	}
	return out
}

// cancelAfterFirstLine cancels a context when the first progress line is
// written: the re-encryption is killed right after its first batch.
type cancelAfterFirstLine struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	cancel context.CancelFunc
}

func (w *cancelAfterFirstLine) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.cancel()
	return w.buf.Write(p)
}

func TestRotateMasterResumes(t *testing.T) {
	t.Parallel()
	pool := testenv.Pool(t, testenv.DB(t))
	a, b := keys.GenerateMasterKey(), keys.GenerateMasterKey()
	plain := seedKeys(t, pool, ring(t, a), 250)
	cfg := Config{MasterKey: b, MasterKeyPrev: []string{a}}
	ringB := ring(t, b)

	// Killed after the first batch of 100.
	ctx, cancel := context.WithCancel(context.Background())
	w := &cancelAfterFirstLine{cancel: cancel}
	err := rotateMaster(ctx, cfg, pool, testenv.Quiet(), w)
	require.ErrorIs(t, err, context.Canceled)
	require.Contains(t, w.buf.String(), "run it again")
	require.Equal(t, rotateBatch, currentCount(ringB, storedTokens(t, pool)), "exactly the first batch is re-encrypted")
	md := rotationAudits(t, pool)
	require.Len(t, md, 1)
	require.Equal(t, false, md[0]["completed"])
	require.Equal(t, float64(rotateBatch), md[0]["reencrypted"])

	// The rerun finishes.
	var out bytes.Buffer
	require.NoError(t, rotateMaster(context.Background(), cfg, pool, testenv.Quiet(), &out))
	require.Contains(t, out.String(), "done: 150 engine keys and 1 operation keys re-encrypted")
	toks := storedTokens(t, pool)
	require.Len(t, toks, len(plain))
	for id, tok := range toks {
		got, err := ringB.Decrypt(tok) // B alone opens every stored key
		require.NoError(t, err, id)
		require.Equal(t, plain[id], got, id)
	}
	md = rotationAudits(t, pool)
	require.Len(t, md, 2)
	require.Equal(t, true, md[1]["completed"])
	require.Equal(t, float64(150), md[1]["reencrypted"])
	require.Equal(t, float64(1), md[1]["operations_reencrypted"])

	// Nothing left: a third run re-encrypts nothing and changes nothing.
	out.Reset()
	require.NoError(t, rotateMaster(context.Background(), cfg, pool, testenv.Quiet(), &out))
	require.Contains(t, out.String(), "done: 0 engine keys and 0 operation keys re-encrypted")
	require.Equal(t, toks, storedTokens(t, pool))

	// The key material never appears in the progress output.
	for _, k := range []string{a, b} {
		require.NotContains(t, w.buf.String()+out.String(), k)
	}
}

func TestRotateMasterUndecryptable(t *testing.T) {
	t.Parallel()
	pool := testenv.Pool(t, testenv.DB(t))
	a, b, lost := keys.GenerateMasterKey(), keys.GenerateMasterKey(), keys.GenerateMasterKey()
	seedKeys(t, pool, ring(t, a), 5)
	tok, err := ring(t, lost).Encrypt("orphan")
	require.NoError(t, err)
	var id string
	require.NoError(t, pool.QueryRow(context.Background(), `UPDATE engines SET engine_key_enc = $1
		WHERE id = (SELECT min(id::text)::uuid FROM engines) RETURNING id::text`, tok).Scan(&id))

	var out bytes.Buffer
	err = rotateMaster(context.Background(), Config{MasterKey: b, MasterKeyPrev: []string{a}}, pool, testenv.Quiet(), &out)
	require.ErrorContains(t, err, "1 stored keys cannot be decrypted")
	require.ErrorContains(t, err, "engine "+id)
	toks := storedTokens(t, pool)
	require.Equal(t, tok, toks["engine "+id], "an undecryptable token is left alone")
	require.Equal(t, len(toks)-1, currentCount(ring(t, b), toks), "every other key is re-encrypted")
}

func TestRotateMasterCommand(t *testing.T) {
	t.Parallel()
	dbURL := testenv.DB(t)
	pool := testenv.Pool(t, dbURL)
	a, b := keys.GenerateMasterKey(), keys.GenerateMasterKey()
	seedKeys(t, pool, ring(t, a), 3)
	var stdout, stderr bytes.Buffer
	err := run([]string{"keys", "rotate-master"}, &stdout, &stderr, envOf(map[string]string{
		"ORCH_DATABASE_URL": dbURL, "ORCH_MASTER_KEY": b, "ORCH_MASTER_KEY_PREVIOUS": a,
		"ORCH_ADMIN_KEY": strings.Repeat("k", 32), "ORCH_LOG_LEVEL": "error",
	}))
	require.NoError(t, err, stderr.String())
	require.Contains(t, stdout.String(), "done: 3 engine keys and 1 operation keys re-encrypted")
	require.Equal(t, 4, currentCount(ring(t, b), storedTokens(t, pool)))
}

// TestServeRefusesForeignMasterKey: starting with a master key that opens
// none of the stored engine keys is refused, never a silent fleet-wide
// key loss.
func TestServeRefusesForeignMasterKey(t *testing.T) {
	t.Parallel()
	dbURL := testenv.DB(t)
	pool := testenv.Pool(t, dbURL)
	ctx := context.Background()
	a, b := keys.GenerateMasterKey(), keys.GenerateMasterKey()

	require.NoError(t, checkKeyring(ctx, pool, ring(t, b)), "an empty fleet accepts any key")
	seedKeys(t, pool, ring(t, a), 3)
	err := checkKeyring(ctx, pool, ring(t, b))
	require.ErrorContains(t, err, "refusing to start")
	require.ErrorContains(t, err, "ORCH_MASTER_KEY_PREVIOUS")
	require.NotContains(t, err.Error(), b)
	require.NoError(t, checkKeyring(ctx, pool, ring(t, b, a)), "the old key as previous: start")
	require.NoError(t, checkKeyring(ctx, pool, ring(t, a)))

	// The serve command stops there, before any role starts.
	var stdout, stderr bytes.Buffer
	err = run([]string{"serve", "--roles=api"}, &stdout, &stderr, envOf(map[string]string{
		"ORCH_DATABASE_URL": dbURL, "ORCH_MASTER_KEY": b, "ORCH_ADMIN_KEY": strings.Repeat("k", 32),
		"ORCH_LOG_LEVEL": "error", "ORCH_LISTEN_ADDR": "127.0.0.1:0",
	}))
	require.ErrorContains(t, err, "refusing to start")
}
