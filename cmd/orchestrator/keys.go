package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

// rotateBatch is how many rows one re-encryption transaction locks.
const rotateBatch = 100

// rotateMaster re-encrypts every stored engine key not already under the
// current master key (ORCH_MASTER_KEY), opening it with the current or a
// previous one (ORCH_MASTER_KEY_PREVIOUS): every engines.engine_key_enc,
// and the new keys that pending rotate-key operations carry. It is safe
// while the API serves (batches of rotateBatch rows in id order, each
// locked only for its own short transaction) and resumable: it only
// rewrites rows that are not current, so a rerun after a crash finishes
// the job. Progress goes to out; one master_key_rotated audit row records
// the run. Tokens that no key of the ring opens are left alone and make it
// fail at the end, naming the rows.
//
// Roll every replica onto the new ORCH_MASTER_KEY (with the old key in
// ORCH_MASTER_KEY_PREVIOUS) before running it, so nothing writes under the
// old key meanwhile; then drop ORCH_MASTER_KEY_PREVIOUS.
func rotateMaster(ctx context.Context, cfg Config, pool *pgxpool.Pool, log *slog.Logger, out io.Writer) error {
	kr, err := keys.NewKeyring(cfg.MasterKey, cfg.MasterKeyPrev)
	if err != nil {
		return err
	}
	start := time.Now()
	st, err := reencryptKeys(ctx, pool, kr, rotateBatch, out)
	md := map[string]any{"reencrypted": st.engines, "operations_reencrypted": st.operations,
		"scanned": st.scanned, "undecryptable": len(st.undecryptable), "completed": err == nil}
	if st.engines+st.operations > 0 || err == nil {
		// Audit even an interrupted run that changed rows: every action is recorded.
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		ms := time.Since(start).Milliseconds()
		aerr := schema.New(pool).InsertAudit(actx, orch.AuditEntry{Action: orch.ActionMasterKeyRotated, Actor: orch.ActorAdmin,
			Metadata: md, DurationMS: &ms})
		cancel()
		if aerr != nil {
			err = errors.Join(err, aerr)
		}
	}
	if err != nil {
		fmt.Fprintf(out, "interrupted after re-encrypting %d engine keys and %d operation keys; run it again to finish\n", st.engines, st.operations)
		return fmt.Errorf("rotate master key: %w", err)
	}
	fmt.Fprintf(out, "done: %d engine keys and %d operation keys re-encrypted, %d rows scanned\n", st.engines, st.operations, st.scanned)
	log.Info("master key rotated", "reencrypted", st.engines, "operations_reencrypted", st.operations, "scanned", st.scanned)
	if n := len(st.undecryptable); n > 0 {
		ids := st.undecryptable[:min(n, 10)]
		return fmt.Errorf("%d stored keys cannot be decrypted by ORCH_MASTER_KEY or ORCH_MASTER_KEY_PREVIOUS and were left as they are (%s): "+
			"add the master key they were written under to ORCH_MASTER_KEY_PREVIOUS and run it again", n, strings.Join(ids, ", "))
	}
	return nil
}

type rotateStats struct {
	scanned, engines, operations int
	undecryptable                []string // "engine <id>" / "operation <id>"
}

// keyTable is one place engine-key tokens are stored.
type keyTable struct {
	name string
	lock func(q *schema.Queries, ctx context.Context, after string, limit int) ([]schema.KeyToken, error)
	set  func(q *schema.Queries, ctx context.Context, id, token string) error
}

var keyTables = []keyTable{
	{"engine", (*schema.Queries).LockEngineKeys, (*schema.Queries).SetEngineKeyEnc},
	{"operation", (*schema.Queries).LockOperationKeys, (*schema.Queries).SetOperationKeyEnc},
}

// reencryptKeys walks every key table in id order, batch rows per
// transaction, re-encrypting tokens not under the current key. It repeats
// the walk until one re-encrypts nothing (a replica still on the old key
// may have written a row behind it), at most a few times.
func reencryptKeys(ctx context.Context, pool *pgxpool.Pool, kr *keys.Keyring, batch int, out io.Writer) (rotateStats, error) {
	var st rotateStats
	for pass := 1; pass <= 3; pass++ {
		changed := 0
		st.undecryptable = st.undecryptable[:0]
		for _, t := range keyTables {
			n, err := reencryptTable(ctx, pool, kr, t, batch, pass, &st, out)
			changed += n
			if err != nil {
				return st, err
			}
		}
		if changed == 0 {
			return st, nil
		}
	}
	return st, nil
}

func reencryptTable(ctx context.Context, pool *pgxpool.Pool, kr *keys.Keyring, t keyTable, batch, pass int, st *rotateStats, out io.Writer) (int, error) {
	after, changed := "", 0
	for nb := 1; ; nb++ {
		if err := ctx.Err(); err != nil {
			return changed, err
		}
		var rows, done int
		var bad []string
		err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			rows, done, bad = 0, 0, nil
			q := schema.New(tx)
			toks, err := t.lock(q, ctx, after, batch)
			if err != nil {
				return err
			}
			for _, tok := range toks {
				rows++
				after = tok.ID
				if kr.IsCurrent(tok.Token) {
					continue
				}
				plain, err := kr.Decrypt(tok.Token)
				if err != nil {
					bad = append(bad, t.name+" "+tok.ID)
					continue
				}
				enc, err := kr.Encrypt(plain)
				if err != nil {
					return err
				}
				if err := t.set(q, ctx, tok.ID, enc); err != nil {
					return err
				}
				done++
			}
			return nil
		})
		if err != nil {
			return changed, fmt.Errorf("re-encrypt %s keys: %w", t.name, err)
		}
		if rows == 0 {
			return changed, nil
		}
		changed += done
		if pass == 1 {
			st.scanned += rows
		}
		st.undecryptable = append(st.undecryptable, bad...)
		if t.name == "engine" {
			st.engines += done
		} else {
			st.operations += done
		}
		fmt.Fprintf(out, "pass %d, %s batch %d: %d rows, %d re-encrypted, %d undecryptable\n", pass, t.name, nb, rows, done, len(bad))
		if rows < batch {
			return changed, nil
		}
	}
}
